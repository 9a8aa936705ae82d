"""Restarted block Krylov pieces shared by the polishing solvers (single matrix and batched).

A polish (an eigensolve to a residual tolerance) runs in *cycles*. Each cycle builds an
orthonormal basis ``K = [Q_0, Q_1, ..., Q_{m-1}]`` (d, m b) of the block Krylov space
``span{Q_0, A Q_0, ..., A^{m-1} Q_0}`` with one product ``Y_j = A Q_j`` per block, where
``Q_{j+1}`` is ``Y_j`` made orthonormal to every earlier block (:func:`extend_basis`), then a
Rayleigh-Ritz on all of ``K`` with ``AK = [Y_0, ..., Y_{m-1}]``: the ``m b`` Ritz pairs of
``T = K^T A K``. The top ``b`` Ritz vectors ``K W_b`` start the next cycle (a thick restart).
The test also runs at 1, 2 and every 4 blocks of a cycle (:func:`is_checkpoint`), so that a
good warm start stops early; a failed test there extends the same basis.

Why: plain subspace iteration (``m = 1``) converges like ``(lambda_{b+1} / lambda_k)^p`` in ``p``
products, hopeless on the flat spectra of random-weight or early-layer activations (``lambda_k /
lambda_{b+1}`` of 1.01 to 1.1); a Krylov space of degree ``m - 1`` holds the Chebyshev polynomial
of that degree, which converges roughly like the square root of that rate. Measured on the
covariances of an 8B-shaped random-weight Llama (k = 32, b = 40, tol = 1e-4): 51 to 200 products
with ``m = 1``, 8 to 16 with ``m = 8`` (``benches/ops/bench_polish.py``).

The convergence test is the same whatever ``m``: every wanted Ritz pair ``(theta, v = K w)`` has
``||A v - theta v|| <= tol * theta_1``, computed from true products ``AK`` (no product is ever
derived by linear combination). :func:`residual_norms` evaluates it from three small float64
matrices, ``T = K^T AK``, ``G = AK^T AK`` and ``M = K^T K``:

    ||AK w - theta K w||^2 = w^T G w - 2 theta w^T T w + theta^2 w^T M w,

exact for the stored (fp32) ``K`` and ``AK`` up to float64 rounding. Dropping ``M`` (taking
``K`` orthonormal) would leave an error ``theta^2 (w^T M w - 1) ~ 1e-7 theta^2`` in fp32, a floor
of ``~3e-4 theta`` on the residual that a ``tol`` of 1e-4 could never pass.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from .linalg import _omega, orthonormalize

#: ``krylov_depth="auto"``: blocks per cycle by device type (others: :data:`DEFAULT_DEPTH`).
#: CPU: measured (products dominate; 8 needs 5-12x fewer than 1, and beats 16). GPUs: products are cheap and
#: the Rayleigh-Ritz of an ``m b`` basis is not (eigh of (m b)^2 matrices), so a shallower
#: cycle; not measured yet on a GPU (``benches/ops/bench_polish.py`` in ``make gpu-check``).
AUTO_DEPTH = {"cpu": 8}
DEFAULT_DEPTH = 4


def krylov_depth_for(device_type: str, depth: Union[int, str]) -> int:
    """``depth`` resolved: ``"auto"`` by device type (:data:`AUTO_DEPTH`), else an int >= 1."""
    if depth == "auto":
        return AUTO_DEPTH.get(device_type, DEFAULT_DEPTH)
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"krylov_depth must be 'auto' or an int >= 1 (1: plain subspace iteration), got {depth!r}")
    return depth


def usable_depth(d: int, b: int, depth: int) -> int:
    """Blocks per cycle for a ``(d, b)`` block: the basis (``depth * b`` columns) stays within
    half of the space, so that a new block always has room to be orthogonal to it."""
    return max(1, min(depth, d // max(2 * b, 1)))


def is_checkpoint(blocks: int, depth: int) -> bool:
    """Whether a Rayleigh-Ritz and residual test follow the product of the ``blocks``-th block of a
    cycle: at 1, 2 and every 4 blocks, and at ``depth`` (then the cycle restarts). A good warm start
    (a decaying spectrum, a layer converged while streaming) passes after 1 to 3 products; a flat
    spectrum goes on building the same basis (a failed test does not restart it). At depth 16 the
    tests of a cycle cost about twice its last one."""
    return blocks >= depth or blocks <= 2 or blocks % 4 == 0


#: Relative size of the fixed Gaussian added to a projected block in :func:`extend_basis`.
FILL = 1e-3


def extend_basis(basis: Tensor, y: Tensor, method: str) -> Tensor:
    """The next Krylov block: ``y`` (..., d, b) made orthonormal to ``basis`` (..., d, j) and itself.

    1. block classical Gram-Schmidt twice, ``y <- y - K K^T y``, and unit columns;
    2. ``+ FILL * Omega`` (a fixed Gaussian block): if the Krylov space has (nearly) reached an
       invariant subspace, some columns of the projected ``y`` are (nearly) dependent or zero,
       and the Gaussian supplies the missing directions (the Rayleigh-Ritz is exact on any
       orthonormal basis; only convergence depends on which). A 1e-3 tilt of the others costs
       nothing measurable;
    3. a projection and an orthonormalisation, then once more: rounding noise blown up to unit
       columns by the first orthonormalisation may lean on ``K``; the second pass removes it.

    Result (..., d, b) in ``y``'s dtype, orthogonal to ``basis`` and orthonormal to working
    precision (``basis`` must leave room: at most ``d - b`` columns, see :func:`usable_depth`).
    """
    for _ in range(2):
        y = y - basis @ (basis.mT @ y)
    y = y / y.norm(dim=-2, keepdim=True).clamp_min(torch.finfo(y.dtype).tiny)
    y = y + FILL * _omega(y.shape[-2], y.shape[-1], y.device).to(y.dtype)
    for _ in range(2):
        y = y - basis @ (basis.mT @ y)
        y = orthonormalize(y, method)
    return y


def ritz_terms(basis: Tensor, images: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """``(T, G, M)`` in float64 for ``K = basis``, ``AK = images`` (..., d, n): ``T = sym(K^T AK)``,
    ``G = AK^T AK``, ``M = K^T K``, each (..., n, n); see the module docstring."""
    k64, y64 = basis.to(torch.float64), images.to(torch.float64)
    t = k64.mT @ y64
    return 0.5 * (t + t.mT), y64.mT @ y64, k64.mT @ k64


def residual_norms(theta: Tensor, w: Tensor, t: Tensor, g: Tensor, m: Tensor, k: int) -> Tensor:
    """(..., k) ``||A v_i - theta_i v_i||`` of the first ``k`` Ritz pairs (``theta`` (..., n),
    ``w`` (..., n, n) columns in the same order), from :func:`ritz_terms`'s float64 matrices."""
    wk = w[..., :k]
    th = theta[..., :k]
    quad = lambda mat: (wk * (mat @ wk)).sum(dim=-2)  # noqa: E731  (w_i^T mat w_i per column)
    r2 = quad(g) - 2.0 * th * quad(t) + th * th * quad(m)
    return r2.clamp_min(0).sqrt()


def tolerance_ratio(resid: Tensor, theta: Tensor, tol: float, wanted: Optional[Tensor] = None) -> Tensor:
    """(...,) the worst wanted residual (..., k) over ``tol * theta_1`` (``theta`` (..., n)
    descending): the test passes when it is <= 1. ``wanted`` (...,) integers: only the first
    ``wanted`` of the ``k`` residuals count (0: none, the ratio is 0)."""
    scale = theta[..., :1].abs().clamp_min(torch.finfo(theta.dtype).tiny)
    ratio = resid / (tol * scale)
    if wanted is not None:
        cols = torch.arange(ratio.shape[-1], device=ratio.device)
        ratio = torch.where(cols < wanted.to(ratio.device).unsqueeze(-1), ratio, torch.zeros((), dtype=ratio.dtype,
                                                                                              device=ratio.device))
    return ratio.amax(dim=-1)
