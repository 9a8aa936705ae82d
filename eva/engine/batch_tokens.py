"""The token rules of one batch, per sequence (:class:`BatchTokens`), and how they are built.

A batch becomes, per sequence of the model (:class:`eva.engine.sequences.SequenceLayout`:
``"input"``, or ``"encoder"`` and ``"decoder"``), a :class:`eva.engine.masks.TokenMask` or None
(every token):

* **the built-in rule** (``prepare_model_inputs_fn`` left at its default), :func:`from_batch`:
  ``"input"``/``"encoder"``: the batch's ``attention_mask``; ``"decoder"``:
  ``decoder_attention_mask``; a sequence without its mask key uses every token (also inputs
  without token ids: pixel values, audio features, ``inputs_embeds``). With the label mask on,
  ``labels != label_mask_value`` applies to the sequence the labels belong to: the decoder's in
  an encoder-decoder model, else the input's. A mask from the batch applies only where it
  reaches (``SequenceLayout.reached``).
* **``prepare_model_inputs_fn=None``**, :func:`from_model_input` with the batch itself: a dict
  batch gives its masks as above (no label mask); any other batch (a tensor of ids, a tuple)
  carries no mask, so every token is used.
* **a user ``prepare_model_inputs_fn``**, :func:`from_model_input` with what it returned: None
  (every token); one tensor (a bool or 0/1 mask, or an index list) for a one-sequence model; a
  dict ``{sequence name: tensor or None}`` (required for an encoder-decoder model: one tensor
  cannot say which sequence it masks); or a dict batch (its masks, as given).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Dict, Optional

import torch
from torch import Tensor

from ..errors import EvaError
from .masks import TokenMask
from .sequences import SequenceLayout
from .tokens import batch_mask, every_token, require_mapping, with_labels


class BatchTokens:
    """The token rules of one batch.

    Args:
        layout: the model's sequences.
        masks: per sequence, a :class:`TokenMask` or None (every token).
        views: what user layer functions receive: per sequence (``per_sequence=True``) or one
            object for all (the model input as the user returned it).
        from_batch: the masks were read from the batch (they apply only where they reach).
        single: one tensor a user returned for a model of several sequences (refused at use).
    """

    def __init__(self, layout: SequenceLayout, masks: Dict[str, Optional[TokenMask]], views: Any,
                 per_sequence: bool, from_batch: bool, single: Optional[TokenMask] = None):
        self.layout = layout
        self.masks = masks
        self.views = views
        self.per_sequence = per_sequence
        self.from_batch = from_batch
        self.single = single
        self.kept_tokens: Optional[int] = None  # tokens the masks keep, read by keeps_nothing (progress bar)

    def rule(self, layer: str, call: int) -> Optional[TokenMask]:
        """The token rule of call ``call`` of ``layer`` (None: every row)."""
        seq = self.layout.sequence(layer, call)
        if self.single is not None:
            raise EvaError(f"layer {layer}: prepare_model_inputs_fn returned one mask, but this encoder-decoder "
                           f"model has two token sequences ({', '.join(self.layout.sequences)}), so it cannot say "
                           "which one it masks; return a dict {'encoder': mask or None, 'decoder': mask or None} "
                           "(None: every token)")
        if self.from_batch and not self.layout.reached(layer, seq):
            return None
        return self.masks.get(seq)

    def user_input(self, layer: str, call: int) -> Any:
        """What a user ``prepare_layer_inputs_fn`` receives as ``model_input`` for this call."""
        if not self.per_sequence:
            return self.views
        seq = self.layout.sequence(layer, call)
        if self.from_batch and not self.layout.reached(layer, seq):
            return None
        return self.views.get(seq)

    def keeps_nothing(self) -> bool:
        """Every mask given keeps no token (and at least one is given); one host sync in all.
        The same sync sets :attr:`kept_tokens`: the tokens the masks keep, over every sequence
        (None when a rule has no mask reading, e.g. an index list)."""
        rules = [self.single] if self.single is not None else [m for m in self.masks.values() if m is not None]
        if not rules:
            return False
        with_mask = [r for r in rules if r.mask is not None]
        counts = torch.stack([r.mask.sum() for r in with_mask]).tolist() if with_mask else []
        kept = {id(r): c > 0 for r, c in zip(with_mask, counts)}
        self.kept_tokens = int(sum(counts)) if len(with_mask) == len(rules) else None
        verdicts = [r.keeps_nothing(kept.get(id(r))) for r in rules]
        return all(v is True for v in verdicts)


def from_batch(batch, layout: SequenceLayout, use_label_mask: bool, label_mask_value: int,
               per_sequence_views: bool = True) -> BatchTokens:
    """The built-in rule on a dict batch (module docstring); raises for other batches."""
    require_mapping(batch)
    if layout.encoder_decoder:
        masks = {"encoder": batch_mask(batch, "attention_mask"), "decoder": batch_mask(batch, "decoder_attention_mask")}
        labelled, tokens = "decoder", {"encoder": ("input_ids", "inputs_embeds"),
                                       "decoder": ("decoder_input_ids", "decoder_inputs_embeds", "labels")}
    else:
        masks = {"input": batch_mask(batch, "attention_mask")}
        labelled, tokens = "input", {"input": ("input_ids", "inputs_embeds")}
    if use_label_mask:
        masks[labelled] = with_labels(masks[labelled], batch, label_mask_value, labelled)
    views = {seq: (m if m is not None else every_token(batch, tokens[seq])) for seq, m in masks.items()}
    rules = {seq: (None if m is None else TokenMask.read(m, f"the batch's {seq} mask")) for seq, m in masks.items()}
    return BatchTokens(layout, rules, views, per_sequence=per_sequence_views, from_batch=True)


def from_model_input(model_input, layout: SequenceLayout, is_batch: bool) -> BatchTokens:
    """Token rules from a model input: the batch itself (``is_batch``: ``prepare_model_inputs_fn=None``)
    or what a user ``prepare_model_inputs_fn`` returned (module docstring)."""
    none = {seq: None for seq in layout.sequences}
    if model_input is None:
        return BatchTokens(layout, none, model_input, per_sequence=False, from_batch=False)
    if isinstance(model_input, Mapping):
        keys = set(model_input)
        named = keys & {"input", "encoder", "decoder"}
        if not is_batch and keys and keys == named:
            if not keys <= set(layout.sequences):
                raise EvaError(f"prepare_model_inputs_fn returned masks for {sorted(keys)}, but this model's token "
                               f"sequences are {list(layout.sequences)}; "
                               + ("return one mask (a tensor)" if len(layout.sequences) == 1
                                  else "return a dict with those keys"))
            masks = dict(none)
            for k, v in model_input.items():
                if v is not None and not isinstance(v, Tensor):
                    raise EvaError(f"prepare_model_inputs_fn returned a {type(v).__name__} for the {k} sequence; "
                                   "give a bool mask tensor or None (every token)")
                masks[k] = None if v is None else TokenMask.read(v, f"prepare_model_inputs_fn's {k!r} mask")
            return BatchTokens(layout, masks, model_input, per_sequence=False, from_batch=False)
        tokens = from_batch(model_input, layout, use_label_mask=False, label_mask_value=0, per_sequence_views=False)
        tokens.views, tokens.from_batch = model_input, is_batch
        return tokens
    if is_batch:  # a tensor or tuple batch is data, not a mask: every token
        return BatchTokens(layout, none, model_input, per_sequence=False, from_batch=True)
    if isinstance(model_input, Tensor):
        rule = TokenMask.read(model_input, "the tensor prepare_model_inputs_fn returned")
        if layout.encoder_decoder:
            return BatchTokens(layout, none, model_input, per_sequence=False, from_batch=False, single=rule)
        return BatchTokens(layout, {"input": rule}, model_input, per_sequence=False, from_batch=False)
    raise EvaError(f"prepare_model_inputs_fn returned {type(model_input).__name__}; the default layer preparation "
                   "expects a bool (batch, seq) mask, a 0/1 mask, an index tensor (mask.nonzero()), a dict of masks "
                   f"per sequence ({', '.join(layout.sequences)}), or None (every token)")
