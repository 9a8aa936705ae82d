"""Per-group eigen-estimates: one warm-started solve per group per step, one host sync per step.

``solve_group`` leaves device tensors in ``group.pending`` (eigenvalues, the variance terms of
:mod:`eva.variance_floor`, token count, a finiteness flag, cosines with the previous estimate);
``sync_groups`` brings all of them to the host in one transfer per device and raises if a group
saw NaN/Inf. Explained variance ratios are formed on the host by
:func:`eva.variance_floor.apply_variance_floor`, which needs every group's variance at once.
"""
from __future__ import annotations

from typing import Dict, List

import torch

import eva_kernels

from . import distributed as dist_utils
from .config import EvaOptions
from .errors import EvaError
from .groups import Group


def _nan_error(members, step: int) -> EvaError:
    return EvaError(f"layer(s) {members}: NaN or Inf in the input activations at batch {step} (after masking); "
                    "check the model's dtype (fp16 overflow?) and the data")


def _solve(group: Group, opts: EvaOptions, step: int, distributed: bool, final: bool) -> None:
    stats = group.stats
    cov, colsum, count = stats.cov, stats.colsum, stats.count
    if distributed:
        cov, colsum, count = dist_utils.reduced_stats(cov, colsum, count)
    c_sum, c_cnt = stats.centring(colsum, count)
    k = group.max_components
    if final:  # polish to a residual tolerance, warm-started from the streaming basis
        res = eva_kernels.topk_eigh(
            cov, k, colsum=c_sum, count=c_cnt, init=group.basis, oversample=opts.oversample, iters=1,
            seed=opts.seed, tol=opts.final_tol, max_iters=opts.final_max_iters, return_basis=True,
            backend=opts.backend)
    else:
        res = eva_kernels.topk_eigh(
            cov, k, colsum=c_sum, count=c_cnt, init=group.basis, oversample=opts.oversample, iters=opts.iters,
            seed=opts.seed + step, return_basis=True, backend=opts.backend)
    pending = {
        "eig": res.eigenvalues.to(torch.float64),
        "var": stats.variance_terms(cov, colsum, count),
        "count": count.to(torch.float64).reshape(1),
        "finite": torch.isfinite(colsum).all().to(torch.float64).reshape(1)
        * torch.isfinite(torch.diagonal(cov)).all().to(torch.float64),
    }
    if group.components is not None and not final:
        pending["cos"] = eva_kernels.component_cosines(group.components, res.eigenvectors).to(torch.float64)
    group.pending = pending
    group.basis = res.basis
    group.components = res.eigenvectors
    group.eigenvalues = res.eigenvalues


def solve_group(group: Group, opts: EvaOptions, step: int, distributed: bool, final: bool = False) -> None:
    """Re-estimate ``group``'s top ``max_components`` eigenpairs (no host sync on the normal path).

    When the eigensolver fails (LAPACK raises on NaN/Inf on CPU) and the statistics are not
    finite, the error raised names the group's layers instead.
    """
    try:
        _solve(group, opts, step, distributed, final)
    except RuntimeError as exc:
        st = group.stats
        if not (bool(torch.isfinite(st.colsum).all()) and bool(torch.isfinite(torch.diagonal(st.cov)).all())):
            raise _nan_error(group.members, step) from exc
        raise


def sync_groups(groups: List[Group], step: int) -> None:
    """One device->host transfer per device for every pending value of ``groups``."""
    by_device: Dict[torch.device, List[Group]] = {}
    for g in groups:
        by_device.setdefault(g.pending["count"].device, []).append(g)
    for dev_groups in by_device.values():
        flat = torch.cat([torch.cat([g.pending[k].reshape(-1) for k in sorted(g.pending)])
                          for g in dev_groups]).cpu().tolist()
        pos = 0
        for g in dev_groups:
            vals = {}
            for key in sorted(g.pending):
                n = g.pending[key].numel()
                vals[key] = flat[pos:pos + n]
                pos += n
            g.pending = {}
            if vals["finite"][0] != 1.0:
                raise _nan_error(g.members, step)
            g.eigenvalues_host = vals["eig"]
            g.variance = tuple(vals["var"])
            g.tokens = int(round(vals["count"][0]))
            if "cos" in vals:
                g.cosines = vals["cos"]
