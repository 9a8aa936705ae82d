"""Checks, on the first batch, that replaying the blocks one at a time is exact.

A layer-sequential run (:mod:`eva.engine.sequential`) feeds block ``j + 1`` the cached output of
block ``j`` together with the other arguments the model passed block ``j + 1``, recorded by a
stubbed forward (:class:`eva.engine.blocks.BlockStubs`) in which no block computes. That is the
model's own computation when its loop over the blocks is a plain chain. :class:`BlockProbe`
watches the model's real first forward and records, per block, its arguments, its output format,
and whether its hidden-state input is the previous block's output; :func:`compare_calls` then
checks the stubbed forward's arguments against the real ones. A model whose blocks get
arguments computed from earlier blocks' outputs, or whose loop changes the hidden states between
blocks, fails here with the block and argument named, before any statistic is computed.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from .blocks import BlockCall, BlockList, hidden_of


def same_value(a, b) -> bool:
    """Structural equality: tensors by shape, dtype and values; containers element-wise."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and a.dtype == b.dtype
                and a.device == b.device and bool(torch.equal(a, b)))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    if a is b:
        return True
    try:
        return bool(a == b)
    except Exception:  # objects without a usable ==: the same type is the best we can say
        return type(a) is type(b)


class BlockProbe:
    """Hooks on every block during the first (real) forward; ``with`` removes them.

    After the forward: ``calls[j]`` (block 0 keeps its hidden input; the others drop it),
    ``blocks.returns_tuple`` filled in, and ``problem``: why replaying would not be exact, or None.
    """

    def __init__(self, blocks: BlockList):
        self.blocks = blocks
        self.calls: List[Optional[BlockCall]] = [None] * len(blocks)
        self.problem: Optional[str] = None
        self._previous: Optional[Tensor] = None  # the last block's output, until the next block's input
        self._handles = []

    def _pre(self, j: int):
        def hook(module, args, kwargs):
            name = self.blocks.block_name(j)
            call = BlockCall.of(name, args, kwargs)
            if j > 0 and self.problem is None:
                prev = self._previous
                x = call.hidden
                if prev is None or not (x is prev or same_value(x, prev)):
                    self.problem = (f"block {name}'s hidden-state input is not the output of block "
                                    f"{self.blocks.block_name(j - 1)}: the model changes the hidden states between "
                                    "its blocks")
            self._previous = None
            self.calls[j] = call if j == 0 else BlockCall(call.slot, None, call.rest, call.kwargs)
        return hook

    def _post(self, j: int):
        def hook(module, args, output):
            self._previous = hidden_of(output, self.blocks.block_name(j))
            self.blocks.returns_tuple[j] = None if isinstance(output, Tensor) else len(output)
        return hook

    def __enter__(self) -> "BlockProbe":
        for j, block in enumerate(self.blocks.modules):
            self._handles.append(block.register_forward_pre_hook(self._pre(j), with_kwargs=True))
            self._handles.append(block.register_forward_hook(self._post(j)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._previous = None

    def check_complete(self) -> None:
        """Every block must have run in the real forward."""
        missing = [self.blocks.block_name(j) for j, c in enumerate(self.calls) if c is None]
        if missing and self.problem is None:
            self.problem = f"block(s) {missing[:4]} were not called by the forward"


def compare_calls(blocks: BlockList, real: List[BlockCall], recorded: List[BlockCall]) -> Optional[str]:
    """Why the stubbed forward's calls differ from the real forward's (None: they agree)."""
    if not same_value(real[0].hidden, recorded[0].hidden):
        return f"the hidden states entering block {blocks.block_name(0)} differ between two forwards of one batch"
    for j, (a, b) in enumerate(zip(real, recorded)):
        name = blocks.block_name(j)
        if a.slot != b.slot or len(a.rest) != len(b.rest):
            return f"block {name} is called differently when the blocks before it do not compute"
        for i, (x, y) in enumerate(zip(a.rest, b.rest)):
            if not same_value(x, y):
                return f"block {name}'s positional argument {i + 1} depends on what the blocks before it computed"
        for key in a.kwargs.keys() | b.kwargs.keys():
            if not same_value(a.kwargs.get(key), b.kwargs.get(key)):
                return f"block {name}'s argument {key!r} depends on what the blocks before it computed"
    return None
