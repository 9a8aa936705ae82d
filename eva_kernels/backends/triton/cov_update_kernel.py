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
* Precision, four paths (constexprs ``LOWP_DOT`` / ``SPLIT_DOT`` / ``CHUNKED``):

  - bf16/fp16 input without shift (``LOWP_DOT``): to the tensor cores as is (products of 16-bit
    values are exact in fp32, accumulation in fp32).
  - bf16/fp16 input with a shift (``SPLIT_DOT``, the engine's case): ``y = float32(x) - shift``
    is exact in fp32 but not representable in 16 bits, so it is split into two bf16 parts,
    ``hi = rn_bf16(y)`` and ``lo = rn_bf16(y - hi)`` (``|y - hi - lo| <= 2^-17 |y|``), and
    ``y_a^T y_b ~= hi_a^T hi_b + hi_a^T lo_b + lo_a^T hi_b``: three bf16 tensor-core products
    with fp32 accumulation (the dropped ``lo_a^T lo_b`` is ``<= 2^-18`` of each product). bf16,
    not fp16, because ``lo`` needs fp32's exponent range. Relative error of the tile against the
    float64 spec: 5e-6 to 8.5e-6 (max entry error / max entry, bf16 rows at d = 1024 and 4096,
    n = 8192 and 2048, Gaussian with offsets and Student-t; the dropped ``lo_a lo_b`` makes it a
    small bias on the diagonal), within the 1e-4 tolerance of 16-bit inputs; on a GPU the
    ``rel_err`` columns of ``bench_cov_update --shift mean`` measure it. The rounding is done on
    the fp32 bits (round to nearest even), so the interpreter, which multiplies the parts as fp32
    (``SPLIT_NATIVE=False``: its bf16 ``tl.dot`` is wrong), computes the very same products as
    the GPU's bf16 MMAs. The CUDA C++ kernel uses the same split (csrc/cuda).
  - bf16/fp16 input with a shift and ``precision="fast"`` (``CHUNKED``): the raw 16-bit rows go
    to the tensor cores as in ``LOWP_DOT`` (one MMA per product, exact products) and the shift
    is taken out per chunk of ``CHUNK`` rows (512): with the chunk's ``u = sum (x - s)`` and
    kept count ``c`` (pre-pass :mod:`.chunk_sums`, which reads ``x`` once more),
    ``sum (x - s)(x - s)^T = sum x x^T - s z^T - z s^T``, ``z = u + (c / 2) s``, subtracted from
    the accumulator at the chunk's end. n-splits are whole chunks. The accumulator holds at
    most one chunk's raw sum on top of the centred total, so the error grows with
    ``R = max E[x^2] / max Var``: ~``2^-24 (CHUNK / 32) R`` relative (contract:
    ``FAST_PRODUCT_ERROR``); ``benches/accuracy/bench_shifted_precision`` measures it per case.
    No ``x - s`` is ever rounded to 16 bits, so fp16 data beyond fp16's range after the shift
    stays finite (products of fp16 values fit fp32).
  - fp32 input: widened, shifted and multiplied with ``FP32_DOT_PRECISION`` (``tf32x3`` on GPU:
    fp32-level accuracy on tensor cores; ``ieee`` in the interpreter).

  Masked rows and columns past ``d`` are exactly 0 in every path.
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

from .chunk_sums import chunk_sums
from .config import FP32_DOT_PRECISION, INTERPRET, SPLIT_NATIVE, num_sms, pow2_bucket

#: Rows per chunk of the fast shifted path (``precision="fast"``): the accumulator holds at most
#: one chunk's raw (unshifted) sum before the shift correction; the error bound
#: (:data:`eva_kernels.ops.cov_update.FAST_PRODUCT_ERROR`) grows with it. Tests lower it to
#: cross chunk boundaries on small inputs. Equal to ``ops.cov_update.FAST_CHUNK_ROWS`` (the
#: contract's; a test checks: importing it here would be circular).
CHUNK_ROWS = 512

#: The configs autotuning may pick on a GPU. Each is compiled for sm_80 and sm_90 by the compile
#: check (:mod:`.compile_check`), for a row-major ``x`` and for any other view (``-strided``);
#: those that spill there are pruned for that variant and target (:data:`.launches.EXCLUDED`).
#: The 128 x 128 tiles (8 warps: wgmma m64n128 on sm_90) are spill-free on sm_90 for row-major
#: 16-bit input, unshifted or on the fast shifted path, which the engine's launches are; they
#: spill for strided views (an address per element instead of vectorised loads), for fp32
#: (tf32x3) and for the bf16 split, where the 64 x 64 ones remain.
GPU_CONFIGS = [
    triton.Config({"BLOCK": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK": 128, "BLOCK_K": 32}, num_warps=8, num_stages=4),
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
    splits = _n_splits(meta["n"], meta["d"], b, meta["SMS"])
    if meta["CHUNKED"]:  # a split is whole chunks
        splits = min(splits, triton.cdiv(meta["n"], meta["CHUNK"]))
    return (_n_tiles(meta["d"], b), splits)


def _prune(configs, named_args, **kwargs):
    """Drop the configs the compile check found spilling for this variant on this GPU."""
    from .launches import is_contiguous_launch, prune_configs, variant_of_cov_update
    x = named_args["x_ptr"]
    if INTERPRET or x.device.type != "cuda":
        return configs
    flag = lambda name: bool(kwargs.get(name, named_args.get(name)))  # noqa: E731
    variant = variant_of_cov_update(x.dtype, flag("HAS_SHIFT"), flag("CHUNKED"), not is_contiguous_launch(x))
    return prune_configs("_cov_update_kernel", configs, variant, torch.cuda.get_device_capability(x.device)[0])


@triton.jit
def _round_to_bf16(y):
    """fp32 -> the nearest bf16 value (ties to even), still as fp32 (finite inputs).

    Rounds on the bits (add ``0x7FFF + lsb`` of the kept half, clear the low 16 bits), so the
    result is the same on the GPU and in the interpreter (whose ``.to(tl.bfloat16)``
    truncates), and converting it to bf16 afterwards is exact.
    """
    bits = y.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _split_dot(ya, yb, acc, SPLIT_NATIVE: tl.constexpr):
    """``acc + ya^T yb`` by the bf16 split (module docstring): three tensor-core products.

    ya (BLOCK_K, BLOCK), yb (BLOCK_K, BLOCK) fp32; acc (BLOCK, BLOCK) fp32.
    """
    ha = _round_to_bf16(ya)
    hb = _round_to_bf16(yb)
    la = _round_to_bf16(ya - ha)
    lb = _round_to_bf16(yb - hb)
    if SPLIT_NATIVE:
        ha = ha.to(tl.bfloat16)
        hb = hb.to(tl.bfloat16)
        la = la.to(tl.bfloat16)
        lb = lb.to(tl.bfloat16)
        acc = tl.dot(tl.trans(la), hb, acc)
        acc = tl.dot(tl.trans(ha), lb, acc)
        acc = tl.dot(tl.trans(ha), hb, acc)
    else:
        acc = tl.dot(tl.trans(la), hb, acc, input_precision="ieee")
        acc = tl.dot(tl.trans(ha), lb, acc, input_precision="ieee")
        acc = tl.dot(tl.trans(ha), hb, acc, input_precision="ieee")
    return acc


@triton.jit
def _row_panels(ptr_a, ptr_b, mask_ptr, k0, end, stride_xn, col_ok_a, col_ok_b,
                HAS_MASK: tl.constexpr, BLOCK_K: tl.constexpr):
    """Rows ``[k0, k0 + BLOCK_K)`` (below ``end``, kept by the mask) of the two column panels:
    ``(row_ok (BLOCK_K,), xa, xb (BLOCK_K, BLOCK))``, dropped rows and columns past ``d`` read
    as 0 (masked loads: NaN/Inf in them never reach the arithmetic)."""
    rows = k0 + tl.arange(0, BLOCK_K)
    row_ok = rows < end
    if HAS_MASK:
        keep = tl.load(mask_ptr + rows, mask=row_ok, other=0)
        row_ok = row_ok & (keep != 0)
    roff = rows.to(tl.int64)[:, None] * stride_xn
    xa = tl.load(ptr_a + roff, mask=row_ok[:, None] & col_ok_a[None, :], other=0.0)
    xb = tl.load(ptr_b + roff, mask=row_ok[:, None] & col_ok_b[None, :], other=0.0)
    return row_ok, xa, xb


@triton.autotune(configs=_CONFIGS, key=["d", "N_BUCKET", "HAS_MASK", "HAS_SHIFT", "LOWP_DOT", "SPLIT_DOT", "CHUNKED"],
                 restore_value=["cov_ptr", "colsum_ptr", "count_ptr"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _cov_update_kernel(x_ptr, mask_ptr, shift_ptr, cov_ptr, colsum_ptr, count_ptr, sums_ptr, counts_ptr,
                       n, d, stride_xn, stride_xd,
                       N_BUCKET, SMS,
                       HAS_MASK: tl.constexpr, HAS_SHIFT: tl.constexpr, LOWP_DOT: tl.constexpr,
                       SPLIT_DOT: tl.constexpr, CHUNKED: tl.constexpr, CHUNK: tl.constexpr,
                       SPLIT_NATIVE: tl.constexpr, FP32_PRECISION: tl.constexpr,
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
    if CHUNKED:  # splits end on chunk boundaries: the shift correction is applied per chunk
        rows_per = tl.cdiv(tl.cdiv(n, n_split), CHUNK) * CHUNK
    else:
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
    if CHUNKED:
        # 16-bit x with a shift, one MMA per product: the raw 16-bit rows go to the tensor cores
        # (exact products, fp32 accumulation) and each chunk's shift correction
        # s_a z_b^T + z_a s_b^T, z = sum_chunk (x - s) + (c / 2) s, is subtracted at its end,
        # so the accumulator never holds more than one chunk's raw sum (module docstring).
        for c0 in range(start, end, CHUNK):
            for k0 in range(c0, tl.minimum(c0 + CHUNK, end), BLOCK_K):
                row_ok, xa, xb = _row_panels(ptr_a, ptr_b, mask_ptr, k0, end, stride_xn, col_ok_a, col_ok_b,
                                             HAS_MASK, BLOCK_K)
                cnt += row_ok.to(tl.int32)
                if SPLIT_NATIVE:
                    acc = tl.dot(tl.trans(xa), xb, acc)
                else:  # the interpreter: the same exact products, as fp32
                    acc = tl.dot(tl.trans(xa.to(tl.float32)), xb.to(tl.float32), acc, input_precision="ieee")
            chunk = c0 // CHUNK
            ya = tl.load(sums_ptr + chunk.to(tl.int64) * d + offs_a, mask=col_ok_a, other=0.0)
            yb = tl.load(sums_ptr + chunk.to(tl.int64) * d + offs_b, mask=col_ok_b, other=0.0)
            half_c = 0.5 * tl.load(counts_ptr + chunk).to(tl.float32)
            za = ya + half_c * shift_a
            zb = yb + half_c * shift_b
            acc -= shift_a[:, None] * zb[None, :] + za[:, None] * shift_b[None, :]
            if is_diag:
                csum += yb
    else:
        for k0 in range(start, end, BLOCK_K):
            row_ok, xa, xb = _row_panels(ptr_a, ptr_b, mask_ptr, k0, end, stride_xn, col_ok_a, col_ok_b,
                                         HAS_MASK, BLOCK_K)
            cnt += row_ok.to(tl.int32)
            ok_a = row_ok[:, None] & col_ok_a[None, :]
            ok_b = row_ok[:, None] & col_ok_b[None, :]
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
                if SPLIT_DOT:
                    acc = _split_dot(ya, yb, acc, SPLIT_NATIVE)
                else:
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
                      shift: Optional[Tensor], precision: str = "exact") -> Tensor:
    """``triton`` backend of :func:`eva_kernels.cov_update` (inputs already validated).

    cov (d, d) fp32 contiguous, colsum (d,) fp32 contiguous, x (n, d) fp32/fp16/bf16 any
    strides, mask None or bool (n,), shift None or fp32 (d,); ``precision`` ``"exact"`` or
    ``"fast"`` (16-bit x with a shift: the one-MMA chunked path instead of the bf16 split).
    Updates the upper triangle of ``cov`` and ``colsum`` in place; returns the kept-row count
    (0-d int64 on x.device).
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
    shifted16 = x.dtype in (torch.float16, torch.bfloat16) and shift is not None
    chunked = shifted16 and precision == "fast"
    split = shifted16 and not chunked
    if chunked:
        sums, counts = chunk_sums(x, mask_arg if mask is not None else None, shift_arg, CHUNK_ROWS)
    else:
        sums, counts = colsum, count  # unused placeholder pointers
    with torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext():
        _cov_update_kernel[_grid](
            x, mask_arg, shift_arg, cov, colsum, count, sums, counts,
            n, d, x.stride(0), x.stride(1),
            pow2_bucket(n), num_sms(x.device),
            HAS_MASK=mask is not None, HAS_SHIFT=shift is not None, LOWP_DOT=lowp,
            SPLIT_DOT=split, CHUNKED=chunked, CHUNK=CHUNK_ROWS, SPLIT_NATIVE=SPLIT_NATIVE,
            FP32_PRECISION=FP32_DOT_PRECISION,
        )
    return count

