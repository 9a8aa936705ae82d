"""Dense linear algebra shared by every backend: the algorithm never depends on the backend.

* :func:`sym_from_upper`: the symmetric matrix whose upper triangle is stored.
* :func:`subtract_centering`: ``y - c (c^T q) / n``, the rank-one centring of a scatter matrix
  accumulated about a fixed shift, applied to a product ``y = A q`` without forming it.
* :func:`orthonormalize`: an orthonormal basis of a tall block's columns, by one of two named
  algorithms (:data:`ORTHONORMALIZATIONS`); ``"auto"`` picks by the *device*, never by the
  backend, and :func:`orthonormalization_for` says what ``auto`` means for a device.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

#: The orthonormalisation algorithms :func:`orthonormalize` offers.
ORTHONORMALIZATIONS = ("householder", "cholesky_qr3")
# "auto": Householder QR (LAPACK, backward stable) on CPU; sync-free shifted CholeskyQR3 (a few
# GEMMs and b x b factorisations) where Householder QR of a tall block is slow (GPUs).
_AUTO_ORTHONORMALIZATION = {"cpu": "householder"}


def sym_from_upper(cov: Tensor) -> Tensor:
    """Full symmetric matrix from the upper triangle of square ``cov`` (a new tensor)."""
    upper = torch.triu(cov)
    return upper + torch.triu(cov, diagonal=1).mT


def subtract_centering(y: Tensor, q: Tensor, colsum: Optional[Tensor], count: Optional[Tensor]) -> Tensor:
    """``y - c (c^T q) / n`` for ``y = A q`` (d, b), ``c = colsum`` (d,), ``n = count`` (0-d, >= 1).

    ``(A - c c^T / n) q`` is the product with the centred scatter matrix when ``A`` was
    accumulated about a fixed shift; ``y`` is returned unchanged when ``colsum`` is None.
    """
    if colsum is None:
        return y
    c = colsum.to(q.dtype)
    n = count.to(q.dtype).clamp_min(1)
    return y - torch.outer(c, (c @ q) / n)


def orthonormalization_for(device_type: str, method: str = "auto") -> str:
    """The algorithm ``method`` means on ``device_type`` (``auto`` resolved; names validated)."""
    if method == "auto":
        return _AUTO_ORTHONORMALIZATION.get(device_type, "cholesky_qr3")
    if method not in ORTHONORMALIZATIONS:
        raise ValueError(f"orthonormalization must be 'auto' or one of {ORTHONORMALIZATIONS}, got {method!r}")
    return method


def orthonormalize(y: Tensor, method: str = "auto") -> Tensor:
    """Orthonormal basis (d, b) of the columns of ``y`` (d, b), in ``y``'s dtype; a batch
    ``(..., d, b)`` is orthonormalised matrix by matrix (one batched call).

    ``householder``: ``torch.linalg.qr``; backward stable even for nearly dependent columns
    (subspace iteration makes them so: their norms scale like the eigenvalues).
    ``cholesky_qr3``: see :func:`cholesky_qr3`. Blocks wider than tall always use Householder.
    """
    method = orthonormalization_for(y.device.type, method)
    if method == "householder" or y.shape[-1] == 0 or y.shape[-2] < y.shape[-1]:
        q, _ = torch.linalg.qr(y, mode="reduced")
        return q
    return cholesky_qr3(y)


_PERTURB = 1e-10
_OMEGA: Dict[Tuple[str, int, int], Tensor] = {}


def _omega(d: int, b: int, device: torch.device) -> Tensor:
    """A fixed Gaussian (d, b) float64 block with unit columns, cached per (device, d, b)."""
    key = (str(device), d, b)
    om = _OMEGA.get(key)
    if om is None:
        if len(_OMEGA) > 32:
            _OMEGA.clear()
        gen = torch.Generator(device=device)
        gen.manual_seed(0x5EED)
        om = torch.randn(d, b, generator=gen, device=device, dtype=torch.float64)
        om = om / om.norm(dim=0).clamp_min(1e-300)
        _OMEGA[key] = om
    return om


def _cholqr_step(w: Tensor, shift: Optional[Tensor] = None) -> Tensor:
    g = w.mT @ w
    if shift is not None:  # shift: (...,) one per matrix of the batch
        g = g + shift[..., None, None] * torch.eye(g.shape[-1], dtype=g.dtype, device=g.device)
    low, _ = torch.linalg.cholesky_ex(g)
    # w <- w R^{-1} with R = low^T (upper): solve X R = w
    return torch.linalg.solve_triangular(low.mT, w, upper=True, left=False)


def cholesky_qr3(y: Tensor) -> Tensor:
    """Orthonormal basis of ``y`` (d, b), d >= b: shifted CholeskyQR3 in float64, no host sync.
    A batch ``(..., d, b)`` is done matrix by matrix in the same calls (shift per matrix).

    1. columns scaled to unit norm (span unchanged; removes the column-scale part of the
       condition number, e.g. subspace-iteration blocks whose norms follow the eigenvalues);
    2. ``+ 1e-10 * Omega`` (fixed Gaussian, unit columns): a rank-deficient block (covariance of
       rank < b, zero columns) becomes full rank with the missing directions filled by random
       ones, as Householder QR would; the span moves by ~1e-10, far below fp32 resolution;
    3. one Cholesky-QR of ``G + s I`` with ``s = 11 (d b + b (b + 1)) u ||W||_F^2`` (Fukaya et
       al., 2020: succeeds for condition numbers up to ~1/u), then two plain Cholesky-QR passes
       (CholeskyQR2) that restore orthogonality to ~u. ``cholesky_ex`` never checks ``info``.
    """
    d, b = y.shape[-2:]
    w = y.to(torch.float64)
    w = w / w.norm(dim=-2, keepdim=True).clamp_min(1e-300)
    w = w + _PERTURB * _omega(d, b, y.device)
    u = torch.finfo(torch.float64).eps / 2
    fro2 = (w * w).sum(dim=(-2, -1))
    shift = (11.0 * (d * b + b * (b + 1)) * u) * fro2
    w = _cholqr_step(w, shift)
    w = _cholqr_step(w)
    w = _cholqr_step(w)
    return w.to(y.dtype)
