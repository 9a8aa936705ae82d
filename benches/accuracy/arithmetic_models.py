"""fp32 models of the ways ``cov_update`` can multiply shifted 16-bit rows, on the CPU.

Each model returns ``S = sum_i (x_i - s)(x_i - s)^T`` (d, d) float32 as a GPU would accumulate
it: rows in steps of :data:`K_STEP` (the tensor cores' k-step: one MMA adds 16 products per
entry), each step's exactly summed products added to an fp32 accumulator that is rounded once
per step. ``x`` (n, d) float16/bfloat16, ``s`` (d,) float32.

``accumulate``: ``"nearest"`` (round to nearest even, as Triton's interpreter and CPU fp32 do)
or ``"truncate"`` (toward zero: NVIDIA tensor cores align and truncate in their adders, Fasi et
al. 2021), the biased, pessimistic model.

* :func:`fast` - the raw 16-bit rows, one product each, the shift taken out per chunk of
  ``chunk`` rows (``cov_update(precision="fast")``).
* :func:`split` - ``y = x - s`` as a bf16 ``hi + lo`` pair, three products (the exact path's
  16-bit kernels).
* :func:`rounded` - ``y = x - s`` rounded to bf16 or fp16, one product.

Every model sums a step's products in float64 (16 products of 16-bit values: exact), then
rounds to fp32 - the accumulator's rounding is the only error these models differ in.
"""
from __future__ import annotations

import torch
from torch import Tensor

K_STEP = 16


def _round_fp32(v: Tensor, accumulate: str) -> Tensor:
    """float64 -> float32, to nearest or toward zero."""
    r = v.float()
    if accumulate == "nearest":
        return r
    over = r.double().abs() > v.abs()
    return torch.where(over, torch.nextafter(r, torch.zeros_like(r)), r)


def _accumulate(acc: Tensor, step: Tensor, accumulate: str) -> Tensor:
    return _round_fp32(acc.double() + step, accumulate)


def fast(x: Tensor, s: Tensor, chunk: int = 512, accumulate: str = "nearest") -> Tensor:
    """The one-product path: ``acc += x^T x`` per step; per chunk ``acc -= s z^T + z s^T``,
    ``z = u + (c / 2) s`` with ``u = sum_chunk (x - s)`` (fp32) and ``c`` its row count."""
    n, d = x.shape
    acc = torch.zeros(d, d, dtype=torch.float32)
    xd = x.double()
    for c0 in range(0, n, chunk):
        rows = xd[c0:c0 + chunk]
        for k0 in range(0, rows.shape[0], K_STEP):
            blk = rows[k0:k0 + K_STEP]
            acc = _accumulate(acc, blk.T @ blk, accumulate)
        u = (x[c0:c0 + chunk].float() - s).sum(0)
        z = u + (0.5 * rows.shape[0]) * s
        acc = acc - (s[:, None] * z[None, :] + z[:, None] * s[None, :])
    return acc


def split(x: Tensor, s: Tensor, accumulate: str = "nearest") -> Tensor:
    """Three products of the bf16 split ``y ~= hi + lo`` (``lo_a lo_b`` dropped)."""
    y = x.float() - s
    hi = y.bfloat16().float()
    lo = (y - hi).bfloat16().float()
    d = y.shape[1]
    acc = torch.zeros(d, d, dtype=torch.float32)
    for k0 in range(0, y.shape[0], K_STEP):
        h, lo_k = hi[k0:k0 + K_STEP].double(), lo[k0:k0 + K_STEP].double()
        acc = _accumulate(acc, h.T @ h + h.T @ lo_k + lo_k.T @ h, accumulate)
    return acc


def rounded(x: Tensor, s: Tensor, dtype: torch.dtype, accumulate: str = "nearest") -> Tensor:
    """``y = x - s`` rounded to ``dtype`` (bf16 or fp16), one product per pair."""
    y = (x.float() - s).to(dtype).double()
    acc = torch.zeros(y.shape[1], y.shape[1], dtype=torch.float32)
    for k0 in range(0, y.shape[0], K_STEP):
        blk = y[k0:k0 + K_STEP]
        acc = _accumulate(acc, blk.T @ blk, accumulate)
    return acc
