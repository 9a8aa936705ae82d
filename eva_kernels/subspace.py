"""Small helpers on sets of components stored as rows (k, d).

All run on the tensors' device without host synchronisation.
"""
from __future__ import annotations

import torch
from torch import Tensor


def component_cosines(prev: Tensor, cur: Tensor) -> Tensor:
    """Absolute cosine between matching rows: ``|<prev_i, cur_i>| / (|prev_i| |cur_i|)``.

    prev, cur: (k, d). Returns (k,) in fp32. This is EVA's convergence statistic: the
    paper stops a layer when every needed component's cosine with the previous estimate
    is at least tau. Absolute value makes it independent of sign conventions.
    """
    p = prev.to(torch.float32)
    c = cur.to(torch.float32)
    num = (p * c).sum(-1).abs()
    den = p.norm(dim=-1) * c.norm(dim=-1)
    return num / den.clamp_min(torch.finfo(torch.float32).tiny)


def subspace_overlap(a: Tensor, b: Tensor) -> Tensor:
    """Overlap of the row spaces of ``a`` (k, d) and ``b`` (k, d), both with orthonormal rows.

    ``||a b^T||_F^2 / k``: the mean squared cosine of the principal angles; 1 when the
    spans agree, ~k/d for random subspaces. Computed in float64.
    """
    if a.shape[0] == 0:
        return torch.ones((), dtype=torch.float64, device=a.device)
    m = a.to(torch.float64) @ b.to(torch.float64).mT
    return (m * m).sum() / a.shape[0]


def fix_signs(vectors: Tensor) -> Tensor:
    """Deterministic signs for rows of ``vectors`` (k, d): the largest-|.| entry of each row is positive."""
    if vectors.numel() == 0:
        return vectors
    idx = vectors.abs().argmax(dim=-1, keepdim=True)
    sign = torch.sign(torch.gather(vectors, -1, idx))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return vectors * sign
