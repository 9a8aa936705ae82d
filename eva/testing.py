"""Checking engine results against the exact PCA of the tokens a run consumed (tests, benches).

    recorder = TokenRecorder()
    sd = eva.get_eva_state_dict(model, loader, cfg, observers=[recorder])
    worst = check_against_exact(sd, recorder)

:class:`TokenRecorder` is an :class:`eva.EvaObserver` that keeps, per group leader, the float64
rows (after masking) each statistic consumed; :func:`check_against_exact` compares every
layer's components and explained variance ratios with :func:`eva_kernels.testing.exact_pca`.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import Tensor

from eva_kernels import subspace_overlap
from eva_kernels.testing import exact_pca

from .engine.observer import EvaObserver


class TokenRecorder(EvaObserver, dict):
    """``{group leader: [float64 rows (n_i, d) on CPU, one entry per accumulation]}``."""

    def on_rows(self, group, rows: Tensor, mask: Optional[Tensor]) -> None:
        kept = rows.detach().to(torch.float64)
        if mask is not None:
            kept = kept[mask]
        self.setdefault(group.leader, []).append(kept.cpu())


def overlaps_with_exact(sd, seen: Dict[str, List[Tensor]], centered: bool = True) -> Dict[str, float]:
    """Per layer with rank > 0: subspace overlap of its components with the exact top-rank PCA."""
    out = {}
    for name, comp in sd.items():
        if comp.shape[0]:
            _, exact, _ = exact_pca(seen[sd.metadata["layers"][name]["group"]], comp.shape[0], centered)
            out[name] = float(subspace_overlap(comp.double().cpu(), exact))
    return out


def check_against_exact(sd, seen: Dict[str, List[Tensor]], centered: bool = True, min_overlap: float = 0.999) -> float:
    """Every layer's components span the exact top-rank PCA subspace of its group's tokens, with
    the same token count and explained variance ratios. Returns the worst overlap."""
    worst = 1.0
    layers = sd.metadata["layers"]
    for name, comp in sd.items():
        rank = comp.shape[0]
        if rank == 0:
            continue
        s, exact, n = exact_pca(seen[layers[name]["group"]], rank, centered)
        assert n == layers[name]["tokens"], (name, n, layers[name]["tokens"])
        ov = float(subspace_overlap(comp.double().cpu(), exact))
        worst = min(worst, ov)
        assert ov >= min_overlap, f"{name}: overlap {ov:.6f} with exact PCA (rank {rank}, {n} tokens)"
        total = (s ** 2).sum()
        evr = torch.tensor(layers[name]["explained_variance_ratio"][:rank], dtype=torch.float64)
        torch.testing.assert_close(evr, (s[:rank] ** 2) / total, rtol=2e-3, atol=1e-6)
    return worst
