"""Subspace iteration on many matrices at once, with every Rayleigh-Ritz of a round in one place.

:class:`SubspaceBatch` holds ``G`` matrices of one size (read in place by one Triton launch per
product on CUDA, or their symmetric copies stacked: :mod:`eva_kernels.ops.batch_operand`) and
iterates them together; :func:`solve_batches` drives several batches (several widths) in
rounds, and gathers the small eigenproblems of a round so that they cost at most one host
synchronisation for all of them:

* ``rayleigh_ritz="device"``: ``torch.linalg.eigh`` of each batch's ``(G, b, b)`` projected
  matrices on the matrices' device, residuals on the device, and (polish only) every batch's
  verdicts read in one transfer per round. On CUDA, ``eigh`` itself synchronises, and beyond
  ``b = 32`` loops matrix by matrix (cuSOLVER's batched Jacobi stops at 32).
* ``rayleigh_ritz="host"``: the projected matrices ``T = K^T A K`` (and, when polishing, ``G =
  (AK)^T AK`` and ``M = K^T K``) of every batch, in float64, go to the host in one transfer;
  the eigenproblems and the residual test are solved there
  (:func:`eva_kernels.block_krylov.residual_norms`, exact for the stored vectors), and the Ritz
  vectors' coefficients come back. One host synchronisation per round, at any ``b``.

Per matrix the algorithm is :func:`eva_kernels.topk_eigh`'s: warm start, ``iters`` products with
an orthonormalisation between them, Rayleigh-Ritz; with ``tol``, further cycles of
``krylov_depth`` products building a block Krylov basis ``K`` (:mod:`eva_kernels.block_krylov`),
each ended by a Rayleigh-Ritz on ``K`` and the residual test ``||A v - theta v|| <= tol *
theta_1`` for every wanted pair, until the test passes or ``max_iters`` products were made.
A round is one product per running matrix; a batch's Rayleigh-Ritz is due at 1, 2 and every 4
products of a cycle and at its end. Finished matrices leave their batch (it is compacted once
per round in which some finish).
"""
from __future__ import annotations

import contextlib
import threading
import warnings
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .. import block_krylov
from ..block_krylov import extend_basis, is_checkpoint, krylov_depth_for, usable_depth
from ..linalg import orthonormalize
from ..transfer import from_values, to_device
from ..subspace import fix_signs
from .batch_operand import MirroredStack, batch_operand, subtract_centring, symmetric_stack
from .topk_eigh import EighBasis

RAYLEIGH_RITZ = ("device", "host")

_host = threading.local()


@contextlib.contextmanager
def on_host():
    """Marks computation on host copies (not device work): :class:`eva_kernels.launches.LaunchCounter`
    counts no launch or sync inside."""
    before = getattr(_host, "active", False)
    _host.active = True
    try:
        yield
    finally:
        _host.active = before


def computing_on_host() -> bool:
    """Whether the caller is inside :func:`on_host`."""
    return getattr(_host, "active", False)


class SubspaceBatch:
    """``G`` matrices of one size iterated together (see the module docstring).

    Args:
        covs: ``G`` (d, d) upper triangles, one dtype and device (checked by the callers).
        k: wanted eigenpairs per matrix; block ``b = min(d, k + oversample)``.
        colsums, counts: optional centring per matrix: ``sym(cov) - c c^T / n``.
        inits: per matrix ``None`` or (m, d) rows of a previous estimate (warm start).
        iters: products before the first Rayleigh-Ritz.
        seed: seed of the Gaussian columns (the same columns for every matrix).
        method: the orthonormalisation, resolved (``householder`` / ``cholesky_qr3``).
        tol, max_iters: with ``tol``, polish to the residual tolerance, at most ``max_iters``
            products; without, stop after ``iters``.
        reduce: sum of the products over the parts of a distributed matrix.
        krylov_depth: products per polishing cycle (:func:`eva_kernels.topk_eigh`'s argument).
        products: how ``A Q`` is computed: ``"mirror"``, ``"upper"`` (in place, no d x d copy) or
            ``"auto"`` (:mod:`eva_kernels.ops.batch_operand`); :attr:`operand` says which runs.
        wanted: per matrix, how many of the ``k`` leading pairs the residual test covers (each
            ``<= k``; default all ``k``): a polish that needs fewer exact pairs for some matrices
            (``eva.engine.polish_plan``) keeps them in the same batch. Results still hold ``k``.
    """

    def __init__(self, covs: Sequence[Tensor], k: int, *, colsums=None, counts=None, inits=None,
                 oversample: int = 8, iters: int = 2, seed: int = 0, method: str = "householder",
                 tol: Optional[float] = None, max_iters: int = 64,
                 reduce: Optional[Callable[[Tensor], Tensor]] = None, krylov_depth: Union[int, str] = "auto",
                 products: str = "auto", wanted: Optional[Sequence[int]] = None):
        d, dtype, device = covs[0].shape[0], covs[0].dtype, covs[0].device
        self.k, self.b, self.method, self.reduce, self.tol = k, min(d, k + oversample), method, reduce, tol
        self.iters = max(int(iters), 1)
        self.max_iters = max(int(max_iters), self.iters) if tol is not None else self.iters
        self.depth = 1 if tol is None else usable_depth(d, self.b, krylov_depth_for(device.type, krylov_depth))
        self.products = 0
        self.index = list(range(len(covs)))       # the matrices still running, as positions in covs
        self.wanted = None if wanted is None else [min(int(w), k) for w in wanted]  # per position in covs
        self.results: List[Optional[EighBasis]] = [None] * len(covs)
        self.covs = list(covs)
        self.operand = batch_operand(covs, products)  # the running matrices' products
        self.operand_used = self.operand  # what ran (kept when the batch finishes; see :meth:`_product`)
        #: why :func:`solve_batches` moved this batch's small eigenproblems to the host (None: it did not)
        self.ritz_fallback: Optional[str] = None
        self._checked = self.operand.kind == "mirror"  # an "upper" operand's first launch may fall back
        self.c = self.n = None
        if colsums is not None:
            self.c = torch.stack([x.to(dtype) for x in colsums])
            self.n = torch.stack([torch.as_tensor(x, device=device).to(dtype).reshape(())
                                  for x in counts]).clamp_min(1)
        gen = torch.Generator(device=device)
        gen.manual_seed(int(seed))
        g = len(covs)
        q = torch.randn(d, self.b, generator=gen, device=device, dtype=dtype).expand(g, d, self.b).clone()
        if inits is not None:
            rows = [None if x is None else min(x.shape[0], self.b) for x in inits]
            if all(r == self.b for r in rows):
                q = torch.stack([x[:self.b].to(dtype) for x in inits]).mT.contiguous()
            else:
                for i, (x, r) in enumerate(zip(inits, rows)):
                    if x is not None:
                        q[i, :, :r] = x[:r].to(dtype).mT
        self.blocks: List[Tensor] = [orthonormalize(q, method)]  # this cycle's basis K, block by block
        self.images: List[Tensor] = []                               # AK, block by block

    @property
    def running(self) -> int:
        """Matrices not finished yet."""
        return len(self.index)

    @property
    def device(self) -> torch.device:
        return self.blocks[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.blocks[0].dtype

    def _product(self, q: Tensor) -> Tensor:
        """``A Q`` for every running matrix (centred; summed over parts with ``reduce``: the
        centring is applied after the sum, so it is fused into the product only without one)."""
        if not self._checked:
            self._checked = True
            try:
                return self._apply(q)
            except Exception as exc:  # noqa: BLE001 - a kernel this GPU cannot compile or launch
                stack = symmetric_stack([self.covs[i] for i in self.index])
                reason = f"{type(exc).__name__}: {str(exc)[:200]}"
                warnings.warn(f"eva_kernels: the in-place batched products (products='upper') cannot run here "
                              f"({reason}); using symmetric copies (products='mirror') instead")
                self.operand = MirroredStack(stack=stack, fallback=reason)
                self.operand_used = self.operand
        return self._apply(q)

    def _apply(self, q: Tensor) -> Tensor:
        if self.reduce is None:
            return self.operand.matmul(q, self.c, self.n)
        return subtract_centring(self.reduce(self.operand.matmul(q, None, None)), q, self.c, self.n)

    def advance(self) -> bool:
        """One product ``Y = A Q`` of the newest block; True when a Rayleigh-Ritz is due now.

        Up to the ``iters``-th product: plain subspace iteration (``Q <- orth(Y)``). From there
        (polish) ``Y`` joins the cycle's Krylov basis; a Rayleigh-Ritz is due at 1, 2 and every 4
        blocks and at ``depth`` (:func:`eva_kernels.block_krylov.is_checkpoint`)."""
        y = self._product(self.blocks[-1])
        self.products += 1
        if self.products < self.iters:
            self.blocks = [orthonormalize(y, self.method)]
            return False
        self.images.append(y)
        if self.products < self.max_iters and not is_checkpoint(len(self.images), self.depth):
            self.blocks.append(extend_basis(torch.cat(self.blocks, -1), y, self.method))
            return False
        return True

    def basis(self) -> Tuple[Tensor, Tensor]:
        """(running, d, n) ``K`` and ``AK`` of this cycle (``n`` = blocks x ``b``)."""
        if len(self.blocks) == 1:
            return self.blocks[0], self.images[0]
        return torch.cat(self.blocks, -1), torch.cat(self.images, -1)

    def projected(self, dtype: torch.dtype) -> Tensor:
        """(running, n, n) ``sym(K^T AK)`` in ``dtype``."""
        q, y = self.basis()
        if dtype != q.dtype:
            q, y = q.to(dtype), y.to(dtype)
        t = torch.bmm(q.mT, y)
        return 0.5 * (t + t.mT)

    def testing(self) -> bool:
        """Whether this round's Rayleigh-Ritz has a residual test (polishing; at the cap too, so
        that each result carries its residual: :attr:`EighBasis.residual`)."""
        return self.tol is not None

    def ratios_on_device(self, theta: Tensor, w: Tensor) -> Tensor:
        """(running,) each matrix's worst wanted residual over ``tol * theta_1`` (on the device;
        the test passes at <= 1)."""
        q, y = self.basis()
        wk = w[:, :, :self.k]
        resid = torch.bmm(y, wk) - torch.bmm(q, wk) * theta[:, None, :self.k]
        return block_krylov.tolerance_ratio(resid.norm(dim=1), theta, self.tol, self.running_wanted(theta.device))

    def running_wanted(self, device: torch.device) -> Optional[Tensor]:
        """(running,) the residual test's pairs per running matrix (None: all ``k``), on ``device``
        (built from a host list: a host-to-device copy, no synchronisation)."""
        if self.wanted is None:
            return None
        return from_values([self.wanted[i] for i in self.index], torch.int64, device)

    def finish(self, theta: Tensor, w: Tensor, ratios: Optional[Sequence[float]]) -> None:
        """Apply a Rayleigh-Ritz (``theta`` (running, n) descending, ``w`` (running, n, n) in its
        order, on this batch's device and dtype; ``ratios`` the residual test's, see
        :meth:`ratios_on_device`): the matrices that passed (all of them without ``tol``, or at
        the cap) finish; the others extend the same basis (a checkpoint inside the cycle) or
        start a new cycle, from ``orth(Y)`` (depth 1) or from their top ``b`` Ritz vectors."""
        at_cap = self.tol is None or self.products >= self.max_iters
        resid = [None] * self.running if ratios is None else [float(r) * self.tol for r in ratios]
        done = [True] * self.running if at_cap else [float(r) <= 1.0 for r in ratios]
        q, y = self.basis()
        ritz = torch.bmm(q, w[:, :, :self.b])
        if any(done):
            vals = theta[:, :self.b].clamp_min(0)
            rows = fix_signs(ritz.mT.contiguous())
            for j, finished in enumerate(done):
                if finished:
                    self.results[self.index[j]] = EighBasis(vals[j, :self.k], rows[j, :self.k], rows[j], vals[j],
                                                            resid[j])
        keep = [j for j, finished in enumerate(done) if not finished]
        if not keep:
            self.index, self.operand, self.covs, self.blocks, self.images, self.c, self.n = [], None, [], [], [], None, None
            return
        grow = len(self.images) < self.depth  # a checkpoint inside the cycle: the same basis grows
        start = q if grow else (y if self.depth == 1 else ritz)
        if len(keep) < len(done):  # compact once per round in which some finish
            sel = from_values(keep, torch.int64, start.device)
            self.operand, start = self.operand.select(keep, sel), start.index_select(0, sel)
            if grow:
                self.images = [im.index_select(0, sel) for im in self.images]
            if self.c is not None:
                self.c, self.n = self.c.index_select(0, sel), self.n.index_select(0, sel)
            self.index = [self.index[j] for j in keep]
        if grow:
            self.blocks = list(start.split(self.b, dim=-1)) + [extend_basis(start, self.images[-1], self.method)]
        else:
            self.blocks, self.images = [orthonormalize(start, self.method)], []


def _ritz_on_device(due: List[SubspaceBatch]) -> None:
    """``eigh`` per batch on its device; the polishing batches' verdicts in one transfer per device."""
    solved, flags = [], []
    for b in due:
        theta, w = torch.linalg.eigh(b.projected(b.dtype))
        theta, w = theta.flip(-1), w.flip(-1)
        solved.append((b, theta, w))
        if b.testing():
            flags.append((b, b.ratios_on_device(theta, w)))
    verdicts = {}
    by_device = {}
    for b, f in flags:
        by_device.setdefault(f.device, []).append((b, f))
    for pairs in by_device.values():
        host = torch.cat([f for _, f in pairs]).to("cpu", copy=True).tolist()  # the round's transfer
        pos = 0
        for b, f in pairs:
            verdicts[id(b)] = host[pos:pos + f.numel()]
            pos += f.numel()
    for b, theta, w in solved:
        b.finish(theta, w, verdicts.get(id(b)))


def _ritz_on_host(due: List[SubspaceBatch]) -> None:
    """Every batch's small matrices to the host in one transfer per device, solved there."""
    by_device = {}
    for b in due:
        by_device.setdefault(b.device, []).append(b)
    for batches in by_device.values():
        parts = []
        for b in batches:
            if b.testing():
                parts.extend(m.reshape(-1) for m in block_krylov.ritz_terms(*b.basis()))
            else:
                parts.append(b.projected(torch.float64).reshape(-1))
        flat = torch.cat(parts).to("cpu", copy=True)  # the round's one synchronisation
        pos, answers = 0, []
        with on_host():
            for b in batches:
                n = b.blocks[0].shape[-1] * len(b.blocks)
                size = b.running * n * n
                terms = []
                for _ in range(3 if b.testing() else 1):
                    terms.append(flat[pos:pos + size].reshape(b.running, n, n))
                    pos += size
                theta, w = torch.linalg.eigh(terms[0])
                theta, w = theta.flip(-1), w.flip(-1)
                ratios = None
                if b.testing():
                    resid = block_krylov.residual_norms(theta, w, *terms, b.k)
                    ratios = block_krylov.tolerance_ratio(resid, theta, b.tol, b.running_wanted(resid.device)).tolist()
                answers.append((b, theta.to(b.dtype), w.to(b.dtype), ratios))
        for b, theta, w, ratios in answers:  # host to device: a queued copy each on a GPU, nothing on a CPU
            b.finish(to_device(theta, b.device), to_device(w, b.device), ratios)


def solve_batches(batches: Sequence[SubspaceBatch], rayleigh_ritz: str = "device") -> int:
    """Run every batch to completion in rounds (one product per running matrix each); the
    Rayleigh-Ritz of a round is solved for all batches together (module docstring). Returns the
    number of rounds.

    When ``torch.linalg.eigh`` fails on the device for finite matrices (a CUDA or cuSOLVER
    version that cannot run it), the round and the rest go to the host route, with a warning,
    and every batch records why (:attr:`SubspaceBatch.ritz_fallback`). Non-finite matrices
    re-raise the error (the caller names the layers)."""
    if rayleigh_ritz not in RAYLEIGH_RITZ:
        raise ValueError(f"rayleigh_ritz must be one of {RAYLEIGH_RITZ}, got {rayleigh_ritz!r}")
    rounds, route = 0, rayleigh_ritz
    while True:
        live = [b for b in batches if b.running]
        if not live:
            return rounds
        due = [b for b in live if b.advance()]
        rounds += 1
        if not due:
            continue
        if route == "host":
            _ritz_on_host(due)
            continue
        try:
            _ritz_on_device(due)
        except RuntimeError as exc:  # torch.linalg.LinAlgError too; nothing was applied yet
            if not all(bool(torch.isfinite(b.projected(b.dtype)).all()) for b in due):
                raise  # NaN/Inf: the caller names the layers
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            warnings.warn(f"eva_kernels: the small eigenproblems failed on the device ({reason}); solving them on "
                          "the host from now on (rayleigh_ritz='host')")
            for b in batches:
                b.ritz_fallback = reason
            route = "host"
            _ritz_on_host(due)
