"""Per-group eigen-estimates: one warm-started solve per group per step, one host sync per step.

:meth:`Solver.solve_all` solves the groups due at a step. With ``EvaOptions.batch_solves``
(default on GPUs) every width's groups run together as :class:`eva_kernels.SubspaceBatch`
chunks driven by :func:`eva_kernels.solve_batches`, whose small eigenproblems are solved in one
place (``EvaOptions.rayleigh_ritz``: on the host in one transfer per round, the CUDA default),
with batched bookkeeping, so the launches per step grow with the number of distinct widths, not
of layers; otherwise one :func:`eva_kernels.topk_eigh` per group. :meth:`Solver.polish` does the
final solves to ``final_tol`` the same way (batched: one host sync per round for every width).
Either leaves device tensors in ``group.estimate.pending`` (eigenvalues, the variance terms of
:mod:`eva.engine.variance_floor`, token count, a finiteness flag, cosines with the previous
estimate); :meth:`Solver.sync` brings all of them to the host in one transfer per device and
raises if a group saw NaN/Inf. Explained variance ratios are formed on the host by
:func:`eva.engine.variance_floor.apply_variance_floor`, which needs every group's variance at once.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import Tensor

import eva_kernels

from .. import distributed as dist_utils
from ..config import EvaOptions
from ..errors import EvaError
from .state import GroupState
from .statistics import variance_terms_batched
from .variance_floor import resolution


def _nan_error(members, step: int) -> EvaError:
    return EvaError(f"layer(s) {members}: NaN or Inf in the input activations at batch {step} (after masking); "
                    "check the model's dtype (fp16 overflow?) and the data")


def _finite(diag: Tensor, colsum: Tensor) -> Tensor:
    """0-d bool on the statistic's device: colsum and the diagonal of cov are finite (a NaN/Inf
    token makes both non-finite, so the d^2 off-diagonal need not be read)."""
    return torch.isfinite(colsum).all() & torch.isfinite(diag).all()


def _polished(group: GroupState, res):
    """A polish's :class:`eva_kernels.EighBasis` with the group's ``max_components`` leading Ritz
    pairs as its eigenpairs (more than the wanted ones when fewer were asked: those met the
    tolerance, the others are the Rayleigh-Ritz values of the same, better, subspace); records
    the wanted pairs' residual in ``group.estimate.polished_residual``."""
    m = group.max_components
    group.estimate.polished_residual = res.residual
    return res._replace(eigenvalues=res.ritz_values[:m], eigenvectors=res.basis[:m])


def batched_solves(option, device_type: str, distributed: bool = False) -> bool:
    """``EvaOptions.batch_solves`` resolved for statistics on ``device_type``: "auto" batches on
    GPUs (launch-bound) and in distributed runs (one all-reduce per iteration and width instead
    of one per group: collectives are latency-bound)."""
    return (device_type != "cpu" or distributed) if option == "auto" else bool(option)


def rayleigh_ritz_for(option: str, device_type: str) -> str:
    """``EvaOptions.rayleigh_ritz`` resolved: "auto" is "host" on CUDA, "device" elsewhere."""
    return ("host" if device_type == "cuda" else "device") if option == "auto" else option


class Solver:
    """Runs the solves of one run with the options and the backend resolved for it.

    Args:
        opts: the engine options (oversample, iters, seed, final_tol, final_max_iters, final_krylov_depth).
        backend: the resolved :class:`eva_kernels.Backend` of ``topk_eigh``.
        orthonormalization: the algorithm between products (``eva_kernels.ORTHONORMALIZATIONS``).
        traffic: in a distributed run, the rank's :class:`eva.distributed.Traffic`: the solves
            all-reduce products with the statistics (never the statistics); None: one process.
        device_type: where the statistics live (``batch_solves="auto"`` batches on GPUs only).
    """

    def __init__(self, opts: EvaOptions, backend: eva_kernels.Backend, orthonormalization: str,
                 traffic: Optional[dist_utils.Traffic], device_type: str = "cpu"):
        self.opts = opts
        self.backend = backend
        self.orthonormalization = orthonormalization
        self.traffic = traffic
        self.distributed = traffic is not None
        #: whether the solves of groups sharing a shape run batched (:meth:`_run_batched`)
        self.batched = batched_solves(opts.batch_solves, device_type, self.distributed)
        #: where batched solves solve their small eigenproblems (EvaOptions.rayleigh_ritz resolved)
        self.rayleigh_ritz = rayleigh_ritz_for(opts.rayleigh_ritz, device_type)
        #: products per cycle of the polish (EvaOptions.final_krylov_depth resolved for the device)
        self.krylov_depth = eva_kernels.krylov_depth_for(device_type, opts.final_krylov_depth)
        #: how the batched solves' products ran ("mirror", "upper"; with a fallback's reason)
        self.products_used: Dict[str, None] = {}
        #: where their small eigenproblems ran (the resolved route; with a fallback's reason)
        self.small_eigh_used: Dict[str, None] = {}

    def solve_all(self, groups: List[GroupState], step: int) -> None:
        """Streaming solves of ``groups`` at ``step``: batched (every width together, one
        Rayleigh-Ritz place per round, see :meth:`_run_batched`), or one per group."""
        if not self.batched:
            for g in groups:
                self.solve(g, step)
            return
        self._run_batched(groups, step, final=False)

    @staticmethod
    def _buckets(groups: List[GroupState]) -> List[List[GroupState]]:
        """``groups`` split into sets that can be solved together (width, rank, dtype, device, mode)."""
        buckets: Dict[tuple, List[GroupState]] = {}
        for g in groups:
            cov = g.stats.cov
            buckets.setdefault((cov.device, cov.dtype, cov.shape[0], g.max_components, g.stats.centered), []).append(g)
        return list(buckets.values())

    def _vectors(self, groups: List[GroupState]):
        """Stacked (diag, colsum, count) of ``groups`` (summed over ranks in a distributed run),
        and the ``reduce`` of the products."""
        stats = [g.stats for g in groups]
        diag = torch.stack([torch.diagonal(s.cov) for s in stats])
        colsum = torch.stack([s.colsum for s in stats])
        count = torch.stack([s.count for s in stats])
        if not self.distributed:
            return diag, colsum, count, None
        colsum, count, diag = dist_utils.reduced_vectors(colsum, count, diag, self.traffic)
        return diag, colsum, count, self.traffic.all_reduce

    def _run_batched(self, groups: List[GroupState], step: int, final: bool, tol: Optional[float] = None,
                     wanted: Optional[Dict[int, int]] = None) -> int:
        """Every width's groups in :class:`eva_kernels.SubspaceBatch` chunks, run together by
        :func:`eva_kernels.solve_batches` (streaming: ``iters`` products; ``final``: to ``tol``
        for the ``wanted`` leading pairs, see :meth:`polish`), then their pending values recorded
        in batched ops. Returns the rounds."""
        opts, plans = self.opts, []
        for members in self._buckets(groups):
            diag, colsum, count, reduce = self._vectors(members)
            cov = members[0].stats.cov
            centred = members[0].stats.centered
            products = eva_kernels.resolve_products(opts.batched_products, [g.stats.cov for g in members])
            per = len(members) if products == "upper" else (  # "mirror" builds symmetric copies: bounded
                max(1, int(opts.solve_batch_bytes // max(1, cov.shape[0] ** 2 * cov.element_size()))))
            for lo in range(0, len(members), per):
                part = slice(lo, lo + per)
                batch = eva_kernels.SubspaceBatch(
                    [g.stats.cov for g in members[part]], members[0].max_components,
                    colsums=list(colsum[part]) if centred else None, counts=list(count[part]) if centred else None,
                    inits=[g.estimate.basis for g in members[part]], oversample=opts.oversample,
                    wanted=None if not wanted else [wanted.get(g.index, g.max_components) for g in members[part]],
                    iters=1 if final else opts.iters, seed=opts.seed if final else opts.seed + step,
                    method=self.orthonormalization, tol=(tol or opts.final_tol) if final else None,
                    max_iters=opts.final_max_iters, reduce=reduce, krylov_depth=self.krylov_depth,
                    products=products)
                plans.append((members[part], batch, diag[part], colsum[part], count[part]))
        try:
            rounds = eva_kernels.solve_batches([p[1] for p in plans], self.rayleigh_ritz)
        except RuntimeError as exc:  # LAPACK refuses NaN/Inf: name the layers whose statistics hold them
            for g in groups:
                if not bool(_finite(torch.diagonal(g.stats.cov), g.stats.colsum)):
                    raise _nan_error(g.members, step) from exc
            raise
        for p in plans:
            op = p[1].operand_used
            self.products_used[op.kind if op.fallback is None else f"mirror (upper fell back: {op.fallback})"] = None
            if p[1].ritz_fallback is not None:
                self.small_eigh_used[f"host (device eigh fell back: {p[1].ritz_fallback})"] = None
                self.rayleigh_ritz = "host"  # the next steps go straight to the host
            else:
                self.small_eigh_used[self.rayleigh_ritz] = None
        for members, batch, diag, colsum, count in plans:
            self._record_batch(members, batch.results, diag, colsum, count, final=final)
        return rounds

    def _record_batch(self, groups: List[GroupState], res, diag: Tensor, colsum: Tensor, count: Tensor,
                      final: bool) -> None:
        """Store ``res`` (one :class:`EighBasis` per group) and the pending values of ``groups``
        in batched ops: eigenvalues, variance terms, token count, finiteness, and (streaming) the
        cosines with the previous estimate; a polish keeps all ``max_components`` leading Ritz
        pairs (:func:`_polished`) and their residual."""
        cosines = not final
        if final:
            res = [_polished(g, r) for g, r in zip(groups, res)]
        stats = [g.stats for g in groups]
        centred = stats[0].centered
        shifts = [s.shift for s in stats]
        shift = torch.stack(shifts) if centred and all(x is not None for x in shifts) else None
        var = variance_terms_batched(centred, diag, colsum, count, shift,
                                     [resolution(s.input_roundoff) for s in stats])
        finite = (torch.isfinite(colsum).all(-1) & torch.isfinite(diag).all(-1)).to(torch.float64)
        ratio = (eva_kernels.moment_ratio(diag, colsum, count, shift)
                 if shift is not None and stats[0].precision != "exact" else None)
        eig = torch.stack([r.eigenvalues for r in res]).to(torch.float64)
        vecs = torch.stack([r.eigenvectors for r in res])
        prev = [g.estimate.components for g in groups]
        cos = (eva_kernels.component_cosines(torch.stack(prev), vecs).to(torch.float64)
               if cosines and all(p is not None for p in prev) else None)
        counts64 = count.to(torch.float64)
        for i, (g, r) in enumerate(zip(groups, res)):
            est = g.estimate
            est.pending = {"eig": eig[i], "var": var[i], "count": counts64[i].reshape(1), "finite": finite[i].reshape(1)}
            if ratio is not None:
                est.pending["ratio"] = ratio[i].reshape(1)
            if cos is not None:
                est.pending["cos"] = cos[i]
            elif cosines and est.components is not None:
                est.pending["cos"] = eva_kernels.component_cosines(est.components, r.eigenvectors).to(torch.float64)
            est.basis = r.basis
            est.components = r.eigenvectors
            est.eigenvalues = r.eigenvalues

    def polish(self, groups: List[GroupState], step: int, tol: Optional[float] = None,
               wanted: Optional[Dict[int, int]] = None) -> int:
        """Final solves of ``groups`` to ``tol`` (default ``final_tol``), warm-started from their
        current basis; returns the rounds of a batched polish (0 per group).

        ``wanted``: group index -> the leading pairs that must meet ``tol`` (default all
        ``max_components``; :mod:`eva.engine.polish_plan` asks for fewer where the allocation
        cannot keep the rest). The block stays ``max_components + oversample`` either way, and
        every group keeps its ``max_components`` leading Ritz pairs. Records in each estimate its
        wanted pairs' worst residual relative to theta_1 (``polished_residual``: at most ``tol``
        unless the polish stopped at ``final_max_iters``).

        Batched solves: every width iterates together, with one Rayleigh-Ritz place and at most
        one host synchronisation per round for all of them (:meth:`_run_batched`); otherwise
        one :func:`eva_kernels.topk_eigh` per group, whose residual test syncs every iteration.
        Leaves pending values for :meth:`sync`, like the streaming solves.
        """
        if not self.batched:
            for g in groups:
                self.solve(g, step, final=True, tol=tol, wanted=(wanted or {}).get(g.index))
            return 0
        return self._run_batched(groups, step, final=True, tol=tol, wanted=wanted)

    def solve(self, group: GroupState, step: int, final: bool = False, tol: Optional[float] = None,
              wanted: Optional[int] = None) -> None:
        """Re-estimate ``group``'s top ``max_components`` eigenpairs (no host sync on the normal path).

        When the eigensolver fails (LAPACK raises on NaN/Inf on CPU) and the statistics are not
        finite, the error raised names the group's layers instead.
        """
        try:
            self._solve(group, step, final, tol, wanted)
        except RuntimeError as exc:
            if not bool(_finite(torch.diagonal(group.stats.cov), group.stats.colsum)):
                raise _nan_error(group.members, step) from exc
            raise

    def _solve(self, group: GroupState, step: int, final: bool, tol: Optional[float] = None,
               wanted: Optional[int] = None) -> None:
        stats, est, opts = group.stats, group.estimate, self.opts
        cov, colsum, count, diag = stats.cov, stats.colsum, stats.count, torch.diagonal(stats.cov)
        reduce = None
        if self.distributed:  # sketches, not the statistic: see eva.distributed
            colsum, count, diag = dist_utils.reduced_vectors(colsum, count, diag, self.traffic)
            reduce = self.traffic.all_reduce
        c_sum, c_cnt = stats.centring(colsum, count)
        common = dict(colsum=c_sum, count=c_cnt, init=est.basis, oversample=opts.oversample, return_basis=True,
                      backend=self.backend, orthonormalization=self.orthonormalization, reduce=reduce)
        if final:  # polish to a residual tolerance, warm-started from the current basis
            k = group.max_components if wanted is None else wanted
            tol = tol or opts.final_tol
            common["oversample"] += group.max_components - k  # the same block b whatever k
            res = _polished(group, eva_kernels.topk_eigh(
                cov, k, iters=1, seed=opts.seed, tol=tol, max_iters=opts.final_max_iters,
                krylov_depth=self.krylov_depth, **common))
        else:
            res = eva_kernels.topk_eigh_step(cov, group.max_components, iters=opts.iters, seed=opts.seed + step,
                                             **common)
        pending = {
            "eig": res.eigenvalues.to(torch.float64),
            "var": stats.variance_terms(diag, colsum, count),
            "count": count.to(torch.float64).reshape(1),
            "finite": _finite(diag, colsum).to(torch.float64).reshape(1),
        }
        if stats.shift is not None and stats.precision != "exact":  # R, for statistics_precision
            pending["ratio"] = eva_kernels.moment_ratio(diag, colsum, count, stats.shift).reshape(1)
        if est.components is not None and not final:
            pending["cos"] = eva_kernels.component_cosines(est.components, res.eigenvectors).to(torch.float64)
        est.pending = pending
        est.basis = res.basis
        est.components = res.eigenvectors
        est.eigenvalues = res.eigenvalues

    @staticmethod
    def sync(groups: List[GroupState], step: int) -> None:
        """One device->host transfer per device for every pending value of ``groups``."""
        by_device: Dict[torch.device, List[GroupState]] = {}
        for g in groups:
            by_device.setdefault(g.estimate.pending["count"].device, []).append(g)
        for dev_groups in by_device.values():
            pieces = [g.estimate.pending[k].reshape(-1) for g in dev_groups for k in sorted(g.estimate.pending)]
            flat = torch.cat(pieces).to("cpu", copy=True).tolist()  # one op and one copy (counted on CPU too)
            pos = 0
            for g in dev_groups:
                est, vals = g.estimate, {}
                for key in sorted(est.pending):
                    n = est.pending[key].numel()
                    vals[key] = flat[pos:pos + n]
                    pos += n
                est.pending = {}
                if vals["finite"][0] != 1.0:
                    raise _nan_error(g.members, step)
                est.eigenvalues_host = vals["eig"]
                est.variance = tuple(vals["var"])
                est.tokens = int(round(vals["count"][0]))
                if "cos" in vals:
                    est.cosines = vals["cos"]
                if "ratio" in vals and g.stats is not None:
                    g.stats.observe_ratio(vals["ratio"][0])
