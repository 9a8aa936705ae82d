"""PEFT drop-in entry points: ``get_eva_state_dict`` and ``initialize_lora_eva_weights``.

Same arguments and return shapes as ``peft.tuners.lora.eva`` (PEFT 0.21), plus keyword
``**options`` (see :class:`eva.config.EvaOptions`). The state dict maps module names to
``(rank, in_features)`` fp32 tensors and carries ``.metadata``.
"""
from __future__ import annotations

import warnings
from contextlib import nullcontext
from typing import Callable, Dict, Iterable, Optional, Union

import torch

from .config import resolve_settings
from .engine import TOKEN_MASK, EvaObserver, run_eva
from .engine.finalize import empty_result
from .distributed import unwrap_data_parallel
from .errors import EvaError
from .peft.inputs import (forward_fn_dict, prepare_layer_inputs_fn_language_modeling,
                          prepare_model_inputs_fn_language_modeling)
from .peft.names import model_frame
from .peft.targets import (check_targets_not_meta, find_targets, input_device, no_targets_message,
                           unmatched_target_entries, unmatched_target_message, unsupported_matches)
from .peft.wiring import load_eva_into_peft_model
from .provenance import run_provenance
from .result import EvaStateDict


def _masked_layer_defaults() -> tuple:
    """Layer-input functions meaning "the masked tokens": ours, and PEFT's when installed."""
    try:
        from .peft.patch import original
        peft_default = original("prepare_layer_inputs_fn_language_modeling")  # PEFT's own, also while patched
    except ImportError:
        return (prepare_layer_inputs_fn_language_modeling,)
    return (prepare_layer_inputs_fn_language_modeling, peft_default)


@torch.no_grad()
def get_eva_state_dict(
    model: torch.nn.Module,
    dataloader: Iterable,
    peft_config=None,
    forward_fn: Optional[Callable] = forward_fn_dict,
    prepare_model_inputs_fn: Optional[Callable] = prepare_model_inputs_fn_language_modeling,
    prepare_layer_inputs_fn: Union[Callable, Dict[str, Callable], None] = prepare_layer_inputs_fn_language_modeling,
    adapter_name: str = "default",
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = True,
    observers: Iterable[EvaObserver] = (),
    **options,
) -> EvaStateDict:
    """EVA components for every target layer: the exact PCA of the tokens consumed.

    Args:
        model: a plain model (then ``peft_config`` is required) or a ``PeftModel``.
        dataloader: any iterable of batches (dicts for the default input functions).
        peft_config: ``LoraConfig`` with ``r``, ``target_modules``, ``rank_pattern`` and
            ``eva_config`` (rho, tau, use_label_mask, label_mask_value, whiten, ...).
        forward_fn: ``forward_fn(model, batch)``; default ``model(**batch)``.
        prepare_model_inputs_fn: ``fn(batch, peft_config)`` -> token mask (default: attention
            mask AND label mask) or anything ``prepare_layer_inputs_fn`` understands; None
            hands the batch itself to the layer function.
        prepare_layer_inputs_fn: ``fn(layer_input, model_input, layer_name)`` -> (tokens, d)
            tensor, or a dict of such functions per layer name. The default uses a fused
            masked update (no gathered copy).
        adapter_name: adapter of a ``PeftModel`` whose config is used.
        gather_distributed_inputs: under ``torch.distributed``, solve for the statistics summed
            over ranks (only products with them are all-reduced: :mod:`eva.distributed`).
        show_progress_bar: tqdm bar with converged layers and tokens/s.
        observers: :class:`eva.EvaObserver` instances that receive the engine's events
            (tokens consumed, steps, convergence); not part of PEFT's signature.
        **options: engine options, see :class:`eva.config.EvaOptions` (centered, max_steps,
            on_unconverged, backend, ...).

    Returns:
        :class:`eva.EvaStateDict`: ``{name: (rank, in_features) fp32}`` (rank-0 layers included
        as empty tensors, as PEFT does) with ``.metadata``.
    """
    model = unwrap_data_parallel(model)  # DDP / DataParallel: the model inside (names without "module.")
    is_peft_model = hasattr(model, "peft_config")
    if is_peft_model and peft_config is None:
        if adapter_name not in model.peft_config:
            raise EvaError(f"adapter {adapter_name!r} not found; the model has {list(model.peft_config)}")
        peft_config = model.peft_config[adapter_name]
    settings = resolve_settings(peft_config, options)
    if forward_fn is None:
        forward_fn = forward_fn_dict
    device = input_device(model)
    unmatched = unmatched_target_entries(model, settings.target_modules, is_peft_model)
    if unmatched:
        raise EvaError(unmatched_target_message(model, unmatched, "LoraConfig.target_modules",
                                                partial=len(unmatched) < len(settings.target_modules)))
    targets = find_targets(model, settings, is_peft_model)
    if not targets:  # PEFT: an empty state dict, and every LoRA layer keeps the default init
        unsupported = unsupported_matches(model, settings, is_peft_model)
        if not unsupported:
            raise EvaError(no_targets_message(settings, unsupported))
        warnings.warn(no_targets_message(settings, unsupported))
        return _with_provenance(empty_result(settings, unsupported), model, device)
    check_targets_not_meta(targets, is_peft_model, model)
    ctx = model.disable_adapter() if is_peft_model else nullcontext()
    if prepare_model_inputs_fn is prepare_model_inputs_fn_language_modeling:
        prepare_model_inputs_fn = TOKEN_MASK  # the same rule, from the resolved settings
    with ctx:
        result = run_eva(model, dataloader, targets, settings, forward_fn, prepare_model_inputs_fn,
                         prepare_layer_inputs_fn, device, gather_distributed_inputs, show_progress_bar,
                         masked_layer_defaults=_masked_layer_defaults(), observers=observers)
    return _with_provenance(result, model, device)


def _with_provenance(result: EvaStateDict, model: torch.nn.Module, device) -> EvaStateDict:
    """``result`` with ``metadata["model"]`` (the module tree it was computed on, see
    :mod:`eva.peft.names`) and ``metadata["provenance"]`` (software, device, date)."""
    result.metadata["model"] = model_frame(model).to_metadata()
    result.metadata["provenance"] = run_provenance(device)
    return result


@torch.no_grad()
def initialize_lora_eva_weights(
    model: torch.nn.Module,
    dataloader: Optional[Iterable] = None,
    eva_state_dict: Optional[dict] = None,
    forward_fn: Optional[Callable] = forward_fn_dict,
    prepare_model_inputs_fn: Optional[Callable] = prepare_model_inputs_fn_language_modeling,
    prepare_layer_inputs_fn: Union[Callable, Dict[str, Callable], None] = prepare_layer_inputs_fn_language_modeling,
    adapter_name: str = "default", gather_distributed_inputs: bool = True, show_progress_bar: bool = True,
    observers: Iterable[EvaObserver] = (),
    **options,
):
    """Compute (or take) EVA components and load them into a ``PeftModel``'s LoRA layers.

    lora_A <- components, lora_B <- 0, ranks redistributed (rank-0 layers turned back into
    their base layers), ``rank_pattern`` / ``alpha_pattern`` / ``target_modules`` updated,
    alpha scaled by ``new_rank / r`` when ``adjust_scaling_factors``. Returns the model.
    """
    wrapped, model = model, unwrap_data_parallel(model)
    if not hasattr(model, "peft_config"):
        raise EvaError("model must be a PeftModel; wrap it with peft.get_peft_model(model, LoraConfig("
                       "init_lora_weights='eva', ...)) first")
    if adapter_name not in model.peft_config:
        raise EvaError(f"adapter {adapter_name!r} not found; the model has {list(model.peft_config)}")
    if len(getattr(model, "active_adapters", [adapter_name])) > 1:
        raise EvaError("`initialize_lora_eva_weights` currently only works with a single active adapter; "
                       f"active: {list(model.active_adapters)}; call model.set_adapter({adapter_name!r}) first")
    if model.peft_config[adapter_name].init_lora_weights != "eva":
        raise EvaError("`initialize_lora_eva_weights` can only be used with `init_lora_weights='eva'`; adapter "
                       f"{adapter_name!r} has init_lora_weights={model.peft_config[adapter_name].init_lora_weights!r}: "
                       "create it with LoraConfig(init_lora_weights='eva', ...)")
    if eva_state_dict is None:
        if dataloader is None:
            raise EvaError("dataloader is required if eva_state_dict is not provided; pass a dataloader of "
                           "calibration batches, or an eva_state_dict from get_eva_state_dict")
        eva_state_dict = get_eva_state_dict(
            model, dataloader, forward_fn=forward_fn, prepare_model_inputs_fn=prepare_model_inputs_fn,
            prepare_layer_inputs_fn=prepare_layer_inputs_fn, adapter_name=adapter_name,
            gather_distributed_inputs=gather_distributed_inputs, show_progress_bar=show_progress_bar,
            observers=observers, **options)
    load_eva_into_peft_model(model, eva_state_dict, adapter_name)
    return wrapped
