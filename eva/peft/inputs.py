"""PEFT-compatible input functions (same signatures as ``peft.tuners.lora.eva``).

``prepare_model_inputs_fn(model_input, peft_config)`` runs once per batch; its result is
handed to ``prepare_layer_inputs_fn(layer_input, model_input, layer_name)``, which returns
the 2-D (tokens, d) activations of one layer.

Our default model-input function returns a *boolean token mask* (B, T) instead of PEFT's
index list; the engine recognises both defaults and never materialises ``x[mask]``: it passes
``x.reshape(-1, d)`` and the flat mask to the fused ``cov_update`` (:mod:`eva.engine.tokens`).
The defaults also accept what PEFT's functions produce (index tensors of shape (N, 2)).
"""
from __future__ import annotations

from typing import Callable, Mapping, Optional

from torch import Tensor

from ..config import eva_values
from ..engine.capture import LayerInputRules
from ..engine.tokens import layer_rows_and_mask, token_mask


def forward_fn_dict(model, inputs):
    """Default forward: ``model(**inputs)``."""
    return model(**inputs)


def prepare_model_inputs_fn_language_modeling(model_input, peft_config) -> Optional[Tensor]:
    """Boolean token mask (B, T): the attention mask, AND ``labels != label_mask_value``
    when ``eva_config.use_label_mask`` (defaults: :mod:`eva.config`) and the batch has labels;
    None when the batch has no token sequence (every token).

    Passed to :func:`eva.get_eva_state_dict` (the default), the engine applies the same rule per
    sequence: an encoder-decoder model's encoder layers take ``attention_mask``, its decoder
    layers ``decoder_attention_mask`` and the labels (:mod:`eva.engine.batch_tokens`)."""
    values = eva_values(peft_config)
    return token_mask(model_input, values["use_label_mask"], values["label_mask_value"])


def prepare_layer_inputs_fn_language_modeling(layer_input, model_input, layer_name) -> Tensor:
    """PEFT-compatible: the kept (tokens, d) rows of a layer's input (gathers a copy).

    The engine recognises this default and uses the fused masked path instead of calling it.
    """
    rows, mask = layer_rows_and_mask(layer_input, model_input, layer_name)
    return rows if mask is None else rows[mask]




def layer_input_rules(overrides: Mapping[str, Callable],
                      default: Optional[Callable] = prepare_layer_inputs_fn_language_modeling) -> LayerInputRules:
    """A ``prepare_layer_inputs_fn`` mapping for a few layers whose every other layer keeps ``default``.

    A plain dict follows PEFT's rule: a target layer missing from it uses every token of its
    input, padding included. ``layer_input_rules({"model.layers.0.mlp.fc1": fn})`` gives ``fn`` to
    that layer and the default masked rule (padding and label mask) to all the others.
    ``default=None`` restores PEFT's rule for the others.
    """
    return LayerInputRules(overrides, default)
