"""Finding shared-input groups: layers fed the very same tensor (q/k/v) share one statistic.

Grouping happens during the first forward pass from the input tensors themselves: two
layers share a group when their (prepared-by-the-same-function) inputs are the same view
of the same storage (data pointer, offset, shape, strides, dtype) and the first tensor is
still alive and unmodified (weak reference + version counter), so a freed and reused
address can never be mistaken for a shared input. No values are hashed on the host.
"""
from __future__ import annotations

import weakref
from typing import Dict, Optional

from torch import Tensor

from .state import GroupState


def view_key(x: Tensor, fn_id: int):
    """Identity of a tensor view, or None when it has no inspectable storage."""
    try:
        ptr = x.untyped_storage().data_ptr()
    except Exception:  # tensor subclasses without storage
        return None
    return (ptr, x.storage_offset(), tuple(x.shape), tuple(x.stride()), x.dtype, str(x.device), fn_id)


class GroupFinder:
    """Assigns modules to groups during the first forward pass."""

    def __init__(self):
        self._seen: Dict[tuple, tuple] = {}  # key -> (weakref(tensor), version, group)

    def match(self, x: Tensor, fn_id: int) -> Optional[GroupState]:
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

    def remember(self, x: Tensor, fn_id: int, group: GroupState) -> None:
        key = view_key(x, fn_id)
        if key is not None:
            self._seen[key] = (weakref.ref(x), x._version, group)

    def clear(self) -> None:
        self._seen.clear()
