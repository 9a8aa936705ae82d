"""Heavy steps of :func:`eva_kernels.topk_eigh` for the ``triton`` backend.

The ``triton`` :class:`eva_kernels.EigenProducts` reads fp32 statistics in place
(:func:`.upper_bmm.prepare_in_place`, :func:`.upper_bmm.in_place_operator_matmul`); for other
dtypes it falls back to the two kernels here:

* ``symmetrize(cov) -> (d, d)``: full symmetric matrix from the upper triangle (Triton mirror
  kernel for fp32/fp64, one read of each element, one write).
* ``operator_matmul(a_full, q, colsum, count) -> (d, b)``: ``(A - c c^T / n) q`` in one Triton
  kernel for fp32: the GEMM ``A q`` and the rank-one correction (``c^T q`` is reduced in the
  same K loop, the correction is applied in the epilogue). Other dtypes use torch.
The orthonormalisation between products is shared by every backend (:mod:`eva_kernels.linalg`).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...linalg import subtract_centering, sym_from_upper
from .config import FP32_DOT_PRECISION, INTERPRET, centred_variant_pruner


def _dev_ctx(t: Tensor):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


# ---------------------------------------------------------------- symmetrize (mirror) ----
#: Block of the mirror kernel on a GPU (the interpreter uses 32); launched with 4 warps.
MIRROR_BLOCK = 64
MIRROR_WARPS = 4


@triton.jit
def _mirror_kernel(src_ptr, dst_ptr, d, BLOCK: tl.constexpr):
    pi = tl.program_id(0)
    pj = tl.program_id(1)
    r = pi * BLOCK + tl.arange(0, BLOCK)
    c = pj * BLOCK + tl.arange(0, BLOCK)
    r64 = r.to(tl.int64)[:, None]
    c64 = c.to(tl.int64)[None, :]
    inb = (r[:, None] < d) & (c[None, :] < d)
    up = r[:, None] <= c[None, :]
    v_up = tl.load(src_ptr + r64 * d + c64, mask=inb & up, other=0.0)
    v_lo = tl.load(src_ptr + c64 * d + r64, mask=inb & (~up), other=0.0)
    tl.store(dst_ptr + r64 * d + c64, tl.where(up, v_up, v_lo), mask=inb)


def symmetrize(cov: Tensor) -> Tensor:
    """Full symmetric (d, d) matrix from the upper triangle of ``cov`` (a new tensor)."""
    if cov.dtype not in (torch.float32, torch.float64) or cov.dim() != 2:
        return sym_from_upper(cov)
    src = cov.contiguous()
    d = src.shape[0]
    out = torch.empty_like(src)
    block = 32 if INTERPRET else MIRROR_BLOCK
    grid = (triton.cdiv(d, block), triton.cdiv(d, block))
    with _dev_ctx(src):
        _mirror_kernel[grid](src, out, d, BLOCK=block, num_warps=MIRROR_WARPS)
    return out


# ------------------------------------------------ centred operator matmul (A - cc^T/n) q ----
#: The configs autotuning may pick on a GPU (compiled for sm_80 and sm_90 by :mod:`.compile_check`;
#: the ones that spill on sm_80 are pruned there, see :data:`.launches.EXCLUDED`).
GPU_OP_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 64}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 32, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=8, num_stages=3),
]
INTERPRETER_OP_CONFIGS = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 32}, num_warps=4, num_stages=1)]
_OP_CONFIGS = INTERPRETER_OP_CONFIGS if INTERPRET else GPU_OP_CONFIGS


@triton.autotune(configs=_OP_CONFIGS, key=["d", "b", "HAS_C"],
                 prune_configs_by={"early_config_prune": centred_variant_pruner("_centered_matmul_kernel")})
@triton.jit
def _centered_matmul_kernel(a_ptr, q_ptr, c_ptr, n_ptr, y_ptr, d, b,
                            stride_am, stride_ak, stride_qk, stride_qn, stride_ym, stride_yn,
                            HAS_C: tl.constexpr, FP32_PRECISION: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pm = tl.program_id(0)
    pn = tl.program_id(1)
    offs_m = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < d
    n_ok = offs_n < b
    a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am
    q_cols = q_ptr + offs_n.to(tl.int64)[None, :] * stride_qn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    cq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, d, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < d
        a = tl.load(a_rows + offs_k.to(tl.int64)[None, :] * stride_ak,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        q = tl.load(q_cols + offs_k.to(tl.int64)[:, None] * stride_qk,
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, q, acc, input_precision=FP32_PRECISION)
        if HAS_C:
            ck = tl.load(c_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)
            cq += tl.sum(ck[:, None] * q, axis=0)
    if HAS_C:
        cnt = tl.maximum(tl.load(n_ptr).to(tl.float32), 1.0)
        cm = tl.load(c_ptr + offs_m, mask=m_ok, other=0.0).to(tl.float32)
        acc -= cm[:, None] * (cq / cnt)[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc, mask=m_ok[:, None] & n_ok[None, :])


def operator_matmul(a_full: Tensor, q: Tensor, colsum: Optional[Tensor],
                    count: Optional[Tensor]) -> Tensor:
    """``(A - c c^T / n) @ q``: a_full (d, d) symmetric, q (d, b), colsum c (d,), count n 0-d."""
    if a_full.dtype != torch.float32 or q.dtype != torch.float32 or q.dim() != 2:
        return subtract_centering(a_full @ q, q, colsum, count)
    d, b = q.shape
    y = torch.empty((d, b), dtype=torch.float32, device=q.device)
    if d == 0 or b == 0:
        return y
    has_c = colsum is not None
    if has_c:
        c_arg = colsum if colsum.is_contiguous() else colsum.contiguous()
        if not isinstance(count, Tensor):
            count = torch.tensor(float(count))
        n_arg = count.to(device=q.device).reshape(())
    else:
        c_arg, n_arg = y, y  # unused placeholder pointers

    def grid(meta):
        return (triton.cdiv(d, meta["BLOCK_M"]), triton.cdiv(b, meta["BLOCK_N"]))

    with _dev_ctx(q):
        _centered_matmul_kernel[grid](
            a_full, q, c_arg, n_arg, y, d, b,
            a_full.stride(0), a_full.stride(1), q.stride(0), q.stride(1), y.stride(0), y.stride(1),
            HAS_C=has_c, FP32_PRECISION=FP32_DOT_PRECISION,
        )
    return y
