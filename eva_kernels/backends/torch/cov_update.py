"""``torch`` implementation of :func:`eva_kernels.cov_update` (arguments already validated)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def cov_update_torch(cov: Tensor, colsum: Tensor, x: Tensor, mask: Optional[Tensor],
                     shift: Optional[Tensor]) -> Tensor:
    """``cov += y^T y``, ``colsum += sum(y)`` for the kept rows ``y = float32(x) - shift``.

    Masked rows are zeroed with ``torch.where`` (a select, so NaN/Inf in dropped rows cannot
    leak) instead of boolean indexing, which would synchronise with the host on GPU. Fills the
    whole of ``cov`` (both triangles). Returns the kept-row count, 0-d int64 on ``x.device``.
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
