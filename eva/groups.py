"""Shared-input groups: layers fed the very same tensor (q/k/v) share one statistic.

Grouping happens during the first forward pass from the input tensors themselves: two
layers share a group when their (prepared-by-the-same-function) inputs are the same view
of the same storage (data pointer, offset, shape, strides, dtype) and the first tensor is
still alive and unmodified (weak reference + version counter), so a freed and reused
address can never be mistaken for a shared input. No values are hashed on the host.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from torch import Tensor

from .statistics import RunningStats


def view_key(x: Tensor, fn_id: int):
    """Identity of a tensor view, or None when it has no inspectable storage."""
    try:
        ptr = x.untyped_storage().data_ptr()
    except Exception:  # tensor subclasses without storage
        return None
    return (ptr, x.storage_offset(), tuple(x.shape), tuple(x.stride()), x.dtype, str(x.device), fn_id)


@dataclass
class Group:
    """One statistic and its running eigen-estimate, shared by ``members`` (leader first)."""

    index: int
    members: List[str]
    d: int
    max_components: int                 # components computed: max over members of r * rho
    stats: Optional[RunningStats] = None
    calls_per_forward: int = 0          # leader calls seen in the first forward
    calls_this_step: int = 0
    captured: bool = False              # received data in the current step
    basis: Optional[Tensor] = None      # (b, d) Ritz basis: warm start for the next solve
    components: Optional[Tensor] = None  # (max_components, d)
    eigenvalues: Optional[Tensor] = None
    eigenvalues_host: Optional[List[float]] = None  # (host) descending
    variance: Optional[tuple] = None    # (host) (V, S, R): see eva.variance_floor
    ratios: Optional[List[float]] = None  # explained variance ratios (host), 0 when zero_variance
    zero_variance: bool = False         # (near-)zero total variance: offers nothing, rank 0
    cosines: Optional[List[float]] = None  # |cos| with the previous estimate (host)
    solves: int = 0
    steps: int = 0                      # batches consumed
    tokens: int = 0
    converged: bool = False
    ever_converged: bool = False        # converged at some step (a rank reallocation can reopen it)
    hooked: bool = False
    pending: Dict[str, Tensor] = field(default_factory=dict)  # device values awaiting one sync

    @property
    def leader(self) -> str:
        return self.members[0]

    def converged_prefix(self, tau: float) -> int:
        """Number of leading components whose cosine with the previous estimate is >= tau."""
        if self.cosines is None or self.solves < 2:
            return 0
        n = 0
        for c in self.cosines:
            if c < tau:
                break
            n += 1
        return n


class GroupFinder:
    """Assigns modules to groups during the first forward pass."""

    def __init__(self):
        self._seen: Dict[tuple, tuple] = {}  # key -> (weakref(tensor), version, group)

    def match(self, x: Tensor, fn_id: int) -> Optional[Group]:
        key = view_key(x, fn_id)
        if key is None:
            return None
        hit = self._seen.get(key)
        if hit is None:
            return None
        ref, version, group = hit
        alive = ref()
        if alive is None or alive._version != version:
            return None
        return group

    def remember(self, x: Tensor, fn_id: int, group: Group) -> None:
        key = view_key(x, fn_id)
        if key is not None:
            self._seen[key] = (weakref.ref(x), x._version, group)

    def clear(self) -> None:
        self._seen.clear()
