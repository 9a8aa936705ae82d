"""Plain-PyTorch implementations: the ``torch`` backend and the float64 spec.

Two kinds of functions live here:

* ``*_torch``: the ``torch`` backend. Runs on any device, no host synchronisation,
  fp32 accumulation. It is the baseline the Triton and C++ kernels are measured against.
* ``*_spec``: the float64 specification used by the tests. Slow and simple on purpose.

Math (shared by every backend). For rows ``x_i`` (``i`` with ``mask[i]``) of ``x (n, d)``
and an optional fixed reference ``s (d,)`` (the *shift*), with ``y_i = float32(x_i) - s``::

    cov    += sum_i y_i^T y_i          (d, d), fp32
    colsum += sum_i y_i                (d,),   fp32
    return    #{i : mask[i]}           0-d int64 on x.device

Rows with ``mask[i] == False`` never contribute, even if they hold NaN or Inf.
Backends must update at least the upper triangle (row <= col) of ``cov``; the strictly
lower triangle is unspecified after a call (this file fills it, the kernels may not).
Every reader of ``cov`` (:func:`eva_kernels.topk_eigh`) reads the upper triangle only.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional

import torch
from torch import Tensor


def cov_update_torch(cov: Tensor, colsum: Tensor, x: Tensor, mask: Optional[Tensor],
                     shift: Optional[Tensor]) -> Tensor:
    """``torch`` backend of :func:`eva_kernels.cov_update` (validated inputs).

    Masked rows are zeroed with ``torch.where`` (a select, so NaN/Inf in dropped rows
    cannot leak) instead of boolean indexing, which would synchronise with the host on GPU.
    """
    y = x.to(torch.float32)
    if shift is not None:
        y = y - shift
    if mask is not None:
        y = torch.where(mask.unsqueeze(1), y, y.new_zeros(()))
        count = mask.sum(dtype=torch.int64)
    else:
        count = torch.full((), x.shape[0], dtype=torch.int64, device=x.device)
    cov.addmm_(y.mT, y)
    colsum.add_(y.sum(0))
    return count


def cov_update_spec(cov: Tensor, colsum: Tensor, x: Tensor, mask: Optional[Tensor] = None,
                    shift: Optional[Tensor] = None) -> int:
    """float64 specification of ``cov_update``: ``cov``/``colsum`` are float64, updated in place."""
    y = x.detach().to(torch.float64)
    if mask is not None:
        y = y[mask.to(torch.bool)]
    if shift is not None:
        y = y - shift.to(torch.float64)
    cov += y.mT @ y
    colsum += y.sum(0)
    return int(y.shape[0])


def sym_from_upper(cov: Tensor) -> Tensor:
    """Full symmetric matrix from the upper triangle of ``cov`` (a new tensor)."""
    upper = torch.triu(cov)
    return upper + torch.triu(cov, diagonal=1).mT


class UpperOperand(NamedTuple):
    """A symmetric matrix known by its upper triangle, ready for :func:`upper_matmul`.

    ``cov`` is the stored (d, d) matrix (lower triangle ignored); ``diag_upper`` holds the
    upper-triangular diagonal tiles (block x block, the last one smaller) and ``diag`` the
    matrix diagonal, built once per solve (O(d * block) copies, no d x d mirror).
    """
    cov: Tensor
    diag_upper: List[Tensor]
    diag: Tensor
    block: int


def upper_operand(cov: Tensor, block: int = 512) -> UpperOperand:
    """Prepare ``cov`` (d, d; upper triangle valid) for repeated products."""
    d = cov.shape[0]
    tiles = [torch.triu(cov[i:i + block, i:i + block]) for i in range(0, d, block)]
    return UpperOperand(cov, tiles, torch.diagonal(cov).clone(), block)


def upper_matmul(op: UpperOperand, q: Tensor) -> Tensor:
    """``sym(cov) @ q`` reading only tiles on and above the diagonal.

    Diagonal tile ``U = triu(C_II)``: ``sym(C_II) q_I = U q_I + U^T q_I - diag(C_II) q_I``.
    Tile (I, J) with I < J contributes ``C_IJ q_J`` to rows I and ``C_IJ^T q_I`` to rows J.
    """
    cov, bs = op.cov, op.block
    d = cov.shape[0]
    y = torch.addcmul(torch.zeros((), dtype=q.dtype, device=q.device), op.diag.to(q.dtype).unsqueeze(1), q,
                      value=-1)
    starts = list(range(0, d, bs))
    for t, i in enumerate(starts):
        u, qi = op.diag_upper[t], q[i:i + bs]
        y[i:i + bs].addmm_(u, qi).addmm_(u.mT, qi)
    for t, i in enumerate(starts):
        for j in starts[t + 1:]:
            tile = cov[i:i + bs, j:j + bs]
            y[i:i + bs].addmm_(tile, q[j:j + bs])
            y[j:j + bs].addmm_(tile.mT, q[i:i + bs])
    return y


def centered_operator_matmul(a, q: Tensor, colsum: Optional[Tensor],
                             count: Optional[Tensor]) -> Tensor:
    """``(A - c c^T / n) @ q`` without forming the rank-one correction.

    a: an :class:`UpperOperand` or a full (d, d) symmetric tensor; q: (d, b);
    colsum ``c``: (d,); count ``n``: 0-d.
    """
    y = upper_matmul(a, q) if isinstance(a, UpperOperand) else a @ q
    if colsum is not None:
        c = colsum.to(q.dtype)
        n = count.to(q.dtype).clamp_min(1)
        y = y - torch.outer(c, (c @ q) / n)
    return y


def orthonormalize_torch(y: Tensor) -> Tensor:
    """Orthonormal basis (d, b) of the columns of ``y`` (d, b) by Householder QR.

    Householder QR is backward stable even when ``y``'s columns are nearly dependent
    (subspace iteration makes them so: their norms scale like the eigenvalues).
    """
    q, _ = torch.linalg.qr(y, mode="reduced")
    return q


def covariance_spec(x: Tensor, mask: Optional[Tensor] = None, centered: bool = True) -> Tensor:
    """float64 scatter matrix of the kept rows: ``sum (x_i - mu)^T (x_i - mu)`` (or uncentred)."""
    y = x.detach().to(torch.float64).reshape(-1, x.shape[-1])
    if mask is not None:
        y = y[mask.reshape(-1).to(torch.bool)]
    if centered:
        y = y - y.mean(0, keepdim=True)
    return y.mT @ y


def exact_pca_spec(x: Tensor, k: int, mask: Optional[Tensor] = None, centered: bool = True):
    """Exact top-``k`` principal directions of the kept rows of ``x`` by float64 SVD.

    Returns ``(singular_values (k,), components (k, d))``: right-singular vectors of the
    (centred) token matrix, i.e. the top eigenvectors of its scatter matrix.
    """
    y = x.detach().to(torch.float64).reshape(-1, x.shape[-1])
    if mask is not None:
        y = y[mask.reshape(-1).to(torch.bool)]
    if centered:
        y = y - y.mean(0, keepdim=True)
    _, s, vh = torch.linalg.svd(y, full_matrices=False)
    return s[:k], vh[:k]
