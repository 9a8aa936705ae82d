"""Randomized, warm-startable truncated eigensolver for symmetric PSD matrices (Halko et al.).

Two entry points: :func:`topk_eigh` solves to a residual tolerance by default (``tol="auto"``:
:data:`DEFAULT_TOL`; exact eigenpairs to that tolerance, a warning when ``max_iters`` stops it
short); :func:`topk_eigh_step` is the cheap tracking step (``iters`` subspace iterations from
a warm start, no tolerance, no host sync), which an estimate refined batch after batch uses.

Problem: the top-``k`` eigenpairs of the operator ``A = sym(cov) - c c^T / n`` where
``sym(cov)`` is the symmetric matrix whose upper triangle is stored in ``cov`` (d, d) and the
optional rank-one term centres a scatter matrix accumulated about a fixed shift
(``c = colsum``, ``n = count``). ``A`` is never formed with the correction.

Algorithm (block size ``b = k + oversample``, capped at ``d``):

1. test matrix ``Q0`` (d, b): the rows of ``init`` (previous estimate: warm start) topped
   up with Gaussian columns, or all Gaussian;
2. ``iters`` rounds of subspace iteration ``Q <- orth(A Q)``; the angle between the
   i-th eigenvector and span(Q) shrinks like ``(lambda_{b+1} / lambda_i)^iters``;
3. Rayleigh-Ritz: eigendecomposition of the small ``T = Q^T A Q`` (b, b); Ritz vectors
   ``Q W`` sorted by descending Ritz value.

With ``tol`` set, the iteration continues (up to ``max_iters`` products) until every wanted
Ritz pair's residual ``||A v - theta v|| <= tol * theta_1``; that check synchronises with the
host and is meant for final solves, not for per-batch tracking. After the first Rayleigh-Ritz
it runs as a restarted block Krylov method (cycles of ``krylov_depth`` products, tested at 1,
2, 4, ... products, see :mod:`eva_kernels.block_krylov`), which needs far fewer products on
flat spectra.

The products ``A Q`` (from the stored triangle) come from the selected backend's
:class:`eva_kernels.EigenProducts`; the orthonormalisation (:func:`eva_kernels.linalg.orthonormalize`,
chosen by ``orthonormalization``, never by the backend) and the small eigh are shared.
"""
from __future__ import annotations

import warnings
from typing import Callable, NamedTuple, Optional, Union

import torch
from torch import Tensor

from .._registry import Backend, resolve
from ..block_krylov import extend_basis, is_checkpoint, krylov_depth_for, tolerance_ratio, usable_depth
from ..linalg import orthonormalize, orthonormalization_for, subtract_centering, sym_from_upper
from ..subspace import fix_signs


class EighResult(NamedTuple):
    eigenvalues: Tensor   # (k,) descending, dtype of cov
    eigenvectors: Tensor  # (k, d) orthonormal rows, deterministic signs


class EighBasis(NamedTuple):
    eigenvalues: Tensor   # (k,)
    eigenvectors: Tensor  # (k, d)
    basis: Tensor         # (b, d) all Ritz vectors, descending: pass as ``init`` next time
    ritz_values: Tensor   # (b,)
    #: with ``tol``: the worst wanted residual ``max_i ||A v_i - theta_i v_i|| / theta_1`` at the
    #: last test (``<= tol`` unless stopped at ``max_iters``); None without ``tol``
    residual: Optional[float] = None


#: The residual tolerance ``topk_eigh`` iterates to by default: every wanted pair with
#: ``||A v - theta v|| <= DEFAULT_TOL * theta_1`` (eigenvalues then agree with the exact ones to
#: about ``DEFAULT_TOL^2 theta_1^2 / gap``).
DEFAULT_TOL = 1e-5


def _gaussian(d: int, cols: int, like: Tensor, seed: int) -> Tensor:
    gen = torch.Generator(device=like.device)
    gen.manual_seed(int(seed))
    return torch.randn(d, cols, generator=gen, device=like.device, dtype=like.dtype)


def _check_args(cov: Tensor, k: int, colsum, count, init, oversample, iters, tol=None) -> None:
    if not isinstance(cov, Tensor) or cov.dim() != 2 or cov.shape[0] != cov.shape[1]:
        raise ValueError(f"topk_eigh: cov must be a square (d, d) tensor, got "
                         f"{tuple(cov.shape) if isinstance(cov, Tensor) else type(cov).__name__}")
    if cov.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"topk_eigh: cov must be float32 or float64, got {cov.dtype}")
    d = cov.shape[0]
    if not (isinstance(k, int) and 1 <= k <= d):
        raise ValueError(f"topk_eigh: k must be an int in [1, d={d}], got {k!r}")
    if (colsum is None) != (count is None):
        raise ValueError("topk_eigh: pass colsum and count together (centring) or neither")
    if colsum is not None:
        if colsum.shape != (d,):
            raise ValueError(f"topk_eigh: colsum must have shape ({d},), got {tuple(colsum.shape)}")
        if colsum.device != cov.device:
            raise ValueError(f"topk_eigh: colsum is on {colsum.device} but cov is on {cov.device}")
    if init is not None:
        if init.dim() != 2 or init.shape[1] != d or init.shape[0] < 1:
            raise ValueError(f"topk_eigh: init must be (m, {d}) rows with m >= 1, got {tuple(init.shape)}")
        if init.device != cov.device:
            raise ValueError(f"topk_eigh: init is on {init.device} but cov is on {cov.device}")
    if oversample < 0 or iters < 0:
        raise ValueError("topk_eigh: oversample and iters must be >= 0")
    if not (tol is None or tol == "auto" or (isinstance(tol, (int, float)) and not isinstance(tol, bool)
                                            and 0.0 < float(tol) < 1.0)):
        raise ValueError(f"topk_eigh: tol must be 'auto' (DEFAULT_TOL = {DEFAULT_TOL:g}), a number in (0, 1) or "
                         f"None (a fixed number of iterations: topk_eigh_step); got {tol!r}")


def topk_eigh(cov: Tensor, k: int, *, colsum: Optional[Tensor] = None, count=None,
              init: Optional[Tensor] = None, oversample: int = 8, iters: int = 2, seed: int = 0,
              tol: Union[float, str, None] = "auto", max_iters: int = 64, return_basis: bool = False,
              backend: Union[str, Backend, None] = None, orthonormalization: str = "auto",
              reduce: Optional[Callable[[Tensor], Tensor]] = None, krylov_depth: Union[int, str] = "auto"):
    """Top-``k`` eigenpairs of a symmetric PSD matrix given by its upper triangle, iterated to a
    residual tolerance (``tol="auto"``: :data:`DEFAULT_TOL`); ``tol=None`` is the cheap fixed-step
    tracking of :func:`topk_eigh_step`.

    Args:
        cov: (d, d) float32/float64; only the upper triangle (row <= col) is read.
        k: number of eigenpairs, ``1 <= k <= d``.
        colsum, count: optional centring: the operator is ``sym(cov) - colsum colsum^T / count``
            (``count`` a 0-d tensor or a number; clamped to >= 1).
        init: (m, d) rows of a previous estimate (eigenvectors or a previous ``basis``); the
            first ``min(m, b)`` rows seed the test matrix. Orthonormality not required.
        oversample: extra block columns ``p``; block size ``b = min(d, k + p)``.
        iters: subspace iterations (each one ``A Q`` product and one orthonormalisation) before
            the first Rayleigh-Ritz; without ``tol``, all of them.
        seed: seed of the Gaussian test columns (generator on cov's device).
        tol: keep iterating until all k residuals are below ``tol * theta_1`` (a host sync per
            test). ``"auto"`` (default): :data:`DEFAULT_TOL`, with a warning when ``max_iters``
            stops the solve short of it. ``None``: exactly ``iters`` products, no test (the
            cheap warm-started tracking step, :func:`topk_eigh_step`); a number: that tolerance
            (the result's ``residual``, with ``return_basis``, says whether it was met).
        max_iters: cap on products when ``tol`` is set.
        krylov_depth: with ``tol``, from the ``iters``-th product the iteration runs in cycles of
            ``krylov_depth`` products building a block Krylov basis, Rayleigh-Ritz and residual
            test on all of it at 1, 2 and every 4 blocks and at the end, then a restart from the top
            ``b`` Ritz vectors (:mod:`eva_kernels.block_krylov`;
            capped so that the basis fits in ``d``); 1: plain subspace iteration; ``"auto"``:
            by device (:func:`eva_kernels.block_krylov.krylov_depth_for`). Unused without ``tol``.
        return_basis: also return the full Ritz basis (b, d) and values (b,) for warm starts.
        backend: a name or a resolved :class:`eva_kernels.Backend` for the products ``A Q``
            (``available_backends(device, "topk_eigh")``); default ``EVA_BACKEND`` or auto.
        orthonormalization: ``"householder"``, ``"cholesky_qr3"`` or ``"auto"`` (by device:
            :func:`eva_kernels.linalg.orthonormalization_for`).
        reduce: solve for a matrix held in parts, ``A = sum_r sym(cov_r) - c c^T / n``, without
            forming it: every product with the local part (``sym(cov) Q``, (d, b), one per
            iteration; ``sym(cov)`` itself only when ``b == d``) is passed to ``reduce``, which
            must return the sum over the parts (e.g. ``torch.distributed.all_reduce`` in place,
            returning its argument). ``colsum``/``count`` must then be the global sums, and
            every participant must call with the same ``init``, ``seed`` and options: each
            computes the same basis from the same reduced products, so no ``d x d`` matrix is
            communicated.

    Returns:
        ``EighResult(eigenvalues (k,) descending, eigenvectors (k, d))`` in cov's dtype, or
        ``EighBasis`` with ``basis``/``ritz_values`` (and, with ``tol``, ``residual``: the worst
        wanted residual relative to ``theta_1`` at the last test) when ``return_basis``. Eigenvalues are
        clamped at 0. When ``b == d`` the answer is computed exactly by ``torch.linalg.eigh``.
    """
    _check_args(cov, k, colsum, count, init, oversample, iters, tol)
    default_tol = tol == "auto"
    if default_tol:
        tol = DEFAULT_TOL
    d = cov.shape[0]
    dtype = cov.dtype
    if count is not None and not isinstance(count, Tensor):
        # float64: a float32 tensor would round counts above 2**24 (e.g. 2**31 - 1 -> 2**31)
        count = torch.tensor(float(count), dtype=torch.float64, device=cov.device)
    b = min(d, k + oversample)
    products = resolve("topk_eigh", cov.device, backend).topk_eigh
    method = orthonormalization_for(cov.device.type, orthonormalization)
    if b == d:  # the block is the whole space: exact dense solve
        eye = torch.eye(d, dtype=dtype, device=cov.device)
        full = sym_from_upper(cov) @ eye
        a_c = subtract_centering(full if reduce is None else reduce(full), eye, colsum, count)
        vals, vecs = torch.linalg.eigh(0.5 * (a_c + a_c.mT))
        vals, vecs = vals.flip(0), vecs.flip(1)
        return _finish(vals, vecs, k, return_basis, None if tol is None else 0.0)  # exact

    operand = products.prepare(cov)
    if init is not None and init.shape[0] >= b:  # the warm start fills the block: no Gaussian columns
        q = init[:b].to(dtype).mT.contiguous()
    else:
        q = _gaussian(d, b, cov, seed)
        if init is not None:
            q[:, :init.shape[0]] = init.to(dtype).mT
    q = orthonormalize(q, method)
    first = max(iters, 1)
    limit = first if tol is None else max(max_iters, first)
    depth = 1 if tol is None else usable_depth(d, b, krylov_depth_for(cov.device.type, krylov_depth))
    blocks, images, done = [q], [], 0
    while True:
        y = _product(products, operand, blocks[-1], colsum, count, reduce)
        done += 1
        if done < first:  # plain subspace iteration up to the first Rayleigh-Ritz
            blocks = [orthonormalize(y, method)]
            continue
        images.append(y)
        if done < limit and not is_checkpoint(len(images), depth):  # grow the Krylov basis
            blocks.append(extend_basis(torch.cat(blocks, -1), y, method))
            continue
        basis, image = torch.cat(blocks, -1), torch.cat(images, -1)
        vals, w, ratio = _ritz(basis, image, k, tol)  # at the cap too: the result says whether tol was met
        if tol is None or ratio <= 1.0 or done >= limit:
            if default_tol and ratio > 1.0:
                warnings.warn(f"topk_eigh: stopped at max_iters={max_iters} products with a residual of "
                              f"{ratio * tol:.2g} theta_1 (> tol={tol:g}); raise max_iters or oversample for the "
                              "exact eigenpairs", stacklevel=2)
            return _finish(vals[:b], basis @ w[:, :b], k, return_basis, None if tol is None else ratio * tol)
        if len(images) < depth:  # a checkpoint inside the cycle: the same basis grows
            blocks.append(extend_basis(basis, y, method))
            continue
        # restart: depth 1 continues the power sequence (Q <- orth(A Q)); deeper cycles start
        # from the top b Ritz vectors
        blocks = [orthonormalize(y if depth == 1 else basis @ w[:, :b], method)]
        images = []


def _product(products, operand, q: Tensor, colsum, count, reduce) -> Tensor:
    """``A q`` from the backend's products (centred; summed over the parts with ``reduce``)."""
    if reduce is None:
        return products.matmul(operand, q, colsum, count)
    # centre after the sum: the rank-one term is global
    return subtract_centering(reduce(products.matmul(operand, q, None, None)), q, colsum, count)


def _ritz(q: Tensor, aq: Tensor, k: int, tol: Optional[float]):
    """Rayleigh-Ritz on span(q) given ``aq = A q``: Ritz values (n,) descending, the
    coefficients (n, n), and with ``tol`` the worst wanted residual over ``tol * theta_1`` (a
    host sync; the test passes at <= 1), else 0."""
    t = q.mT @ aq
    t = 0.5 * (t + t.mT)
    theta, w = torch.linalg.eigh(t)
    theta, w = theta.flip(0), w.flip(1)
    ratio = 0.0
    if tol is not None:
        resid = aq @ w[:, :k] - (q @ w[:, :k]) * theta[:k]
        ratio = float(tolerance_ratio(resid.norm(dim=0), theta, tol))
    return theta, w, ratio


def _finish(vals: Tensor, vecs: Tensor, k: int, return_basis: bool, residual: Optional[float] = None):
    vals = vals.clamp_min(0)
    rows = fix_signs(vecs.mT.contiguous())
    if return_basis:
        return EighBasis(vals[:k], rows[:k], rows, vals, residual)
    return EighResult(vals[:k], rows[:k])


def topk_eigh_step(cov: Tensor, k: int, *, init: Optional[Tensor] = None, iters: int = 2, **kwargs):
    """One cheap tracking step: ``iters`` subspace iterations (warm-started from ``init``), one
    Rayleigh-Ritz, no tolerance and no host sync: ``topk_eigh(cov, k, init=init, iters=iters,
    tol=None, **kwargs)``.

    Accurate only where the start is already close (the previous estimate of a matrix that
    changed a little, as EVA's statistics between batches) or ``iters`` is large: from a random
    start two iterations on a 1/i spectrum give 0.993, 0.485, 0.295 for 1, 0.5, 0.333. For the
    eigenpairs themselves use :func:`topk_eigh` (to a tolerance by default).
    """
    if "tol" in kwargs:
        raise TypeError("topk_eigh_step takes no tol (it is the fixed-iteration step); use topk_eigh(..., tol=...)")
    return topk_eigh(cov, k, init=init, iters=iters, tol=None, **kwargs)
