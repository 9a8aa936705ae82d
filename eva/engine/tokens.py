"""How a batch and a layer's input become the token rows a statistic consumes.

* :func:`token_mask` — the built-in model-input rule: a boolean (B, T) token mask from the
  attention mask, AND ``labels != label_mask_value`` when the label mask is on.
* :func:`layer_rows_and_mask` — rows (N, d) of a layer's input and the flat mask for the fused
  masked update (no gathered copy); :func:`all_token_rows` — every row (PEFT's rule for layers
  without a layer-input function).
* :func:`move_inputs_to_device` — batches to the model's device.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, Optional, Tuple

import torch
from torch import Tensor

from ..errors import EvaError, EvaTypeError


def token_mask(model_input, use_label_mask: bool, label_mask_value: int) -> Tensor:
    """Boolean token mask (B, T): the attention mask (every token when the batch has only
    ``input_ids``), AND ``labels != label_mask_value`` when ``use_label_mask`` and the batch has
    labels of the mask's shape."""
    if not isinstance(model_input, Mapping):
        raise EvaTypeError("When using `prepare_model_inputs_fn_language_modeling` inputs must be a dictionary; "
                           f"got {type(model_input).__name__} batches: pass dict batches (input_ids, attention_mask, "
                           "...), or prepare_model_inputs_fn=None (or your own function)")
    if "attention_mask" in model_input:
        mask = model_input["attention_mask"].bool()
    elif "input_ids" in model_input:
        mask = torch.ones_like(model_input["input_ids"], dtype=torch.bool)
    else:
        raise EvaError("batch has neither attention_mask nor input_ids: pass prepare_model_inputs_fn")
    if use_label_mask and "labels" in model_input:
        labels = model_input["labels"]
        if labels.shape == mask.shape:
            mask = mask & (labels != label_mask_value)
    return mask


def leading_tensor(value) -> Optional[Tensor]:
    """``value`` when it is a tensor, else the first element of a non-empty tuple/list when that
    is one, else None (layer inputs, block outputs)."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], Tensor):
        return value[0]
    return None


def _first_tensor(layer_input, layer_name: str) -> Tensor:
    x = leading_tensor(layer_input)
    if x is not None:
        return x
    raise EvaTypeError(f"unsupported input type {type(layer_input)} for prepare_layer_inputs_fn in layer {layer_name}, "
                       "please provide a custom prepare_layer_inputs_fn (it must return a (tokens, d) tensor)")


def all_token_rows(layer_input, layer_name: str) -> Tensor:
    """Every row of a layer's input as (N, d), no mask: PEFT's behaviour when a layer has no
    ``prepare_layer_inputs_fn`` (``None``, or missing from a mapping). Padding is included."""
    x = _first_tensor(layer_input, layer_name)
    if x.dim() < 1:
        raise EvaError(f"layer {layer_name}: input is a scalar, expected (..., d) activations")
    return x.reshape(-1, x.shape[-1])


def layer_rows_and_mask(layer_input, model_input, layer_name: str) -> Tuple[Tensor, Optional[Tensor]]:
    """Rows (N, d) and an optional bool row mask (N,) for the default path (no copy when possible).

    * mask (B, T) and input (B, T, d): flatten both;
    * mask (B, T) and input (B, d) (a pooler: no sequence dimension): one row per sequence,
      kept when the sequence has any kept token;
    * index tensor (N, ndim) (PEFT's ``mask.nonzero()``): gathered rows, no mask;
    * None or a dict without ``attention_mask``: every row.
    """
    x = _first_tensor(layer_input, layer_name)
    if x.dim() < 1:
        raise EvaError(f"layer {layer_name}: input is a scalar, expected (..., d) activations")
    d = x.shape[-1]
    mask = model_input
    if isinstance(mask, Mapping):
        mask = mask.get("attention_mask")
        mask = mask.bool() if mask is not None else None
    if mask is None:
        return x.reshape(-1, d), None
    if not isinstance(mask, Tensor):
        raise EvaError(f"layer {layer_name}: prepare_model_inputs_fn returned {type(mask).__name__}; "
                       "the default layer preparation expects a bool mask, an index tensor or None")
    if mask.dtype == torch.bool:
        if mask.device != x.device:
            mask = mask.to(x.device, non_blocking=True)
        lead = tuple(x.shape[:-1])
        if lead == tuple(mask.shape):
            return x.reshape(-1, d), mask.reshape(-1)
        if x.dim() == 2 and mask.dim() >= 2 and x.shape[0] == mask.shape[0]:
            return x, mask.reshape(mask.shape[0], -1).any(dim=1)
        raise EvaError(f"layer {layer_name}: input of shape {tuple(x.shape)} does not match the token mask "
                       f"of shape {tuple(mask.shape)}; pass prepare_layer_inputs_fn={{'{layer_name}': fn}} "
                       "for this layer")
    if mask.dtype in (torch.int64, torch.int32) and mask.dim() == 2:
        idx = mask.to(x.device)
        if idx.shape[1] == x.dim() - 1:
            return x[tuple(idx.T)], None
    raise EvaError(f"layer {layer_name}: cannot use model input of dtype {mask.dtype} and shape "
                   f"{tuple(mask.shape)} as a token mask; to use every token pass prepare_layer_inputs_fn=None, "
                   "or make prepare_model_inputs_fn return a bool (batch, seq) mask")


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
