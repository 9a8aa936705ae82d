"""Triton kernel of :func:`eva_kernels.cov_update` (fused masked, shifted x^T x + column sums).

Math (see :mod:`eva_kernels.ops.cov_update`): for kept rows ``y_i = float32(x_i) - shift``::

    cov[:, :] += sum_i y_i^T y_i   (upper triangle, tiles on/above the diagonal only)
    colsum    += sum_i y_i
    count      = #{kept rows}      (0-d int64 on x.device, no host sync)

Kernel layout
-------------
* ``cov`` is cut into square ``BLOCK x BLOCK`` tiles; only the ``T (T + 1) / 2`` tiles with
  tile-row <= tile-column are launched (grid axis 0). The linear program id is mapped to
  ``(ti, tj)`` column by column (``tj = floor((sqrt(8 pid + 1) - 1) / 2)``) so consecutive
  programs share the column panel of ``x`` in L2. Diagonal tiles are written whole (their lower
  half is correct too); tiles strictly below the diagonal are never touched.
* Grid axis 1 splits the token dimension ``n`` (split-n) when there are too few tiles to fill
  the GPU (small ``d``, large ``n``). With more than one split, tiles are added into ``cov``
  with atomic adds (the fp32 summation order then varies between runs: results are not
  bit-reproducible, differences are at fp32 rounding level); with one split, a plain
  load-add-store (deterministic).
* ``x`` is read with its own row and column strides (any view), one ``BLOCK_K x BLOCK`` panel
  per operand per step; masked rows and out-of-range rows/columns are masked *loads* with
  ``other=0``, so NaN/Inf in dropped rows never reach the arithmetic and no gathered copy of
  ``x`` is made.
* Precision: bf16/fp16 input without shift goes to the tensor cores as is (products are exact
  in fp32, accumulation in fp32). fp32 input, or any input with a shift, is widened to fp32,
  shifted (masked rows forced to exactly 0) and multiplied with ``FP32_DOT_PRECISION``
  (``tf32x3`` on GPU: fp32-level accuracy on tensor cores; ``ieee`` in the interpreter).
* Fusion: the diagonal-tile programs also reduce their column panel into ``colsum``; the
  program of tile (0, 0) counts the kept rows of its n-chunk into ``count``. One pass over x.

Autotuning (GPU only) is keyed on ``d``, the power-of-two bucket of ``n``, the dtypes and the
flags; it restores ``cov``/``colsum``/``count`` after each trial, so tuning on a live call is
safe. Under ``TRITON_INTERPRET=1`` a single small config is used.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .config import FP32_DOT_PRECISION, INTERPRET, num_sms, pow2_bucket

#: The configs autotuning may pick on a GPU. Each is compiled for sm_80 and sm_90 by the compile
#: check (:mod:`.compile_check`): on sm_90 none spills; on sm_80 the fp32 (tf32x3) variants spill
#: with all but BLOCK_K=16 and are pruned there (:data:`.launches.EXCLUDED`). 128 x 128 tiles
#: spill in every variant on both targets (fp32 accumulator + tf32x3 operands), so none is listed.
GPU_CONFIGS = [
    triton.Config({"BLOCK": 64, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK": 64, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK": 64, "BLOCK_K": 16}, num_warps=4, num_stages=3),
]
INTERPRETER_CONFIGS = [triton.Config({"BLOCK": 32, "BLOCK_K": 16}, num_warps=4, num_stages=1)]
_CONFIGS = INTERPRETER_CONFIGS if INTERPRET else GPU_CONFIGS

# Minimum rows per n-split: enough k-steps to amortise the atomic epilogue of a tile.
_MIN_ROWS_PER_SPLIT = 256 if not INTERPRET else 16
_PROGRAMS_PER_SM = 2


def _n_tiles(d: int, block: int) -> int:
    t = triton.cdiv(d, block)
    return t * (t + 1) // 2


def _n_splits(n: int, d: int, block: int, sms: int) -> int:
    """Programs along n: enough (tiles x splits) programs to fill ``sms`` SMs twice over."""
    tiles = _n_tiles(d, block)
    want = triton.cdiv(_PROGRAMS_PER_SM * sms, tiles)
    return max(1, min(want, triton.cdiv(n, _MIN_ROWS_PER_SPLIT)))


def _grid(meta):
    b = meta["BLOCK"]
    return (_n_tiles(meta["d"], b), _n_splits(meta["n"], meta["d"], b, meta["SMS"]))


def _prune(configs, named_args, **kwargs):
    """Drop the configs the compile check found spilling for this variant on this GPU."""
    from .launches import prune_configs, variant_of_cov_update
    x = named_args["x_ptr"]
    if INTERPRET or x.device.type != "cuda":
        return configs
    variant = variant_of_cov_update(x.dtype, bool(kwargs.get("HAS_SHIFT", named_args.get("HAS_SHIFT"))))
    return prune_configs("_cov_update_kernel", configs, variant, torch.cuda.get_device_capability(x.device)[0])


@triton.autotune(configs=_CONFIGS, key=["d", "N_BUCKET", "HAS_MASK", "HAS_SHIFT", "LOWP_DOT"],
                 restore_value=["cov_ptr", "colsum_ptr", "count_ptr"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _cov_update_kernel(x_ptr, mask_ptr, shift_ptr, cov_ptr, colsum_ptr, count_ptr,
                       n, d, stride_xn, stride_xd,
                       N_BUCKET, SMS,
                       HAS_MASK: tl.constexpr, HAS_SHIFT: tl.constexpr, LOWP_DOT: tl.constexpr,
                       FP32_PRECISION: tl.constexpr,
                       BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    sid = tl.program_id(1)
    n_split = tl.num_programs(1)

    # pid -> (ti, tj), ti <= tj, enumerated column by column: pid = tj (tj + 1) / 2 + ti.
    tj = ((tl.sqrt(8.0 * pid.to(tl.float32) + 1.0) - 1.0) * 0.5).to(tl.int32)
    tj = tl.where((tj + 1) * (tj + 2) // 2 <= pid, tj + 1, tj)  # fix fp rounding
    tj = tl.where(tj * (tj + 1) // 2 > pid, tj - 1, tj)
    ti = pid - tj * (tj + 1) // 2
    is_diag = ti == tj

    # this program's chunk of rows [start, end)
    rows_per = tl.cdiv(tl.cdiv(n, n_split), BLOCK_K) * BLOCK_K
    start = sid * rows_per
    end = tl.minimum(start + rows_per, n)

    offs_a = ti * BLOCK + tl.arange(0, BLOCK)
    offs_b = tj * BLOCK + tl.arange(0, BLOCK)
    col_ok_a = offs_a < d
    col_ok_b = offs_b < d
    ptr_a = x_ptr + offs_a.to(tl.int64)[None, :] * stride_xd
    ptr_b = x_ptr + offs_b.to(tl.int64)[None, :] * stride_xd
    if HAS_SHIFT:
        shift_a = tl.load(shift_ptr + offs_a, mask=col_ok_a, other=0.0)
        shift_b = tl.load(shift_ptr + offs_b, mask=col_ok_b, other=0.0)

    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    csum = tl.zeros((BLOCK,), dtype=tl.float32)
    cnt = tl.zeros((BLOCK_K,), dtype=tl.int32)
    for k0 in range(start, end, BLOCK_K):
        rows = k0 + tl.arange(0, BLOCK_K)
        row_ok = rows < end
        if HAS_MASK:
            keep = tl.load(mask_ptr + rows, mask=row_ok, other=0)
            row_ok = row_ok & (keep != 0)
        cnt += row_ok.to(tl.int32)
        roff = rows.to(tl.int64)[:, None] * stride_xn
        ok_a = row_ok[:, None] & col_ok_a[None, :]
        ok_b = row_ok[:, None] & col_ok_b[None, :]
        xa = tl.load(ptr_a + roff, mask=ok_a, other=0.0)
        xb = tl.load(ptr_b + roff, mask=ok_b, other=0.0)
        if LOWP_DOT:
            # bf16/fp16, no shift: exact products on the tensor cores, fp32 accumulation
            acc = tl.dot(tl.trans(xa), xb, acc)
            yb = xb.to(tl.float32)
        else:
            ya = xa.to(tl.float32)
            yb = xb.to(tl.float32)
            if HAS_SHIFT:
                ya = tl.where(ok_a, ya - shift_a[None, :], 0.0)
                yb = tl.where(ok_b, yb - shift_b[None, :], 0.0)
            acc = tl.dot(tl.trans(ya), yb, acc, input_precision=FP32_PRECISION)
        if is_diag:
            csum += tl.sum(yb, axis=0)

    out_ptr = cov_ptr + offs_a.to(tl.int64)[:, None] * d + offs_b[None, :]
    out_ok = col_ok_a[:, None] & col_ok_b[None, :]
    if n_split > 1:
        tl.atomic_add(out_ptr, acc, mask=out_ok, sem="relaxed")
        if is_diag:
            tl.atomic_add(colsum_ptr + offs_b, csum, mask=col_ok_b, sem="relaxed")
        if pid == 0:
            tl.atomic_add(count_ptr, tl.sum(cnt, axis=0).to(tl.int64), sem="relaxed")
    else:
        old = tl.load(out_ptr, mask=out_ok, other=0.0)
        tl.store(out_ptr, old + acc, mask=out_ok)
        if is_diag:
            old_c = tl.load(colsum_ptr + offs_b, mask=col_ok_b, other=0.0)
            tl.store(colsum_ptr + offs_b, old_c + csum, mask=col_ok_b)
        if pid == 0:
            tl.store(count_ptr, tl.sum(cnt, axis=0).to(tl.int64))


def cov_update_triton(cov: Tensor, colsum: Tensor, x: Tensor, mask: Optional[Tensor],
                      shift: Optional[Tensor]) -> Tensor:
    """``triton`` backend of :func:`eva_kernels.cov_update` (inputs already validated).

    cov (d, d) fp32 contiguous, colsum (d,) fp32 contiguous, x (n, d) fp32/fp16/bf16 any
    strides, mask None or bool (n,), shift None or fp32 (d,). Updates the upper triangle of
    ``cov`` and ``colsum`` in place; returns the kept-row count (0-d int64 on x.device).
    """
    n, d = x.shape
    count = torch.zeros((), dtype=torch.int64, device=x.device)
    if n == 0:
        return count
    if mask is not None:
        mask_arg = mask if mask.is_contiguous() else mask.contiguous()
        mask_arg = mask_arg.view(torch.uint8)
    else:
        mask_arg = count  # unused placeholder pointer
    if shift is not None:
        shift_arg = shift if shift.is_contiguous() else shift.contiguous()
    else:
        shift_arg = colsum  # unused placeholder pointer
    # Triton's interpreter multiplies bf16 tiles wrongly in tl.dot (numpy has no bf16): there
    # bf16 takes the (exact) widen-to-fp32 path; compiled kernels use bf16 tensor cores.
    lowp_dtypes = (torch.float16,) if INTERPRET else (torch.float16, torch.bfloat16)
    lowp = x.dtype in lowp_dtypes and shift is None
    with torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext():
        _cov_update_kernel[_grid](
            x, mask_arg, shift_arg, cov, colsum, count,
            n, d, x.stride(0), x.stride(1),
            pow2_bucket(n), num_sms(x.device),
            HAS_MASK=mask is not None, HAS_SHIFT=shift is not None, LOWP_DOT=lowp,
            FP32_PRECISION=FP32_DOT_PRECISION,
        )
    return count

