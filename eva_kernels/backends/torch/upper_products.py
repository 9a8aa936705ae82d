"""``torch`` products of :func:`eva_kernels.topk_eigh`: ``sym(cov) q`` from the upper triangle only.

No ``d x d`` mirror is built: the products read the tiles on and above the diagonal.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional

import torch
from torch import Tensor

from ...linalg import subtract_centering


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


def upper_operator_matmul(op: UpperOperand, q: Tensor, colsum: Optional[Tensor],
                          count: Optional[Tensor]) -> Tensor:
    """``(sym(cov) - c c^T / n) @ q`` for q (d, b), colsum ``c`` (d,), count ``n`` 0-d."""
    return subtract_centering(upper_matmul(op, q), q, colsum, count)
