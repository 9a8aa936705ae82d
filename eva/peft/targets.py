"""Which modules EVA computes components for, their input width and their LoRA rank.

* Plain model + ``LoraConfig``: ``nn.Linear`` and transformers' ``Conv1D`` whose names match
  ``target_modules`` (PEFT's own matcher when peft is installed; ``"all-linear"`` supported).
* ``PeftModel``: every LoRA layer wrapping a Linear / Conv1D (PEFT's rule); names are the
  PeftModel's own (``base_model.model....``), as PEFT's state dicts use.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, List, Optional

import torch
from torch import nn

from ..engine.module_names import PEFT_PREFIX  # noqa: F401  (re-exported: the names of eva.peft use it)
from ..errors import EvaError


@dataclass
class Target:
    name: str            # module name in ``model.named_modules()``
    module: nn.Module
    in_features: int     # d: width of the activations fed to the layer
    rank: int            # the LoRA rank r for this layer (rank_pattern aware)
    max_components: int  # round(r * rho), capped at d


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
        return Conv1D
    except Exception:  # transformers is optional
        return None


def in_features_of(module: nn.Module) -> Optional[int]:
    """Input width of a Linear / Conv1D / LoRA wrapper, else None."""
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    if isinstance(base, nn.Linear):
        return base.in_features
    conv1d = _conv1d_type()
    if conv1d is not None and isinstance(base, conv1d):
        return base.weight.shape[0]  # Conv1D stores weight as (in, out)
    return None


def _pattern_key(patterns, name: str) -> Optional[str]:
    """Key of ``patterns`` whose regex matches the end of ``name`` (PEFT's rank_pattern rule)."""
    try:
        from peft.utils.other import get_pattern_key
        key = get_pattern_key(list(patterns), name)
        return key if key in patterns else None
    except ImportError:
        for key in patterns:
            if re.match(rf"(.*\.)?({key})$", name):
                return key
        return None


def _matches(peft_config: Any, target_modules: Any, name: str) -> bool:
    if target_modules is None:
        return True
    try:
        from peft.tuners.tuners_utils import check_target_module_exists
        if hasattr(peft_config, "target_modules"):
            return bool(check_target_module_exists(peft_config, name))
    except ImportError:
        pass
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


#: Attribute names of classification heads PEFT leaves out of all-linear for task_type SEQ_CLS.
SEQ_CLS_HEADS = ("score", "classifier")


def _all_linear_excluded(model: nn.Module, peft_config: Any) -> set:
    """Names ``"all-linear"`` leaves out, as PEFT does: the output embedding (lm_head), else, for
    ``task_type="SEQ_CLS"``, the classification head (``score`` / ``classifier``)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None and str(getattr(peft_config, "task_type", "") or "").upper().endswith("SEQ_CLS"):
        head = next((getattr(model, n) for n in SEQ_CLS_HEADS if isinstance(getattr(model, n, None), nn.Module)), None)
    return {n for n, m in model.named_modules() if head is not None and m is head}


def unmatched_target_entries(model: nn.Module, target_modules: Any, is_peft_model: bool) -> List[str]:
    """Entries of a list/set ``target_modules`` that name no module of ``model`` (PEFT's rule for a
    list: an entry matches a module name equal to it or ending in ``"." + entry``). PEFT accepts
    such entries silently when another entry matches; a typo then drops that layer type from the
    run. A ``PeftModel`` is checked on its base model's names. Regex strings are not checked
    entry by entry (one pattern)."""
    if not isinstance(target_modules, (list, tuple, set, frozenset)):
        return []
    names = [n[len(PEFT_PREFIX):] if is_peft_model and n.startswith(PEFT_PREFIX) else n
             for n, _ in model.named_modules() if n]
    return sorted(t for t in target_modules if not any(n == t or n.endswith("." + t) for n in names))


def unmatched_target_message(model: nn.Module, unmatched: List[str], what: str, partial: bool = True) -> str:
    """One line: the ``what`` entries that match nothing, the closest layer names, and the fix
    (``partial``: other entries do match, so these would have been skipped silently)."""
    from .suggest import closest, name_suffixes
    linear = name_suffixes(n for n, m in model.named_modules() if n and in_features_of(m) is not None)
    hints = []
    for t in unmatched:
        near = closest(t, linear)
        hints.append(f"{t!r} (closest: {', '.join(near)})" if near else repr(t))
    many = len(unmatched) > 1
    silently = (f" (otherwise {'they are' if many else 'it is'} skipped silently while other entries match)"
                if partial else "")
    return (f"{what} {'entries' if many else 'entry'} {'; '.join(hints)} match{'' if many else 'es'} no layer of the "
            f"model; fix or remove {'them' if many else 'it'}{silently}; an entry matches a module name or its "
            "dotted suffix (see model.named_modules()), or use all-linear")


def _is_lora_layer(module: nn.Module) -> bool:
    try:
        from peft.tuners.lora.layer import LoraLayer
        return isinstance(module, LoraLayer)
    except ImportError:
        return hasattr(module, "base_layer")


def _is_lora_target(module: nn.Module) -> bool:
    return _is_lora_layer(module) and in_features_of(module) is not None


def find_targets(model: nn.Module, settings, is_peft_model: bool) -> List[Target]:
    """Target layers EVA computes components for, in ``model.named_modules()`` order (may be empty)."""
    targets: List[Target] = []
    tm = settings.target_modules
    all_linear = isinstance(tm, str) and tm.lower() == "all-linear"
    skip = _all_linear_excluded(model, settings.peft_config) if all_linear else set()
    for name, module in model.named_modules():
        if is_peft_model:
            if not _is_lora_target(module):
                continue
        else:
            d = in_features_of(module)
            if d is None or hasattr(module, "base_layer") or name in skip:
                continue
            if not all_linear and not _matches(settings.peft_config, tm, name):
                continue
        d = in_features_of(module)
        key = _pattern_key(settings.rank_pattern, name) if settings.rank_pattern else None
        r = int(settings.rank_pattern[key]) if key is not None else settings.r
        targets.append(Target(name, module, d, r, max(1, min(d, round(r * settings.rho)))))
    return targets


def unsupported_matches(model: nn.Module, settings, is_peft_model: bool) -> List[str]:
    """Layers the user targeted that EVA cannot initialise (Embedding, Conv2d, ... LoRA layers).

    PeftModel: LoRA layers whose base layer is not Linear / Conv1D. Plain model: modules whose
    names match ``target_modules`` but that are not Linear / Conv1D (containers excluded).
    """
    tm = settings.target_modules
    explicit = tm is not None and not (isinstance(tm, str) and tm.lower() == "all-linear")
    names = []
    for name, module in model.named_modules():
        if in_features_of(module) is not None:
            continue
        if is_peft_model:
            if _is_lora_layer(module):
                names.append(name)
        elif explicit and not list(module.children()) and _matches(settings.peft_config, tm, name):
            names.append(name)
    return names


def no_targets_message(settings, unsupported: List[str]) -> str:
    """Why EVA has nothing to compute (one line)."""
    tm = settings.target_modules
    if unsupported:
        return (f"EVA found no layer it can initialise for target_modules={tm!r}: the targeted layers "
                f"{unsupported[:6]}{' ...' if len(unsupported) > 6 else ''} are not nn.Linear or transformers Conv1D "
                "layers, so the eva state dict is empty and initialize_lora_eva_weights gives them the default LoRA "
                "init (init_lora_weights=True), as PEFT does")
    return (f"no target layers found for target_modules={tm!r}: EVA needs nn.Linear or transformers Conv1D layers; "
            "check the names against model.named_modules()")


def _hooks_of(module: nn.Module) -> list:
    """The accelerate hooks on ``module`` (a SequentialHook's members), or []."""
    hook = getattr(module, "_hf_hook", None)
    return list(getattr(hook, "hooks", None) or ([hook] if hook is not None else []))


def _offloads(hook) -> bool:
    """An accelerate hook that keeps weights off the device and loads them per forward."""
    return bool(getattr(hook, "offload", False)) or getattr(hook, "weights_map", None) is not None


def _accelerate_execution_device(model: nn.Module) -> Optional[torch.device]:
    """Where an accelerate-offloaded model computes (``cpu_offload`` / ``disk_offload`` of the
    whole model: every parameter is on meta between forwards), else None."""
    if not any(_offloads(h) for m in model.modules() for h in _hooks_of(m)):
        return None
    for m in model.modules():  # the outermost hook that names an execution device
        for h in _hooks_of(m):
            dev = getattr(h, "execution_device", None)
            if dev is not None:
                return dev if isinstance(dev, torch.device) else torch.device(dev)
    return None


def input_device(model: nn.Module) -> Optional[torch.device]:
    """Device of the model's non-meta parameters; raises if every parameter is on meta (unless
    accelerate offloads the whole model: then its execution device)."""
    devices = {p.device for p in model.parameters()}
    real = {d for d in devices if d.type != "meta"}
    if devices and not real:
        offloaded = _accelerate_execution_device(model)
        if offloaded is not None:
            return offloaded
        raise EvaError("the model's parameters are all on the meta device: load real weights "
                       "first (e.g. from_pretrained without device_map='meta', or to_empty + load_state_dict)")
    if len(real) == 1:
        return next(iter(real))
    return None  # several devices (pipeline / device_map): inputs stay where the loader put them


def _offloaded_by_accelerate(model: nn.Module, name: str) -> bool:
    """Whether the module ``name`` of ``model`` (or a module above it) carries an accelerate hook
    that loads offloaded weights for the forward (``dispatch_model`` / ``cpu_offload`` /
    ``disk_offload`` with CPU or disk offload): its weight sits on ``meta`` between forwards,
    by design, and is real while the forward runs."""
    module, path = model, [model]
    for part in name.split("."):
        module = getattr(module, part, None)
        if module is None:
            break
        path.append(module)
    return any(_offloads(h) for m in path for h in _hooks_of(m))


def check_targets_not_meta(targets: List[Target], is_peft_model: bool, model: Optional[nn.Module] = None) -> None:
    """Base weights of target layers must be real (LoRA weights may be meta: low_cpu_mem_usage),
    unless accelerate offloads them (CPU / disk offload: real during the forward)."""
    for t in targets:
        base = t.module.get_base_layer() if is_peft_model and hasattr(t.module, "get_base_layer") else t.module
        w = getattr(base, "weight", None)
        if w is not None and w.device.type == "meta":
            if model is not None and _offloaded_by_accelerate(model, t.name):
                continue
            if is_peft_model and model is not None and any(_hooks_of(m) for m in model.modules()):
                raise EvaError(f"layer {t.name}: its weight is on the meta device and no accelerate hook loads it "
                               "any more: the model was dispatched with accelerate (CPU / disk offload) and then "
                               "wrapped by get_peft_model, which leaves the offloaded layers' weights, and the LoRA "
                               "weights it adds to them, on meta, so the model cannot run. Compute EVA on the "
                               "dispatched model before wrapping it: sd = eva.get_eva_state_dict(model, dataloader, "
                               "lora_config); then wrap a model whose weights are loaded and call "
                               "eva.initialize_lora_eva_weights(peft_model, eva_state_dict=sd)")
            raise EvaError(f"layer {t.name}: its weight is on the meta device, so its activations cannot be "
                           "computed; materialise the model's weights before running EVA (or dispatch the "
                           "model with accelerate's device_map / disk_offload, which loads them per forward)")
