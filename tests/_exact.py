"""Exact PCA of the tokens a run consumed, for comparing engine results (float64 SVD)."""
from __future__ import annotations

import torch

from eva_kernels import subspace_overlap


def exact_components(rows_list, k: int, centered: bool = True):
    y = torch.cat(rows_list)
    if centered:
        y = y - y.mean(0, keepdim=True)
    _, s, vh = torch.linalg.svd(y, full_matrices=False)
    return s, vh[:k], y.shape[0]


def check_against_exact(sd, seen, centered=True, min_overlap=0.999):
    """Every layer's components span the exact top-rank PCA subspace of its group's tokens."""
    worst = 1.0
    layers = sd.metadata["layers"]
    for name, comp in sd.items():
        rank = comp.shape[0]
        if rank == 0:
            continue
        leader = layers[name]["group"]
        s, exact, n = exact_components(seen[leader], rank, centered)
        assert n == layers[name]["tokens"], (name, n, layers[name]["tokens"])
        ov = float(subspace_overlap(comp.double(), exact))
        worst = min(worst, ov)
        assert ov >= min_overlap, f"{name}: overlap {ov:.6f} with exact PCA (rank {rank}, {n} tokens)"
        total = (s ** 2).sum()
        evr = torch.tensor(layers[name]["explained_variance_ratio"][:rank], dtype=torch.float64)
        torch.testing.assert_close(evr, (s[:rank] ** 2) / total, rtol=2e-3, atol=1e-6)
    return worst
