"""torch.distributed helpers: statistics are summed across ranks (exact), never gathered.

Each rank accumulates its own tokens; before a solve the group's (cov, colsum, count) are
all-reduced into temporaries, so every rank solves the same global problem and takes the
same convergence decisions (hooks and early stops stay in lockstep). The shift is the
global mean of the first batch, agreed with two all-reduces inside the first forward.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor


def active(gather_distributed_inputs: bool) -> bool:
    """True when the run sums statistics over the ranks of an initialised process group."""
    return bool(gather_distributed_inputs) and dist.is_available() and dist.is_initialized()


def masked_sum_and_count(x: Tensor, mask: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """``(sum of the kept rows (d,) fp32, kept-row count 0-d fp32)`` of ``x`` (n, d); no host sync.

    Dropped rows are removed with a select, so NaN/Inf in them cannot leak into the sum.
    """
    xf = x.to(torch.float32)
    if mask is None:
        return xf.sum(0), torch.tensor(float(x.shape[0]), device=x.device)
    return torch.where(mask.unsqueeze(1), xf, xf.new_zeros(())).sum(0), mask.sum().to(torch.float32)


def global_mean(x: Tensor, mask: Optional[Tensor]) -> Tensor:
    """Mean of the kept rows over every rank (two values all-reduced: the sum and the count)."""
    total, n = masked_sum_and_count(x, mask)
    s = torch.cat([total, n.reshape(1)])
    dist.all_reduce(s)
    return s[:-1] / s[-1].clamp_min(1)


def reduced_stats(cov: Tensor, colsum: Tensor, count: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Sums over ranks, into new tensors (the local running sums stay untouched)."""
    g_cov = cov.clone()
    # float64 carries token counts exactly up to 2**53 (float32 only up to 2**24)
    g_vec = torch.cat([colsum.to(torch.float64), count.to(torch.float64).reshape(1)])
    dist.all_reduce(g_cov)
    dist.all_reduce(g_vec)
    return g_cov, g_vec[:-1].to(torch.float32).contiguous(), g_vec[-1].round().to(torch.int64)


def collective_device() -> torch.device:
    """Where small collectives' tensors live: the current CUDA device under NCCL, else CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any rank (one all-reduce)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)
