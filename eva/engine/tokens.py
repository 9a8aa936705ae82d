"""How a layer's input and a token rule become the rows a statistic consumes.

* :func:`masked_rows` — rows (N, d) of a layer input and the flat bool mask for the fused
  masked update (no gathered copy), for one token rule (:class:`eva.engine.masks.TokenMask`):

  ===========================  =====================================================
  layer input                   rows kept
  ===========================  =====================================================
  (B, T, d) (any lead shape)    the mask's (B, T) rows
  (B*T, d), flattened            the flattened mask (OPT's fc1/fc2 reshape their input)
  (B, d), one row per sequence   a sequence's row when it keeps any token (a pooler)
  (B, T', d), T' != T            the mask converted to T' positions as the model
                                 converts it (:meth:`SequenceLayout.convert_resolution`),
                                 else an error with the fix
  anything else                  an error naming the layer and the fix
  ===========================  =====================================================

  No rule (None) keeps every row.
* :func:`all_token_rows` — every row (PEFT's rule for layers without a layer-input function).
* :func:`layer_rows_and_mask` — the same rules on a PEFT-style model input (bool mask, 0/1
  mask, ``mask.nonzero()`` index list, a batch dict, None), for the public layer function.
* :func:`token_mask` — the built-in model-input rule on a dict batch, as one bool (B, T) mask.
* :func:`move_inputs_to_device` — batches to the model's device.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any, Callable, Optional, Tuple

import torch
from torch import Tensor

from ..errors import EvaError, EvaTypeError
from .masks import TokenMask

#: The fix for a layer whose input the token rules cannot read (tested by following it).
OWN_RULE_FIX = ("give this layer its own rule: prepare_layer_inputs_fn=eva.layer_input_rules({{{layer!r}: fn}}) "
                "with fn(layer_input, model_input, layer_name) returning the (tokens, d) rows to use; the other "
                "layers keep the default rule (with a plain dict instead, every layer missing from it would use "
                "every token, padding included: PEFT's rule)")


def leading_tensor(value) -> Optional[Tensor]:
    """``value`` when it is a tensor, else the first element of a non-empty tuple/list when that
    is one, else None (layer inputs, block outputs)."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], Tensor):
        return value[0]
    return None


def first_tensor(layer_input, layer_name: str) -> Tensor:
    """The activations of a layer call: the input tensor, or the first of a tuple."""
    x = leading_tensor(layer_input)
    if x is None:
        raise EvaTypeError(f"unsupported input type {type(layer_input)} for prepare_layer_inputs_fn in layer "
                           f"{layer_name}, please provide a custom prepare_layer_inputs_fn (it must return a "
                           "(tokens, d) tensor)")
    if x.dim() < 1:
        raise EvaError(f"layer {layer_name}: input is a scalar, expected (..., d) activations")
    return x


def all_token_rows(layer_input, layer_name: str) -> Tensor:
    """Every row of a layer's input as (N, d), no mask: PEFT's behaviour when a layer has no
    ``prepare_layer_inputs_fn`` (``None``, or missing from a mapping). Padding is included."""
    x = first_tensor(layer_input, layer_name)
    return x.reshape(-1, x.shape[-1])


def _fits(mask: Tensor, x: Tensor) -> bool:
    """Whether the mask rules of :func:`masked_rows` can apply ``mask`` to ``x`` at all."""
    lead = tuple(x.shape[:-1])
    if tuple(mask.shape) == lead or (mask.dim() == 1 and mask.numel() == math.prod(lead)):
        return True
    if x.dim() == 2 and mask.dim() >= 1 and x.shape[0] in (mask.numel(), mask.shape[0]):
        return True
    return x.dim() == 3 and mask.dim() == 2 and x.shape[0] == mask.shape[0]


def _resolution_error(layer: str, x: Tensor, mask: Tensor, what: str) -> EvaError:
    return EvaError(f"layer {layer}: its input has {x.shape[1]} positions per sequence (shape {tuple(x.shape)}) but "
                    f"{what} has {mask.shape[1]} (shape {tuple(mask.shape)}): another resolution, and the model has "
                    "no rule to convert its mask; leave attention_mask out of the batch to use every position, "
                    f"return a bool (batch, {x.shape[1]}) mask from prepare_model_inputs_fn when every target sees "
                    f"{x.shape[1]} positions, or " + OWN_RULE_FIX.format(layer=layer))


def _flat_mask(mask: Tensor, x: Tensor, layer: str, what: str, convert: Optional[Callable]) -> Tensor:
    lead = tuple(x.shape[:-1])
    if tuple(mask.shape) == lead or (mask.dim() == 1 and mask.numel() == math.prod(lead)):
        return mask.reshape(-1)
    if x.dim() == 2 and x.shape[0] == mask.numel():  # (B*T, d): the flattened sequence
        return mask.reshape(-1)
    if x.dim() == 2 and mask.dim() >= 2 and x.shape[0] == mask.shape[0]:  # (B, d): one row per sequence
        return mask.reshape(mask.shape[0], -1).any(dim=1)
    if x.dim() == 3 and mask.dim() == 2 and x.shape[0] == mask.shape[0]:  # (B, T', d): another resolution
        converted = convert(mask, x.shape[1]) if convert is not None else None
        if converted is None:
            raise _resolution_error(layer, x, mask, what)
        return converted.reshape(-1)
    raise EvaError(f"layer {layer}: its input of shape {tuple(x.shape)} is not rows of the token sequence that {what} "
                   f"(shape {tuple(mask.shape)}) masks: neither (B, T, d), nor (B*T, d) flattened, nor (B, d) one "
                   f"row per sequence; " + OWN_RULE_FIX.format(layer=layer))


def masked_rows(x: Tensor, rule: Optional[TokenMask], layer: str,
                convert: Optional[Callable[[Tensor, int], Optional[Tensor]]] = None,
                call: int = 0) -> Tuple[Tensor, Optional[Tensor]]:
    """Rows (N, d) of ``x`` (..., d) and the bool row mask (N,) of ``rule`` (module docstring).

    ``convert(mask (B, T), positions) -> (B, positions) or None``: the model's own conversion
    of a mask to another resolution; ``call``: which call of the layer in one forward (messages).
    No host sync (masks are moved with ``non_blocking``).
    """
    rows = x.reshape(-1, x.shape[-1])
    if rule is None:
        return rows, None
    lead = tuple(x.shape[:-1])
    mask, is_index = rule.for_input(lead, lambda m: _fits(m, x), layer)
    if mask is None:
        shown = rule.mask if rule.mask is not None else rule.index
        again = f" (call {call + 1} of the layer in one forward: it is called again on another input)" if call else ""
        raise EvaError(f"layer {layer}: its input of shape {tuple(x.shape)}{again} does not fit {rule.what} (shape "
                       f"{tuple(shown.shape)}); " + OWN_RULE_FIX.format(layer=layer))
    if mask.device != x.device:
        mask = mask.to(x.device, non_blocking=True)
    if is_index:
        return rows, mask.reshape(-1)
    key = ("flat", tuple(x.shape), x.device)
    cached = rule.cache.get(key)
    if cached is None:
        cached = rule.cache[key] = _flat_mask(mask, x, layer, rule.what, convert)
    return rows, cached


def layer_rows_and_mask(layer_input, model_input, layer_name: str) -> Tuple[Tensor, Optional[Tensor]]:
    """Rows (N, d) and an optional bool row mask (N,) of a layer input for a PEFT-style model input:
    a bool or 0/1 mask, PEFT's ``mask.nonzero()`` index list (told apart by
    :class:`eva.engine.masks.TokenMask`), a dict batch (its ``attention_mask``), or None (every row)."""
    x = first_tensor(layer_input, layer_name)
    if isinstance(model_input, Mapping):
        am = model_input.get("attention_mask")
        rule = None if am is None else TokenMask.read(am, "the batch's attention_mask", index_allowed=False)
    elif model_input is None:
        rule = None
    elif isinstance(model_input, Tensor):
        rule = TokenMask.read(model_input, "the model input")
    else:
        raise EvaError(f"layer {layer_name}: the model input is a {type(model_input).__name__}; the default layer "
                       "preparation expects a bool mask, an index tensor, a dict batch or None")
    return masked_rows(x, rule, layer_name)


def _tensor_value(batch: Mapping, key: str) -> Optional[Tensor]:
    """``batch[key]`` when present (None otherwise), refusing values that are not tensors."""
    v = batch.get(key)
    if v is None or isinstance(v, Tensor):
        return v
    raise EvaError(f"the batch's {key!r} is a {type(v).__name__}, not a tensor: EVA and the model need tensors; call "
                   "the tokenizer with return_tensors='pt' (or collate the batches into tensors)")


def batch_mask(batch: Mapping, mask_key: str) -> Optional[Tensor]:
    """The bool mask of a dict batch's ``mask_key`` read as a 0/1 mask (None: absent)."""
    am = _tensor_value(batch, mask_key)
    return None if am is None else TokenMask.read(am, f"the batch's {mask_key}", index_allowed=False).mask


def every_token(batch: Mapping, token_keys: Tuple[str, ...]) -> Optional[Tensor]:
    """An all-True (B, T) mask of the first token tensor present (ids (B, T), embeddings (B, T, d),
    token labels (B, T)), else None: what a user layer function receives when there is no mask."""
    for key in token_keys:
        t = _tensor_value(batch, key)
        if t is not None and t.dim() >= 2:
            lead = t.shape[:2] if key.endswith("embeds") else t.shape
            return torch.ones(lead, dtype=torch.bool, device=t.device)
    return None


def with_labels(mask: Optional[Tensor], batch: Mapping, label_mask_value: int, sequence: str) -> Optional[Tensor]:
    """``mask`` AND ``labels != label_mask_value`` for token labels (2-D); class labels pass."""
    labels = _tensor_value(batch, "labels")
    if labels is None or labels.dim() != 2:
        return mask
    keep = labels != label_mask_value
    if mask is None:
        return keep
    if tuple(labels.shape) != tuple(mask.shape):
        raise EvaError(f"the batch's labels (shape {tuple(labels.shape)}) do not match the {sequence} token mask "
                       f"(shape {tuple(mask.shape)}), so the label mask cannot be applied; give token labels of the "
                       "mask's shape, or set eva_config.use_label_mask=False")
    return mask & keep.to(mask.device)


def require_mapping(model_input) -> None:
    """The built-in model-input rule needs dict batches (PEFT's message first)."""
    if not isinstance(model_input, Mapping):
        raise EvaTypeError("When using `prepare_model_inputs_fn_language_modeling` inputs must be a dictionary; "
                           f"got {type(model_input).__name__} batches: pass dict batches (input_ids, attention_mask, "
                           "...); or, with a forward_fn that calls the model on your batches (e.g. lambda model, "
                           "batch: model(input_ids=batch[0], attention_mask=batch[1])), a prepare_model_inputs_fn that returns the bool token mask of a "
                           "batch (e.g. lambda batch, cfg: batch[1].bool()), or prepare_model_inputs_fn=None to use "
                           "every token")


def token_mask(model_input, use_label_mask: bool, label_mask_value: int) -> Optional[Tensor]:
    """Boolean token mask (B, T) of a dict batch: the attention mask (every token when the batch
    has only ``input_ids``/``inputs_embeds``), AND ``labels != label_mask_value`` when
    ``use_label_mask`` and the batch has token labels. None: the batch has no token sequence
    (every token)."""
    require_mapping(model_input)
    mask = batch_mask(model_input, "attention_mask")
    if use_label_mask:
        mask = with_labels(mask, model_input, label_mask_value, "input")
    return mask if mask is not None else every_token(model_input, ("input_ids", "inputs_embeds"))


def move_inputs_to_device(inputs: Any, device: Optional[torch.device]):
    """Recursively move tensors in dicts / lists / tuples (and objects with ``.to``) to ``device``."""
    if device is None:
        return inputs
    if isinstance(inputs, Tensor) or (hasattr(inputs, "to") and not isinstance(inputs, (Mapping, list, tuple))):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return type(inputs)({k: move_inputs_to_device(v, device) for k, v in inputs.items()})
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(move_inputs_to_device(v, device) for v in inputs)
    if not isinstance(inputs, (int, float, str, bool, type(None))):
        warnings.warn(f"input of type {type(inputs)} could not be moved to the correct device ({device}); "
                      "it is passed to forward_fn as it is")
    return inputs
