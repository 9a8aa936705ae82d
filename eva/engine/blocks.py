"""The model's repeated blocks, for layer-sequential runs (:mod:`eva.engine.sequential`).

* :func:`find_blocks` — the block list: the module named by ``EvaOptions.blocks``, or the
  ``nn.ModuleList`` / ``nn.Sequential`` of at least two same-class modules holding the most
  target statistics, then the most parameters (a decoder's ``model.layers``, GPT-2's
  ``transformer.h``, BERT's ``encoder.layer``; the encoder's list of an encoder-decoder model
  whose targets are all in the encoder; an MoE layer's expert list is smaller than the list of
  layers that contains it).
* :class:`BlockList` — the blocks, which block holds a module, and the call format of each block.
* :class:`BlockStubs` — a context in which every block's ``forward`` is a recorder: it keeps the
  arguments the model passes each block and hands its hidden-state input back unchanged, so one
  cheap forward (embeddings, masks, rotary tables) yields every block's call for a batch. The
  original ``forward`` (an accelerate wrapper included) is put back on exit, always.

A block is called as ``block(hidden, *rest, **kwargs)`` (or with the hidden states as a keyword);
it returns the next hidden states, alone or first in a tuple. Replaying a block on the previous
block's cached output with the arguments the model gave it is exact when the model's loop is a
plain chain (``h = block(h, ...)`` with arguments computed before the loop); the first batch
checks this (:func:`check_chain`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from torch import Tensor, nn

from ..errors import EvaError, _StopForward
from .module_names import PEFT_PREFIX
from .tokens import leading_tensor

#: Keyword arguments that carry a KV cache: replayed as None (the cache is disabled in these runs).
CACHE_KWARGS = ("past_key_values", "past_key_value", "layer_past", "cache_params")


def _is_cache(v) -> bool:
    """A transformers ``Cache`` (duck-typed: it knows its sequence length)."""
    return not isinstance(v, Tensor) and callable(getattr(v, "get_seq_length", None))


def scrub_cache(args: tuple, kwargs: dict) -> Tuple[tuple, dict]:
    """``args``/``kwargs`` with KV caches replaced by None and ``use_cache`` by False."""
    args = tuple(None if _is_cache(a) else a for a in args)
    kwargs = {k: (None if (k in CACHE_KWARGS or _is_cache(v)) else (False if k == "use_cache" else v))
              for k, v in kwargs.items()}
    return args, kwargs


@dataclass
class BlockCall:
    """How one block was called for one batch: the hidden-state input and everything else.

    ``slot``: ``0`` (first positional argument) or the keyword holding the hidden states;
    ``rest``: the other positional arguments; ``kwargs``: the keyword arguments (caches scrubbed).
    """

    slot: Any
    hidden: Optional[Tensor]
    rest: tuple
    kwargs: dict

    @classmethod
    def of(cls, name: str, args: tuple, kwargs: dict) -> "BlockCall":
        args, kwargs = scrub_cache(tuple(args), dict(kwargs))
        if args and isinstance(args[0], Tensor):
            return cls(0, args[0], args[1:], kwargs)
        key = "hidden_states" if isinstance(kwargs.get("hidden_states"), Tensor) else next(
            (k for k, v in kwargs.items() if isinstance(v, Tensor)), None)
        if key is None:
            raise EvaError(f"block {name} was called without a tensor argument, so its hidden states cannot be "
                           "cached; pass blocks= the model's list of decoder/encoder layers")
        rest = {k: v for k, v in kwargs.items() if k != key}
        return cls(key, kwargs[key], args, rest)

    def arguments(self, hidden: Tensor) -> Tuple[tuple, dict]:
        """``(args, kwargs)`` calling the block on ``hidden``."""
        if self.slot == 0:
            return (hidden,) + tuple(self.rest), dict(self.kwargs)
        return tuple(self.rest), {**self.kwargs, self.slot: hidden}


def hidden_of(output, name: str) -> Tensor:
    """The hidden states a block returned (the output, or its first element)."""
    hidden = leading_tensor(output)
    if hidden is not None:
        return hidden
    raise EvaError(f"block {name} returned {type(output).__name__}, not hidden states (a tensor, or a tuple "
                   "starting with one); pass blocks= the model's list of decoder/encoder layers")


class BlockList:
    """The repeated blocks of a model.

    Args:
        name: dotted name of the list in the model (``model.named_modules()`` spelling).
        modules: the blocks, in call order.
    """

    def __init__(self, name: str, modules: List[nn.Module]):
        self.name = name
        self.modules = list(modules)
        self._index: Dict[int, int] = {}
        for j, block in enumerate(self.modules):
            for m in block.modules():
                self._index[id(m)] = j
        self.returns_tuple: List[Optional[int]] = [None] * len(self.modules)  # tuple length per block, else None

    def __len__(self) -> int:
        return len(self.modules)

    def block_name(self, j: int) -> str:
        return f"{self.name}.{j}" if self.name else str(j)

    def index_of(self, module: nn.Module) -> Optional[int]:
        """The block holding ``module`` (None: outside every block)."""
        return self._index.get(id(module))

    def passthrough(self, j: int, hidden: Tensor):
        """What a stub of block ``j`` returns: ``hidden`` in the block's output format."""
        n = self.returns_tuple[j]
        return hidden if n is None else (hidden,) + (None,) * (n - 1)

    def run(self, j: int, hidden: Tensor, call: BlockCall) -> Tensor:
        """Block ``j`` on ``hidden`` with the rest of ``call``; its output hidden states."""
        args, kwargs = call.arguments(hidden)
        return hidden_of(self.modules[j](*args, **kwargs), self.block_name(j))


def _named_lists(model: nn.Module):
    for name, m in model.named_modules():
        if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) >= 1:
            yield name, m


def _same_class(lst) -> bool:
    kinds = {type(b) for b in lst}
    return len(kinds) == 1


def _size(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def find_blocks(model: nn.Module, name: Optional[str], weights: Optional[Dict[int, int]] = None) -> Optional[BlockList]:
    """The block list named ``name`` (also under a PeftModel's ``base_model.model.``), or, when
    ``name`` is None, the list of >= 2 same-class modules holding the most ``weights`` (module id
    -> bytes of its statistic: the targets), then the most parameters; None when there is none.

    Raises :class:`EvaError` when ``name`` is given but is not a module list of the model.
    """
    lists = dict(_named_lists(model))
    if name is not None:
        for cand in (name, PEFT_PREFIX + name):
            if cand in lists:
                return BlockList(cand, list(lists[cand]))
        shown = [n for n, m in lists.items() if len(m) >= 2 and _same_class(m)][:6]
        raise EvaError(f"blocks={name!r} is not an nn.ModuleList or nn.Sequential of the model; lists of "
                       f"same-class blocks in this model: {shown or 'none'}")
    best = None
    weights = weights or {}
    for lname, lst in lists.items():
        if len(lst) >= 2 and _same_class(lst):
            held = sum(weights.get(id(m), 0) for block in lst for m in block.modules())
            key = (held, _size(lst), len(lst))
            if best is None or key > best[0]:
                best = (key, lname, lst)
    return None if best is None else BlockList(best[1], list(best[2]))


def containing_lists(model: nn.Module, modules: List[nn.Module], exclude: str) -> Dict[str, List[str]]:
    """Block lists of ``model`` (>= 2 same-class modules, other than ``exclude``) that hold some
    of ``modules``: ``{list name: [names of the modules it holds]}`` (suggestions for ``blocks=``)."""
    names = {id(m): n for n, m in model.named_modules()}
    out: Dict[str, List[str]] = {}
    for lname, lst in _named_lists(model):
        if lname == exclude or len(lst) < 2 or not _same_class(lst):
            continue
        inside = {id(m) for block in lst for m in block.modules()}
        held = [names[id(m)] for m in modules if id(m) in inside and id(m) in names]
        if held:
            out[lname] = held
    return out


class BlockStubs:
    """Inside ``with``: each block's ``forward`` records its call and returns its hidden input.

    ``record(j, args, kwargs)`` receives every call; after the last block's call the forward is
    stopped (:class:`eva.errors._StopForward`): what follows the blocks is not needed.
    """

    _MISSING = object()

    def __init__(self, blocks: BlockList, record: Callable[[int, tuple, dict], Tensor]):
        self.blocks = blocks
        self.record = record
        self._saved: List[Any] = []

    def _stub(self, j: int):
        last = len(self.blocks) - 1

        def forward(*args, **kwargs):
            hidden = self.record(j, args, kwargs)
            if j == last:
                raise _StopForward()
            return self.blocks.passthrough(j, hidden)
        return forward

    def __enter__(self) -> "BlockStubs":
        for j, block in enumerate(self.blocks.modules):
            self._saved.append(block.__dict__.get("forward", self._MISSING))
            block.forward = self._stub(j)
        return self

    def __exit__(self, *exc) -> None:
        for block, saved in zip(self.blocks.modules, self._saved):
            if saved is self._MISSING:
                block.__dict__.pop("forward", None)
            else:
                block.forward = saved
        self._saved = []
