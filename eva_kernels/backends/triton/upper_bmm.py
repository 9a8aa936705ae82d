"""Batched products ``Y_g = (sym(C_g) - c_g c_g^T / n_g) Q_g`` reading only upper triangles, in place.

Each statistic ``C_g`` (d, d) is stored anywhere (its own allocation; only the entries on and
above the diagonal are valid); the kernel receives a table of their addresses, so a batch of
``G`` statistics is multiplied in one launch with **no d x d copy**: no mirror, no stack. Row
tile ``I`` of ``sym(C)`` is read in three ranges of column tiles ``J``:

* ``J`` left of the diagonal: ``sym(C)_IJ = C_JI^T``, loaded transposed from the upper triangle;
* ``J`` crossing the diagonal: each entry from whichever of ``C_ij`` / ``C_ji`` is stored
  (two masked loads, no double counting);
* ``J`` right of the diagonal: ``C_IJ`` as stored.

So one product reads each stored entry twice and the lower triangle never: ``4 d^2`` bytes in
fp32 per matrix, the same traffic as a GEMM on the mirrored copy without writing and re-reading
that copy. Centring ``- c (c^T q) / n`` is applied in the epilogue from ``c^T q`` reduced in the
same loop (as in :func:`eva_kernels.backends.triton.eigen_steps.operator_matmul`). fp32 only
(the statistics' dtype on GPUs), with the backend's fp32 dot precision (``tf32x3`` on GPUs:
fp32-accurate products on tensor cores).
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple, Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...transfer import from_values
from .config import FP32_DOT_PRECISION, INTERPRET, centred_variant_pruner
from .eigen_steps import operator_matmul, symmetrize

#: The configs autotuning may pick on a GPU (compiled for sm_80 and sm_90 by the compile check).
#: ``BLOCK_N`` at or above the block ``b`` (40 at r = 16, rho = 2) reads each matrix once per product.
GPU_CONFIGS = [  # BLOCK_K 16: at 32, tf32x3's split operands spill in most of these shapes (compile check)
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 16}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 16}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 16}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 16}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 16}, num_warps=8, num_stages=3),
]
INTERPRETER_CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=4, num_stages=1)]
_CONFIGS = INTERPRETER_CONFIGS if INTERPRET else GPU_CONFIGS


@triton.jit
def _accumulate(acc, cq, a, q_tile, ck, HAS_C: tl.constexpr, FP32_PRECISION: tl.constexpr):
    """``acc += a @ q_tile`` and (centred) ``cq += c_K^T q_tile``."""
    acc = tl.dot(a, q_tile, acc, input_precision=FP32_PRECISION)
    if HAS_C:
        cq += tl.sum(ck[:, None] * q_tile, axis=0)
    return acc, cq


@triton.autotune(configs=_CONFIGS, key=["d", "b", "HAS_C"],
                 prune_configs_by={"early_config_prune": centred_variant_pruner("_upper_bmm_kernel")})
@triton.jit
def _upper_bmm_kernel(addr_ptr, q_ptr, c_ptr, n_ptr, y_ptr, d, b,
                      stride_qg, stride_qk, stride_qn, stride_cg, stride_yg, stride_ym, stride_yn,
                      HAS_C: tl.constexpr, FP32_PRECISION: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pm = tl.program_id(0)
    pn = tl.program_id(1)
    g = tl.program_id(2)
    a_base = tl.load(addr_ptr + g).to(tl.pointer_type(tl.float32))  # C_g, (d, d) row-major
    q_base = q_ptr + g.to(tl.int64) * stride_qg
    c_base = c_ptr + g.to(tl.int64) * stride_cg
    m0 = pm * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < d
    n_ok = offs_n < b
    rows = offs_m.to(tl.int64)
    q_cols = q_base + offs_n.to(tl.int64)[None, :] * stride_qn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    cq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    ck = tl.zeros((BLOCK_K,), dtype=tl.float32)
    lower_end = (m0 // BLOCK_K) * BLOCK_K                           # tiles wholly left of the diagonal
    upper_start = tl.cdiv(m0 + BLOCK_M, BLOCK_K) * BLOCK_K          # tiles wholly right of it
    for k0 in range(0, lower_end, BLOCK_K):                         # sym(C)_IJ = C_JI^T
        offs_k = k0 + tl.arange(0, BLOCK_K)
        cols = offs_k.to(tl.int64)
        a = tl.load(a_base + cols[None, :] * d + rows[:, None], mask=m_ok[:, None], other=0.0)
        q_tile = tl.load(q_cols + cols[:, None] * stride_qk, mask=n_ok[None, :], other=0.0)
        if HAS_C:
            ck = tl.load(c_base + offs_k)
        acc, cq = _accumulate(acc, cq, a, q_tile, ck, HAS_C, FP32_PRECISION)
    for k0 in range(lower_end, tl.minimum(upper_start, d), BLOCK_K):  # crossing: either stored entry
        offs_k = k0 + tl.arange(0, BLOCK_K)
        cols = offs_k.to(tl.int64)
        inb = m_ok[:, None] & (offs_k < d)[None, :]
        up = offs_m[:, None] <= offs_k[None, :]
        a = (tl.load(a_base + rows[:, None] * d + cols[None, :], mask=inb & up, other=0.0)
             + tl.load(a_base + cols[None, :] * d + rows[:, None], mask=inb & (~up), other=0.0))
        q_tile = tl.load(q_cols + cols[:, None] * stride_qk, mask=(offs_k < d)[:, None] & n_ok[None, :], other=0.0)
        if HAS_C:
            ck = tl.load(c_base + offs_k, mask=offs_k < d, other=0.0)
        acc, cq = _accumulate(acc, cq, a, q_tile, ck, HAS_C, FP32_PRECISION)
    for k0 in range(upper_start, d, BLOCK_K):                       # C_IJ as stored
        offs_k = k0 + tl.arange(0, BLOCK_K)
        cols = offs_k.to(tl.int64)
        k_ok = offs_k < d
        a = tl.load(a_base + rows[:, None] * d + cols[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        q_tile = tl.load(q_cols + cols[:, None] * stride_qk, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if HAS_C:
            ck = tl.load(c_base + offs_k, mask=k_ok, other=0.0)
        acc, cq = _accumulate(acc, cq, a, q_tile, ck, HAS_C, FP32_PRECISION)
    if HAS_C:
        cnt = tl.maximum(tl.load(n_ptr + g).to(tl.float32), 1.0)
        cm = tl.load(c_base + offs_m, mask=m_ok, other=0.0)
        acc -= cm[:, None] * (cq / cnt)[None, :]
    y_ptrs = y_ptr + g.to(tl.int64) * stride_yg + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc, mask=m_ok[:, None] & n_ok[None, :])


def _runnable() -> bool:
    """Compiled: always. Interpreted: Triton >= 3.9, or NumPy < 2 (Triton 3.6's interpreter keeps
    scalars as size-1 NumPy arrays, which NumPy 2 refuses to turn into the ints that loop bounds
    computed from ``tl.program_id`` need; measured with ``make test-torch-matrix``)."""
    if not INTERPRET:
        return True
    import numpy
    triton_v = tuple(int(p) for p in triton.__version__.split(".")[:2])
    return triton_v >= (3, 9) or int(numpy.__version__.split(".")[0]) < 2


#: Whether the kernel can run here (:func:`_runnable`); when not, ``supports`` is False and the
#: callers take the mirror path.
RUNNABLE = _runnable()


def supports(covs: Sequence[Tensor]) -> bool:
    """Whether :func:`upper_bmm` takes these statistics: fp32, square, row-major contiguous (and
    the kernel can run here, :data:`RUNNABLE`)."""
    return RUNNABLE and all(c.dtype == torch.float32 and c.dim() == 2 and c.shape[0] == c.shape[1]
                            and c.is_contiguous() for c in covs)


def addresses(covs: Sequence[Tensor]) -> Tensor:
    """(G,) int64 address table of ``covs`` on their device (the caller keeps ``covs`` alive)."""
    return from_values([c.data_ptr() for c in covs], torch.int64, covs[0].device)  # no host sync on CUDA


def upper_bmm(addr: Tensor, d: int, q: Tensor, colsum: Optional[Tensor] = None,
              count: Optional[Tensor] = None) -> Tensor:
    """``(sym(C_g) - c_g c_g^T / n_g) Q_g`` for every ``g``, one launch.

    Args:
        addr: (G,) int64 addresses of ``G`` fp32 (d, d) row-major statistics (:func:`addresses`),
            upper triangles valid, on ``q``'s device.
        q: (G, d, b) fp32.
        colsum: optional (G, d) fp32 column sums ``c_g``; count: (G,) token counts ``n_g``
            (clamped at 1), both with ``colsum`` or neither.
    Returns: (G, d, b) fp32.
    """
    g, d_q, b = q.shape
    if d_q != d or addr.shape != (g,) or q.dtype != torch.float32:
        raise ValueError(f"upper_bmm: q must be (G={addr.shape[0]}, d={d}, b) fp32, got {tuple(q.shape)} {q.dtype}")
    y = torch.empty((g, d, b), dtype=torch.float32, device=q.device)
    if g == 0 or d == 0 or b == 0:
        return y
    has_c = colsum is not None
    if has_c:
        c_arg = colsum.to(torch.float32).contiguous()
        n_arg = count.to(device=q.device, dtype=torch.float32).reshape(g)
    else:
        c_arg, n_arg = y, y  # unused placeholder pointers

    def grid(meta):
        return (triton.cdiv(d, meta["BLOCK_M"]), triton.cdiv(b, meta["BLOCK_N"]), g)

    with torch.cuda.device(q.device) if q.device.type == "cuda" else contextlib.nullcontext():
        _upper_bmm_kernel[grid](addr, q, c_arg, n_arg, y, d, b,
                                q.stride(0), q.stride(1), q.stride(2), c_arg.stride(0) if has_c else 0,
                                y.stride(0), y.stride(1), y.stride(2),
                                HAS_C=has_c, FP32_PRECISION=FP32_DOT_PRECISION)
    return y


class InPlaceOperand(NamedTuple):
    """One statistic read in place by :func:`upper_bmm` (the ``triton`` backend's ``topk_eigh``
    operand): the (d, d) fp32 matrix and its (1,) address table."""
    cov: Tensor
    addr: Tensor


def prepare_in_place(cov: Tensor):
    """``EigenProducts.prepare`` of the ``triton`` backend: an fp32 contiguous statistic is read
    in place (:class:`InPlaceOperand`, no d x d copy per solve); other dtypes are mirrored
    (:func:`.eigen_steps.symmetrize`)."""
    if supports([cov]):
        return InPlaceOperand(cov, addresses([cov]))
    return symmetrize(cov)


def in_place_operator_matmul(op, q: Tensor, colsum: Optional[Tensor], count) -> Tensor:
    """``EigenProducts.matmul`` of the ``triton`` backend: ``(sym(C) - c c^T / n) q`` (d, b), one
    :func:`upper_bmm` launch for an :class:`InPlaceOperand` and fp32 ``q``; otherwise
    :func:`.eigen_steps.operator_matmul` on the mirrored matrix."""
    if not isinstance(op, InPlaceOperand):
        return operator_matmul(op, q, colsum, count)
    if q.dtype != torch.float32 or q.dim() != 2:
        return operator_matmul(symmetrize(op.cov), q, colsum, count)
    c = n = None
    if colsum is not None:
        c = colsum.reshape(1, -1)
        n = (count if isinstance(count, Tensor) else torch.tensor(float(count))).reshape(1)
    return upper_bmm(op.addr, op.cov.shape[0], q.unsqueeze(0), c, n)[0]
