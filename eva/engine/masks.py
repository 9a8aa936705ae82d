"""What a token mask means, read without guessing.

A token rule (from the batch's ``attention_mask``, or returned by a ``prepare_model_inputs_fn``)
is one of:

* a **bool** tensor: ``True`` keeps the row; its shape is the leading shape of the activations
  it masks, e.g. (B, T) for (B, T, d) inputs;
* an **integer or floating tensor holding only 0 and 1**: the same as a bool mask (a
  tokenizer's ``attention_mask`` is int64);
* an **integer (N, k) index tensor** as ``mask.nonzero()`` returns it (PEFT's default model
  input): each row the index of a kept row in the activations' ``k`` leading dimensions, rows
  sorted and without repeats.

:meth:`TokenMask.read` tells these apart once per batch (one host copy, for integer tensors
only). An integer tensor can fit both readings (an (N, 2) tensor of 0s and 1s); it is then read
against the layer's input: when only one reading fits that input, it is used; when both fit and
keep different rows, :class:`~eva.errors.EvaError` says what to return instead. Nothing else is
ever reinterpreted: a tensor that fits no reading is refused with its dtype and shape.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

from ..errors import EvaError

#: What to return instead of an unreadable or ambiguous mask (used in messages).
RETURN_BOOL = "return a bool (batch, seq) tensor (True = keep) from prepare_model_inputs_fn"


def _is_sorted_unique(rows: Tensor) -> bool:
    """Rows of an (N, k) integer tensor strictly increasing in lexicographic order."""
    if rows.shape[0] < 2:
        return True
    a, b = rows[:-1], rows[1:]
    # first column where consecutive rows differ decides the order
    diff = (b != a)
    first = diff.float().argmax(dim=1)
    has = diff.any(dim=1)
    pick = torch.gather(b - a, 1, first[:, None])[:, 0]
    return bool((has & (pick > 0)).all())


class TokenMask:
    """One token rule of one batch, read once (see the module docstring).

    Attributes:
        mask: the mask reading, a bool tensor of the given tensor's shape (None: it is not a mask).
        index: the index reading, an int64 (N, k) tensor on the given device (None: not an index).
        index_extent: per index column, ``max + 1`` (host ints), for range checks.
        what: how the rule is named in messages (``"attention_mask"``, ``"prepare_model_inputs_fn"``).
    """

    def __init__(self, mask: Optional[Tensor], index: Optional[Tensor], index_extent: Tuple[int, ...], what: str):
        self.mask = mask
        self.index = index
        self.index_extent = index_extent
        self.what = what
        self._as_mask: Dict[Tuple[tuple, torch.device], Tensor] = {}
        self.cache: Dict[Any, Tensor] = {}  # per input shape: the flat row mask (eva.engine.tokens)

    @classmethod
    def read(cls, t: Tensor, what: str, index_allowed: bool = True) -> "TokenMask":
        """Read ``t`` (see the module docstring); raises :class:`EvaError` when no reading fits.

        ``index_allowed=False`` for a tensor known to be a mask (a batch's ``attention_mask``):
        integer values are then read on the device as "nonzero keeps" (no host copy), floating
        ones are checked to be 0/1."""
        if not isinstance(t, Tensor):
            raise EvaError(f"{what} is a {type(t).__name__}, not a tensor; {RETURN_BOOL}")
        if t.dtype == torch.bool:
            return cls(t, None, (), what)
        if t.is_complex():
            raise EvaError(f"{what} has dtype {t.dtype}, which is no token mask; {RETURN_BOOL}")
        if not index_allowed and not t.is_floating_point():
            # a known integer mask (a batch's attention_mask): nonzero keeps, read on the device (no host sync)
            return cls(t != 0, None, (), what)
        host = t.detach().cpu()
        binary = bool(((host == 0) | (host == 1)).all()) if host.numel() else True
        mask = (t != 0) if binary else None
        index, extent = None, ()
        if index_allowed and not t.is_floating_point() and t.dim() == 2 and t.shape[1] >= 1:
            if host.numel() == 0 or (bool((host >= 0).all()) and _is_sorted_unique(host)):
                index = t.to(torch.int64)
                extent = tuple(int(v) + 1 for v in host.max(dim=0).values) if host.shape[0] else (0,) * t.shape[1]
        if mask is None and index is None:
            kind = ("an integer tensor" if not t.is_floating_point() else "a floating tensor")
            not_index = (" and it is not an index list as mask.nonzero() returns it (sorted rows, no repeats, no "
                         "negative values)," if index_allowed else "")
            raise EvaError(f"{what} is {kind} of shape {tuple(t.shape)} holding values other than 0 and 1,{not_index} "
                           f"so it cannot be read as a token mask; {RETURN_BOOL}")
        return cls(mask, index, extent, what)

    def keeps_nothing(self, mask_kept: Optional[bool] = None) -> Optional[bool]:
        """True when the rule keeps no row, False when it keeps some, None when that depends on
        the layer (both readings possible). ``mask_kept``: whether the mask reading keeps any row,
        when the caller already read it (host sync otherwise)."""
        readings = []
        if self.mask is not None:
            readings.append(not (bool(self.mask.any()) if mask_kept is None else mask_kept))
        if self.index is not None:
            readings.append(self.index.shape[0] == 0)
        return readings[0] if len(set(readings)) == 1 else None

    def _index_fits(self, lead: Tuple[int, ...]) -> bool:
        return (self.index is not None and self.index.shape[1] == len(lead)
                and all(e <= n for e, n in zip(self.index_extent, lead)))

    def index_as_mask(self, lead: Tuple[int, ...], device: torch.device) -> Tensor:
        """The index reading as a bool mask of shape ``lead`` on ``device`` (cached per batch)."""
        key = (lead, device)
        if key not in self._as_mask:
            m = torch.zeros(lead, dtype=torch.bool, device=device)
            if self.index.shape[0]:
                m[tuple(self.index.to(device).T)] = True
            self._as_mask[key] = m
        return self._as_mask[key]

    def for_input(self, lead: Tuple[int, ...], fits_mask, layer: str) -> Tuple[Optional[Tensor], bool]:
        """The reading to use for a layer input of leading shape ``lead``.

        ``fits_mask(mask)`` says whether the mask reading can be applied to the input (by the
        layer rules of :mod:`eva.engine.tokens`). Returns ``(bool mask, is_index)``: the index
        reading comes back already as a bool mask of shape ``lead``; ``(mask, False)`` means the
        mask reading, for the caller's rules; ``(None, False)`` when neither fits.
        """
        by_index = self._index_fits(lead)
        by_mask = self.mask is not None and fits_mask(self.mask)
        if by_index and by_mask:
            as_index = self.index_as_mask(lead, self.mask.device)
            if tuple(self.mask.shape) != lead or not torch.equal(as_index, self.mask.to(as_index.device)):
                raise EvaError(f"layer {layer}: {self.what} (dtype {self.index.dtype}, shape "
                               f"{tuple(self.mask.shape)}) is ambiguous for an input of leading shape {lead}: read as "
                               "a 0/1 mask and read as a mask.nonzero() index list it keeps different rows; "
                               f"{RETURN_BOOL}")
            return as_index, True
        if by_index:
            return self.index_as_mask(lead, self.index.device), True
        if by_mask:
            return self.mask, False
        return None, False
