"""Loading an EVA state dict into a ``PeftModel``'s LoRA layers.

For every LoRA layer of ``adapter_name``:

* found with rank 0: the LoRA wrapper is replaced by its base layer;
* found with rank r' != r (or LoRA weights still on meta): ``update_layer`` re-creates the
  adapter with rank r' and ``alpha * r' / r`` when ``adjust_scaling_factors``;
* lora_A <- the components (cast to lora_A's dtype/device), lora_B <- 0;
* missing (no entry, or a LoRA layer type EVA does not initialise: Embedding, Conv2d, ...):
  default LoRA init (``init_lora_weights=True``) and PEFT's warning; the layer stays in
  ``target_modules``, so a saved adapter keeps it.

Entries are placed by :func:`eva.peft.names.match_names`: a result records the module tree it
was computed on (``metadata["model"]``), so one computed on ``AutoModel`` loads into a PEFT model
of ``AutoModelForCausalLM`` (names ``base_model.model.model....``) and vice versa; a result of
another model type is refused naming both models.

``rank_pattern``, ``alpha_pattern`` and ``target_modules`` of the adapter's config are updated.
Every entry is checked (shape vs the layer's in_features, unknown names) before any layer changes.
"""
from __future__ import annotations

import warnings
from copy import copy
from typing import Dict, Optional

import torch

from ..config import eva_values
from ..errors import EvaError
from .names import ModelFrame, match_names, model_frame
from .suggest import closest
from .targets import PEFT_PREFIX, _pattern_key, in_features_of


def _saved_frame(eva_state_dict) -> Optional[ModelFrame]:
    """The module tree the state dict was computed on (``metadata["model"]``), None when not recorded."""
    return ModelFrame.from_metadata(getattr(eva_state_dict, "metadata", {}).get("model"))


def _both_models(model, eva_state_dict) -> str:
    """``"; it was computed on X and this model is Y"`` when the state dict records its model, else ``""``."""
    saved = _saved_frame(eva_state_dict)
    if saved is None:
        return ""
    return f"; it was computed on {saved.describe()} and this model is {model_frame(model).describe()}"


def _unknown_message(unknown, mapped_lora, adapter_name: str, model, eva_state_dict) -> str:
    """Why entries have no LoRA layer, naming both models and the closest LoRA layers."""
    near = closest(unknown[0], mapped_lora) or closest(unknown[0].rsplit(".", 1)[-1], mapped_lora)
    hint = f"; the closest LoRA layers are {near}" if near else ""
    return (f"eva_state_dict has entries for layers without a LoRA adapter {adapter_name!r}: {unknown[:5]}"
            f"{_both_models(model, eva_state_dict)}{hint}; was it computed for another model or target_modules? "
            "Give LoraConfig the target_modules the file was computed for (eva inspect FILE prints them)")


def load_eva_into_peft_model(model, eva_state_dict: Dict[str, torch.Tensor], adapter_name: str) -> None:
    from peft.tuners.lora.layer import LoraLayer
    from peft.tuners.tuners_utils import _find_minimal_target_modules
    from peft.utils.constants import MIN_TARGET_MODULES_FOR_OPTIMIZATION
    from peft.utils.other import _get_submodules

    config = copy(model.peft_config[adapter_name])
    adjust = eva_values(config)["adjust_scaling_factors"]

    lora_layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    adapted = {n for n, m in lora_layers if adapter_name in getattr(m, "r", {})}  # every LoRA type keeps r per adapter
    placed = match_names(eva_state_dict, _saved_frame(eva_state_dict), model_frame(model), adapted.__contains__)
    key_of = {name: key for key, name in placed.items() if name is not None}
    unknown = [k for k, name in placed.items() if name is None]
    if unknown:
        raise EvaError(_unknown_message(unknown, sorted(adapted), adapter_name, model, eva_state_dict))
    plan = []
    for name, module in lora_layers:
        if name not in adapted:
            continue
        key = key_of.get(name)
        w = None
        if key is not None:
            w = eva_state_dict[key]
            d = in_features_of(module)
            if d is None:
                raise EvaError(f"eva_state_dict[{key!r}]: layer {name} is a LoRA {type(module).__name__}, which EVA "
                               "does not initialise (only Linear and Conv1D); remove the entry")
            if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.shape[1] != d:
                raise EvaError(f"eva_state_dict[{key!r}] has shape {tuple(getattr(w, 'shape', ()))} but layer "
                               f"{name} needs (rank, {d}){_both_models(model, eva_state_dict)}")
            if not torch.isfinite(w).all():
                raise EvaError(f"eva_state_dict[{key!r}] contains NaN/Inf")
        plan.append((name, module, w))

    rank_pattern, alpha_pattern, kept, missing, others = {}, {}, [], [], []
    lora_names = {n for n, _ in lora_layers}
    for name, _ in model.named_modules():
        if name not in lora_names:
            others.append(name.replace(PEFT_PREFIX, ""))
    for name, module, w in plan:
        bare = name.replace(PEFT_PREFIX, "")
        rk = _pattern_key(config.rank_pattern, name) if config.rank_pattern else None
        r = config.rank_pattern[rk] if rk is not None else config.r
        ak = _pattern_key(config.alpha_pattern, name) if config.alpha_pattern else None
        alpha = config.alpha_pattern[ak] if ak is not None else config.lora_alpha
        if w is None:
            cfg = copy(config)
            cfg.init_lora_weights = True
            module.update_layer(adapter_name=adapter_name, r=r, lora_alpha=alpha, config=cfg)
            missing.append(bare)
            new_rank = r
        else:
            new_rank = int(w.shape[0])
            if new_rank == 0:
                parent, _, target_name = _get_submodules(model, name)
                setattr(parent, target_name, module.get_base_layer())
                continue
            if new_rank != r and adjust:
                alpha = alpha * new_rank / r
            lora_a = module.lora_A[adapter_name].weight
            if new_rank != r or lora_a.device.type == "meta":
                cfg = copy(config)
                cfg.init_lora_weights = "eva"
                module.update_layer(adapter_name=adapter_name, r=new_rank, lora_alpha=alpha, config=cfg)
            lora_a = module.lora_A[adapter_name].weight
            lora_a.data.copy_(w.to(device=lora_a.device, dtype=lora_a.dtype))
            torch.nn.init.zeros_(module.lora_B[adapter_name].weight)
            kept.append(bare)
        if new_rank != config.r:
            rank_pattern[bare] = new_rank
        if alpha != config.lora_alpha:
            alpha_pattern[bare] = alpha

    targets = kept + missing
    if len(targets) >= MIN_TARGET_MODULES_FOR_OPTIMIZATION:
        targets = _find_minimal_target_modules(targets, others)
    model.peft_config[adapter_name].target_modules = targets
    model.peft_config[adapter_name].rank_pattern = rank_pattern
    model.peft_config[adapter_name].alpha_pattern = alpha_pattern
    if missing:
        kinds = sorted({type(m).__name__ for n, m, w in plan if w is None and in_features_of(m) is None})
        detail = (f"; EVA initialises LoRA layers on nn.Linear and transformers Conv1D only (these are LoRA {kinds})"
                  if kinds else "")
        warnings.warn("the following layers were initialized with init_lora_weights=True because they were not "
                      f"found in the eva state_dict: {missing}{detail}")
