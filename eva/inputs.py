"""Model-input and layer-input preparation (PEFT-compatible signatures).

``prepare_model_inputs_fn(model_input, peft_config)`` runs once per batch; its result is
handed to ``prepare_layer_inputs_fn(layer_input, model_input, layer_name)``, which returns
the 2-D (tokens, d) activations of one layer.

Our default model-input function returns a *boolean token mask* (B, T) instead of PEFT's
index list; with the default layer-input function the engine never materialises
``x[mask]``: it passes ``x.reshape(-1, d)`` and the flat mask to the fused ``cov_update``.
The defaults also accept what PEFT's functions produce (index tensors of shape (N, 2)).
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, Optional, Tuple

import torch
from torch import Tensor

from .errors import EvaError, EvaTypeError


def forward_fn_dict(model, inputs):
    """Default forward: ``model(**inputs)``."""
    return model(**inputs)


def prepare_model_inputs_fn_language_modeling(model_input, peft_config) -> Tensor:
    """Boolean token mask (B, T): the attention mask, AND ``labels != label_mask_value``
    when ``eva_config.use_label_mask`` (default True) and the batch has labels."""
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
    eva_cfg = getattr(peft_config, "eva_config", None)
    use_label_mask = getattr(eva_cfg, "use_label_mask", True)
    if use_label_mask and "labels" in model_input:
        labels = model_input["labels"]
        if labels.shape == mask.shape:
            mask = mask & (labels != getattr(eva_cfg, "label_mask_value", -100))
    return mask


def _first_tensor(layer_input, layer_name: str) -> Tensor:
    if isinstance(layer_input, Tensor):
        return layer_input
    if isinstance(layer_input, (tuple, list)) and layer_input and isinstance(layer_input[0], Tensor):
        return layer_input[0]
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


def prepare_layer_inputs_fn_language_modeling(layer_input, model_input, layer_name) -> Tensor:
    """PEFT-compatible: the kept (tokens, d) rows of a layer's input (gathers a copy).

    The engine recognises this default and uses the fused masked path instead of calling it.
    """
    rows, mask = layer_rows_and_mask(layer_input, model_input, layer_name)
    return rows if mask is None else rows[mask]


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
