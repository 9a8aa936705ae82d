"""Block inputs cached per batch on the offload device (layer-sequential runs).

For each batch a layer-sequential run has consumed, a :class:`CachedBatch` keeps the hidden
states entering one block (``level``) and every block's other arguments (attention mask,
position ids, rotary tables; caches scrubbed), moved to ``offload_device``. Tensors shared
between blocks (one mask object passed to every layer) are moved and counted once. Windows
advance an entry block by block, so each batch runs through each block at most once per window
that needs it, and its prefix (embeddings) once.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor

from ..errors import EvaError
from ..sizes import format_bytes
from .blocks import BlockCall


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def move(obj, device: torch.device, memo: Dict[int, Tensor]):
    """``obj`` with every tensor (inside tuples, lists and dicts) on ``device``, each moved once."""
    if isinstance(obj, Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = obj.to(device)
        return memo[id(obj)]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(move(v, device, memo) for v in obj)
    if isinstance(obj, list):
        return [move(v, device, memo) for v in obj]
    if isinstance(obj, Mapping):
        return {k: move(v, device, memo) for k, v in obj.items()}
    return obj


def offload(obj, device: torch.device, memo: Dict[int, Tensor]):
    """:func:`move` to the offload device (the one place that can run out of its memory)."""
    return move(obj, device, memo)


def _tensors(obj):
    """The tensors inside ``obj`` (tuples, lists, dicts), in order."""
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            yield from _tensors(v)
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _tensors(v)


def _bytes(tensors) -> int:
    seen, n = set(), 0
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            n += t.numel() * t.element_size()
    return n


@dataclass
class CachedBatch:
    """One consumed batch: ``hidden`` is block ``level``'s input; ``calls[j]`` block ``j``'s other
    arguments; ``index``: position in the loader (the check schedule and solve seeds use it);
    ``device``: where the model computed the hidden states (replays move them back there)."""

    index: int
    model_input: Any
    level: int
    hidden: Tensor
    calls: List[BlockCall]
    device: torch.device
    arg_bytes: int = 0
    memo: Dict[int, Tensor] = field(default_factory=dict, repr=False)
    batch: Any = None                       # the batch itself (a tail window's full forwards), offloaded
    batch_device: Optional[torch.device] = None  # where the forward took it


class BlockInputCache:
    """The cached batches of a run, in loader order, and the bytes they hold on ``device``."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.entries: List[CachedBatch] = []
        self.nbytes = 0
        self.peak_bytes = 0

    def _to_offload(self, obj, memo, what: str):
        try:
            return offload(obj, self.device, memo)
        except (RuntimeError, torch.OutOfMemoryError) as exc:
            if not _is_oom(exc):
                raise
            raise EvaError(f"offload_device {self.device} ran out of memory caching {what} ({len(self.entries)} "
                           f"batch(es) cached, {format_bytes(self.nbytes)}); use fewer or shorter calibration "
                           "batches (or max_steps), free memory there, or pass another offload_device. The model "
                           "was left as it was.") from exc

    def _account(self, delta: int) -> None:
        self.nbytes += delta
        self.peak_bytes = max(self.peak_bytes, self.nbytes)

    def add(self, index: int, model_input, calls: List[BlockCall], batch=None) -> CachedBatch:
        """Cache a new batch at level 0 from the calls its stubbed forward recorded (and, when
        given, the batch itself: its tensors count as block arguments)."""
        hidden = calls[0].hidden
        memo: Dict[int, Tensor] = {}
        what = f"the block inputs of batch {index}"
        stored = [BlockCall(c.slot, None, self._to_offload(c.rest, memo, what), self._to_offload(c.kwargs, memo, what))
                  for c in calls]
        arg_bytes = _bytes(memo.values())
        entry = CachedBatch(index, model_input, 0, self._to_offload(hidden, {}, what), stored, hidden.device,
                            arg_bytes, memo)
        self.entries.append(entry)
        self._account(arg_bytes + _bytes([entry.hidden]))
        if batch is not None:
            self.keep_batch(entry, batch)
        return entry

    def keep_batch(self, entry: CachedBatch, batch) -> None:
        """Keep ``entry``'s batch itself too (for full forwards), offloaded; its new tensors counted."""
        before = _bytes(entry.memo.values())
        entry.batch_device = next((t.device for t in _tensors(batch)), None)
        entry.batch = self._to_offload(batch, entry.memo, f"batch {entry.index}")
        grown = _bytes(entry.memo.values()) - before
        entry.arg_bytes += grown
        self._account(grown)

    def store(self, entry: CachedBatch, level: int, hidden: Tensor) -> None:
        """``hidden``, block ``level``'s input for ``entry``'s batch, replaces the cached one."""
        old = _bytes([entry.hidden])
        entry.hidden = self._to_offload(hidden, {}, f"the input of block {level} for batch {entry.index}")
        entry.level = level
        self._account(_bytes([entry.hidden]) - old)

    @staticmethod
    def hidden(entry: CachedBatch):
        """``entry``'s cached hidden states, on the model's device."""
        return move(entry.hidden, entry.device, {})

    @staticmethod
    def batch(entry: CachedBatch):
        """``entry``'s batch, back where the forward took it."""
        return move(entry.batch, entry.batch_device, {}) if entry.batch_device is not None else entry.batch

    @staticmethod
    def call(entry: CachedBatch, j: int) -> BlockCall:
        """Block ``j``'s other arguments for ``entry``'s batch, on the model's device."""
        memo: Dict[int, Tensor] = {}
        c = entry.calls[j]
        return BlockCall(c.slot, None, move(c.rest, entry.device, memo), move(c.kwargs, entry.device, memo))

    def clear(self) -> None:
        self.entries.clear()
        self.nbytes = 0
