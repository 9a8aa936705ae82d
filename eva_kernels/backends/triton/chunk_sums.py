"""Per-chunk column sums of shifted rows: the pre-pass of ``cov_update``'s fast shifted path.

For ``x (n, d)`` (any strides, fp16/bf16/fp32), an optional row mask and the shift ``s (d,)``,
with the rows cut into chunks of ``CHUNK`` consecutive rows (chunk ``k`` = rows
``[k CHUNK, (k + 1) CHUNK)``)::

    sums[k, :] = sum_{i in chunk k, mask[i]} (float32(x_i) - s)     (n_chunks, d) fp32
    counts[k]  = #{i in chunk k : mask[i]}                          (n_chunks,)   int32

``cov_update``'s ``precision="fast"`` kernel multiplies the raw 16-bit rows and, at the end of
each chunk, subtracts the shift's rank-2 correction built from these sums (see
:mod:`.cov_update_kernel`). Reading ``x`` once more costs ``2 n d`` bytes against the update's
``n d^2`` multiply-adds (under 1% at d = 4096), and it keeps the update's inner loop a pure
tensor-core loop.

Layout: grid ``(n_chunks, cdiv(d, BLOCK_D))``; each program sums its chunk's rows for
``BLOCK_D`` columns, ``BLOCK_R`` rows per step, masked loads (``other=0``, so NaN/Inf in dropped
rows never reach the sum). Summation order is fixed: results are bit-reproducible.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_D = 128
BLOCK_R = 16
NUM_WARPS = 4


@triton.jit
def _chunk_sums_kernel(x_ptr, mask_ptr, shift_ptr, sums_ptr, counts_ptr,
                       n, d, stride_xn, stride_xd,
                       HAS_MASK: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_R: tl.constexpr):
    chunk = tl.program_id(0)
    cb = tl.program_id(1)
    cols = cb * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < d
    shift = tl.load(shift_ptr + cols, mask=col_ok, other=0.0)
    total = tl.zeros((BLOCK_D,), dtype=tl.float32)
    kept = tl.zeros((BLOCK_R,), dtype=tl.int32)
    start = chunk * CHUNK
    for r0 in range(start, start + CHUNK, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < n
        if HAS_MASK:
            keep = tl.load(mask_ptr + rows, mask=row_ok, other=0)
            row_ok = row_ok & (keep != 0)
        ok = row_ok[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xn + cols.to(tl.int64)[None, :] * stride_xd,
                    mask=ok, other=0.0)
        y = tl.where(ok, x.to(tl.float32) - shift[None, :], 0.0)
        total += tl.sum(y, axis=0)
        kept += row_ok.to(tl.int32)
    tl.store(sums_ptr + chunk.to(tl.int64) * d + cols, total, mask=col_ok)
    if cb == 0:
        tl.store(counts_ptr + chunk, tl.sum(kept, axis=0))


def chunk_sums(x: Tensor, mask: Optional[Tensor], shift: Tensor, chunk: int) -> Tuple[Tensor, Tensor]:
    """``(sums (n_chunks, d) fp32, counts (n_chunks,) int32)`` of ``x`` (module docstring).

    ``mask`` None or a uint8 view of the bool row mask (n,); ``shift`` (d,) fp32 contiguous;
    ``chunk`` a power of two, a multiple of ``BLOCK_R``.
    """
    n, d = x.shape
    n_chunks = triton.cdiv(n, chunk)
    sums = torch.empty((n_chunks, d), dtype=torch.float32, device=x.device)
    counts = torch.empty((n_chunks,), dtype=torch.int32, device=x.device)
    _chunk_sums_kernel[(n_chunks, triton.cdiv(d, BLOCK_D))](
        x, mask if mask is not None else counts, shift, sums, counts, n, d, x.stride(0), x.stride(1),
        HAS_MASK=mask is not None, CHUNK=chunk, BLOCK_D=BLOCK_D, BLOCK_R=BLOCK_R, num_warps=NUM_WARPS)
    return sums, counts
