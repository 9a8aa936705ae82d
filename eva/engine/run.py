"""The entry point of the engine: :func:`run_eva` sets a run up and picks its engine.

All at once (:class:`eva.engine.loop.Engine`) when the statistics fit the memory budget (or
there is none), else layer-sequential (:class:`eva.engine.sequential.LayerSequentialEngine`).
The model runs in eval mode under ``no_grad``; hooks and every module's train/eval flag are
restored whatever happens. This module sits above both engines, so the arrows run one way:
``run -> sequential -> loop``.
"""
from __future__ import annotations

import warnings
from typing import Callable, List, Optional

import torch
from torch import nn

from .. import distributed as dist_utils
from ..config import EvaSettings
from ..result import EvaStateDict
from . import memory_budget
from .blocks import find_blocks
from .capture import Capture, layer_rules
from .loop import Engine
from .observer import Observers
from .sequences import SequenceLayout
from .sequential import LayerSequentialEngine
from .state import RunState

#: The warning of a distributed run: PEFT's, word for word, then how we combine the ranks (the
#: command line, which deals the lines to the ranks itself, leaves it out).
DISTRIBUTED_NOTE = ("torch.distributed is initialized and `gather_distributed_inputs` is True, therefore EVA "
                    "initialization will gather tensors from all ranks. Ensure the model does not receive the same "
                    "inputs on different ranks. (eva-kernels keeps each rank's statistics on the rank and sums their "
                    "products with the eigenbasis instead of gathering activations; pass "
                    "gather_distributed_inputs=False for independent per-rank runs.)")

def run_eva(model: nn.Module, dataloader, targets: List, settings: EvaSettings, forward_fn: Callable,
            prepare_model_inputs_fn, prepare_layer_inputs_fn, device: Optional[torch.device],
            gather_distributed_inputs: bool, show_progress_bar: bool, masked_layer_defaults: tuple = (),
            observers=()) -> EvaStateDict:
    """Run the engine with the model in eval mode under no_grad; hooks and mode always restored.

    ``prepare_model_inputs_fn`` may be :data:`TOKEN_MASK` (the built-in rule);
    ``masked_layer_defaults``: layer-input functions that mean "the masked tokens" (fused path).
    """
    distributed = dist_utils.active(gather_distributed_inputs)
    state = RunState.for_targets(targets, distributed)
    observer = Observers(observers)
    rules = layer_rules(prepare_layer_inputs_fn, state, masked_layer_defaults)
    capture = Capture(state, rules, SequenceLayout(model, targets), settings.options.centered,
                      settings.options.backend, settings.options.skip_rest_of_forward, observer,
                      precision=settings.options.statistics_precision)
    engine = Engine(model, state, capture, settings, forward_fn, prepare_model_inputs_fn, device, observer,
                    show_progress_bar)
    if distributed:
        warnings.warn(DISTRIBUTED_NOTE)
    if distributed:  # before the first forward: a mismatch must raise, not hang a collective
        dist_utils.check_ranks_agree(_fingerprint(targets, settings))
    budget = memory_budget.resolve_budget(settings.options.memory_budget, _statistics_device(targets, device))
    if distributed and budget is not None:  # "auto" reads each rank's free memory: the ranks plan alike
        budget = dist_utils.agreed_min(budget, dist_utils.collective_device(), state.traffic)
    state.memory_budget = budget
    if budget is not None:
        memory_budget.check_budget_floor(targets, budget, settings.options.centered)
    if budget is not None and not memory_budget.fits_at_once([t.in_features for t in targets], budget,
                                                            settings.options.centered):
        weights = {id(t.module): memory_budget.statistic_bytes(t.in_features, settings.options.centered)
                   for t in targets}
        blocks = find_blocks(model, settings.options.blocks, weights)
        engine = LayerSequentialEngine(engine, blocks, budget)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            return engine.run(dataloader)
    finally:
        capture.remove_hooks()
        for module, training in modes:  # per module: mixed train/eval states survive
            module.training = training


def _fingerprint(targets: List, settings: EvaSettings) -> dict:
    """What every rank of a distributed run must agree on: the target layers (name, width, rank,
    components offered) and the settings (per-rank ones, like ``offload_device``, left out)."""
    meta = settings.metadata()
    meta.pop("offload_device", None)
    return {"settings": meta, "targets": {t.name: {"in_features": t.in_features, "rank": t.rank,
                                                  "max_components": t.max_components} for t in targets}}


def _statistics_device(targets: List, device: Optional[torch.device]) -> torch.device:
    """Where the statistics will live, for ``memory_budget="auto"``: the inputs' device, else the
    first target's weight's (CPU when it is on meta: accelerate offload computes on CPU here)."""
    if device is not None:
        return device
    w = getattr(targets[0].module, "weight", None)
    return w.device if w is not None and w.device.type != "meta" else torch.device("cpu")
