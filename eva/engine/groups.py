"""Finding shared-input groups: layers fed the very same tensors (q/k/v) share one statistic.

Grouping happens during the first forward pass from the input tensors themselves. Every
distinct input *view* gets an id (:class:`LiveViews`): two calls see the same view when their
inputs (prepared by the same rule) are the same view of the same storage (data pointer, offset,
shape, strides, dtype) and the first tensor is still alive and unmodified (weak reference +
version counter), so a freed and reused address can never be mistaken for a shared input. No
values are hashed on the host.

A layer's *signature* is the list of view ids of its calls in one forward. Layers share a group
only when their signatures are equal, call by call (:func:`group_by_signature`): a layer called
again on another input (DeBERTa's ``query_proj`` on the relative-position embeddings) does not
drag the layers that shared only its first input (``value_proj``) into statistics of rows they
never received.
"""
from __future__ import annotations

import weakref
from typing import Any, Dict, List, Optional, Tuple

from torch import Tensor


def view_key(x: Tensor, fn_id: int):
    """Identity of a tensor view, or None when it has no inspectable storage."""
    try:
        ptr = x.untyped_storage().data_ptr()
    except Exception:  # tensor subclasses without storage
        return None
    return (ptr, x.storage_offset(), tuple(x.shape), tuple(x.stride()), x.dtype, str(x.device), fn_id)


class LiveViews:
    """Values remembered per live tensor view (see the module docstring)."""

    def __init__(self):
        self._seen: Dict[tuple, Tuple[Any, int, Any]] = {}  # key -> (weakref(tensor), version, value)

    def get(self, x: Optional[Tensor], tag: int) -> Any:
        """The value remembered for ``x``'s view under ``tag`` (None: none, or the tensor died or changed)."""
        key = None if x is None else view_key(x, tag)
        hit = None if key is None else self._seen.get(key)
        if hit is None:
            return None
        ref, version, value = hit
        alive = ref()
        if alive is None or alive._version != version:
            return None
        return value

    def put(self, x: Optional[Tensor], tag: int, value: Any) -> None:
        key = None if x is None else view_key(x, tag)
        if key is not None:
            self._seen[key] = (weakref.ref(x), x._version, value)

    def clear(self) -> None:
        self._seen.clear()


def group_by_signature(order: List[str], signature: Dict[str, tuple]) -> List[List[str]]:
    """Layers in ``order`` (first-call order) with equal signatures, each list in that order."""
    buckets: Dict[tuple, List[str]] = {}
    for name in order:
        buckets.setdefault(signature[name], []).append(name)
    return list(buckets.values())
