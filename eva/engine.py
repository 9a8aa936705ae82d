"""The EVA streaming engine: hooks, per-group statistics, convergence, rank allocation.

One run (:func:`run_eva`):

1. First batch: a forward pre-hook on every target layer accumulates its input into a
   per-group :class:`RunningStats` and forms shared-input groups on the fly (see
   :mod:`eva.groups`); layers never called raise. Afterwards only group leaders stay hooked.
2. Each batch: forward under ``no_grad`` in eval mode; each hooked group adds its tokens
   (fused masked ``cov_update``, no gathered copy); once every hooked group has its input the
   forward is stopped (results unchanged). Then every group that got data re-solves its top
   ``r * rho`` eigenpairs warm-started from its previous Ritz basis, and one host sync brings
   back token counts, finiteness flags, cosines with the previous estimate and explained
   variance ratios. Ranks are redistributed; a group converges when the cosines of all the
   components its layers currently need are >= tau, and its hook is detached (re-attached
   if its need grows).
3. End (all converged, loader exhausted, or ``max_steps``): a polish solve per group (warm-started)
   to a residual tolerance, the final allocation, whitening, and the state dict.

Hooks are removed and the model's train/eval mode restored in ``finally``.
"""
from __future__ import annotations

import time
import warnings
from collections.abc import Mapping
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import Tensor, nn

from . import distributed as dist_utils
from .allocation import redistribute_ranks
from .config import EvaSettings
from .errors import EvaError, _StopForward
from .groups import Group, GroupFinder
from .estimates import solve_group, sync_groups
from .variance_floor import apply_variance_floor
from .finalize import build_result
from .inputs import (all_token_rows, layer_rows_and_mask, move_inputs_to_device,
                     prepare_layer_inputs_fn_language_modeling)
from .result import EvaStateDict
from .statistics import RunningStats
from .targets import PEFT_PREFIX, Target

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class _TokenRule:
    """Marker for a built-in layer-input rule (compared by identity, never called)."""

    def __init__(self, what: str):
        self.what = what

    def __repr__(self) -> str:
        return f"<{self.what}>"


MASKED_TOKENS = _TokenRule("tokens kept by the padding/label mask (fused masked update)")
ALL_TOKENS = _TokenRule("every token of the layer input (PEFT's rule without prepare_layer_inputs_fn)")


def _layer_mode(fn: Optional[Callable]):
    if fn is None:
        return ALL_TOKENS
    if fn is prepare_layer_inputs_fn_language_modeling:
        return MASKED_TOKENS
    try:  # PEFT's own default is equivalent: use the fused path for it as well
        from peft.tuners.lora.eva import prepare_layer_inputs_fn_language_modeling as peft_default
        if fn is peft_default:
            return MASKED_TOKENS
    except ImportError:
        pass
    if not callable(fn):
        raise EvaError(f"prepare_layer_inputs_fn must be a function, a mapping of layer names to functions, or None; "
                       f"got {type(fn).__name__}")
    return fn


class _Engine:
    def __init__(self, model: nn.Module, targets: List[Target], settings: EvaSettings,
                 forward_fn: Callable, prepare_model_inputs_fn: Optional[Callable],
                 prepare_layer_inputs_fn, device: Optional[torch.device],
                 gather_distributed_inputs: bool, show_progress_bar: bool):
        self.model = model
        self.settings = settings
        self.opts = settings.options
        self.targets: Dict[str, Target] = {t.name: t for t in targets}
        self.order = [t.name for t in targets]
        self.forward_fn = forward_fn
        self.prepare_model_inputs_fn = prepare_model_inputs_fn
        self.layer_fns = self._layer_fns(prepare_layer_inputs_fn)
        self.device = device
        self.distributed = dist_utils.active(gather_distributed_inputs)
        self.show_progress_bar = show_progress_bar
        self.groups: List[Group] = []
        self.group_of: Dict[str, Group] = {}
        self.handles: Dict[str, Any] = {}
        self.finder = GroupFinder()
        self.model_input = None
        self.discovering = True
        self.called: set = set()
        self.hooked_groups = 0
        self.complete_groups = 0
        self.step = 0
        self.ranks: Dict[str, int] = {t.name: t.max_components for t in targets}
        self.budget = sum(t.rank for t in targets)

    # ---------------------------------------------------------------- set-up ---------------
    def _layer_fns(self, fn) -> Dict[str, Any]:
        """Per-layer input preparation, as PEFT resolves it.

        The language-modeling default (ours or PEFT's) becomes :data:`MASKED_TOKENS` (the fused
        masked update, no gathered copy); ``None``, and a layer missing from a mapping, become
        :data:`ALL_TOKENS` (every row, padding included: PEFT's ``_prepare_layer_inputs_fn_default``).
        Mapping keys may be the model's module names or, for a PeftModel, the base model's.
        """
        if isinstance(fn, Mapping):
            by_name = {}
            for key in fn:
                name = self._target_name(key)
                if name is not None:
                    by_name[name] = fn[key]
            unknown = [k for k in fn if self._target_name(k) is None]
            if unknown:
                raise EvaError("prepare_layer_inputs_fn is a mapping but the following module names were not found in "
                               f"the model: {unknown} (they must be EVA target layers; e.g. {self.order[:3]})")
            return {n: _layer_mode(by_name.get(n)) for n in self.order}
        return {n: _layer_mode(fn) for n in self.order}

    def _target_name(self, key) -> Optional[str]:
        if not isinstance(key, str):
            return None
        for cand in (key, PEFT_PREFIX + key):
            if cand in self.targets:
                return cand
        return None

    def _attach(self, name: str) -> None:
        if name not in self.handles:
            module = self.targets[name].module
            self.handles[name] = module.register_forward_pre_hook(self._make_hook(name), with_kwargs=True)

    def _detach(self, name: str) -> None:
        handle = self.handles.pop(name, None)
        if handle is not None:
            handle.remove()

    def remove_hooks(self) -> None:
        for name in list(self.handles):
            self._detach(name)

    def _make_hook(self, name: str):
        def hook(module, args, kwargs):
            self._capture(name, args, kwargs)
        return hook

    # ---------------------------------------------------------------- capture --------------
    def _capture(self, name: str, args, kwargs) -> None:
        layer_input = args if args else tuple(v for v in kwargs.values() if isinstance(v, Tensor))
        raw = layer_input[0] if layer_input and isinstance(layer_input[0], Tensor) else None
        if raw is not None and raw.device.type == "meta":
            raise EvaError(f"layer {name}: its input is on the meta device; materialise the model's weights "
                           "(and the inputs) before running EVA")
        fn = self.layer_fns[name]
        if self.discovering:
            self.called.add(name)
            group = self.group_of.get(name)
            if group is None and raw is not None:
                group = self.finder.match(raw, id(fn))
                if group is not None:  # same view of the same live tensor: share the statistic
                    group.members.append(name)
                    group.max_components = max(group.max_components, self.targets[name].max_components)
                    self.group_of[name] = group
                    return
            if group is None:
                target = self.targets[name]
                group = Group(index=len(self.groups), members=[name], d=target.in_features,
                              max_components=target.max_components)
                self.groups.append(group)
                self.group_of[name] = group
            elif group.leader != name:
                return
            if raw is not None:
                self.finder.remember(raw, id(fn), group)
            group.calls_per_forward += 1
            self._accumulate(group, name, layer_input, fn)
            return
        group = self.group_of[name]
        self._accumulate(group, name, layer_input, fn)
        group.calls_this_step += 1
        if group.calls_this_step == group.calls_per_forward:
            self.complete_groups += 1
            if self.opts.skip_rest_of_forward and self.complete_groups >= self.hooked_groups:
                raise _StopForward()

    def _accumulate(self, group: Group, name: str, layer_input, fn) -> None:
        if fn is MASKED_TOKENS:
            rows, mask = layer_rows_and_mask(layer_input, self.model_input, name)
        elif fn is ALL_TOKENS:
            rows, mask = all_token_rows(layer_input, name), None
        else:
            rows, mask = fn(layer_input, self.model_input, name), None
            if not isinstance(rows, Tensor) or rows.dim() != 2:
                raise EvaError(f"layer {name}: prepare_layer_inputs_fn must return a 2-D (tokens, d) tensor, got "
                               f"{tuple(rows.shape) if isinstance(rows, Tensor) else type(rows).__name__}")
        if rows.shape[-1] != group.d:
            raise EvaError(f"layer {name}: prepared input has width {rows.shape[-1]} but the layer's in_features "
                           f"is {group.d}; the layer input preparation must keep the feature dimension last")
        if rows.dtype not in _FLOAT_DTYPES:
            if not rows.is_floating_point():
                raise EvaError(f"layer {name}: input dtype {rows.dtype} is not a floating type")
            rows = rows.to(torch.float32)
        if group.stats is None:
            group.stats = RunningStats(group.d, rows.device, self.opts.centered, self.opts.backend,
                                       distributed=self.distributed, name=group.leader)
        elif group.stats.cov.device != rows.device:
            raise EvaError(f"layer {name}: input moved from {group.stats.cov.device} to {rows.device} between "
                           "batches; keep each layer on one device during EVA")
        group.stats.update(rows, mask)
        group.captured = True

    # ---------------------------------------------------------------- one step -------------
    def _batch_mask_is_empty(self, model_input) -> bool:
        if isinstance(model_input, Tensor):
            if model_input.dtype == torch.bool:
                return not bool(model_input.any())
            return model_input.numel() == 0
        return False

    def _forward(self, batch) -> None:
        for g in self.groups:
            g.captured = False
            g.calls_this_step = 0
        self.complete_groups = 0
        try:
            self.forward_fn(self.model, batch)
        except _StopForward:
            pass

    def _finish_discovery(self) -> None:
        never = [n for n in self.order if n not in self.called]
        if never:
            raise EvaError(f"target layer(s) never called during the forward pass: {never[:8]}"
                           f"{' ...' if len(never) > 8 else ''}; remove them from target_modules or make "
                           "forward_fn run them")
        self.discovering = False
        self.finder.clear()
        self.remove_hooks()
        for g in self.groups:
            self._attach(g.leader)
            g.hooked = True

    def _needed(self, group: Group) -> int:
        return max(self.ranks[m] for m in group.members)

    def _update_convergence(self) -> None:
        """Re-allocate ranks from the latest ratios; (un)hook groups by what they now need.

        A zero-variance group (see :mod:`eva.variance_floor`) offers no component, so it needs
        nothing, but it is not "converged": it stays hooked while the run goes on (later batches
        may bring variance) without holding the run up (see :meth:`_all_settled`).
        """
        if all(g.ratios is not None for g in self.groups):
            self.ranks = redistribute_ranks(self.order, self._max_components(), self._offers(), self.budget)
        tau = self.settings.tau
        min_tokens = 1 if self.opts.centered else 0
        for g in self.groups:
            need = self._needed(g)
            enough = g.tokens >= need + min_tokens
            g.converged = not g.zero_variance and (need == 0 or (enough and g.converged_prefix(tau) >= need))
            g.ever_converged = g.ever_converged or g.converged
            if g.converged and g.hooked:
                self._detach(g.leader)
                g.hooked = False
            elif not g.converged and not g.hooked:
                self._attach(g.leader)
                g.hooked = True
        self.hooked_groups = sum(g.hooked for g in self.groups)

    def _max_components(self) -> Dict[str, int]:
        return {n: self.targets[n].max_components for n in self.order}

    def _offers(self) -> Dict[str, List[float]]:
        """Explained variance ratios per layer for the allocation; zero-variance groups offer none."""
        return {m: ([] if g.zero_variance else g.ratios) for g in self.groups for m in g.members}

    def _all_settled(self) -> bool:
        """Every group converged or zero-variance, and at least one converged."""
        return (all(g.converged or g.zero_variance for g in self.groups)
                and any(g.converged for g in self.groups))

    # ---------------------------------------------------------------- main loop ------------
    def run(self, dataloader) -> EvaStateDict:
        t0 = time.perf_counter()
        total_len = len(dataloader) if hasattr(dataloader, "__len__") else None
        if total_len == 0:
            raise EvaError("dataloader is empty: EVA needs at least one batch")
        limit = self.opts.max_steps
        pbar = self._progress(total_len if limit is None else min(limit, total_len or limit))
        it = iter(dataloader)
        stop_reason = None
        forward_seconds = 0.0
        for name in self.order:
            self._attach(name)
        try:
            while True:
                if limit is not None and self.step >= limit:
                    stop_reason = "max_steps"
                    break
                try:
                    batch = next(it)
                    exhausted = False
                except StopIteration:
                    exhausted = True
                if self.distributed:
                    exhausted = dist_utils.any_rank(exhausted, self._dist_device())
                if exhausted:
                    if self.step == 0:
                        raise EvaError("dataloader yielded no batch: EVA needs at least one batch")
                    stop_reason = "exhausted"
                    break
                batch = move_inputs_to_device(batch, self.device)
                self.model_input = (self.prepare_model_inputs_fn(batch, self.settings.peft_config)
                                    if self.prepare_model_inputs_fn is not None else batch)
                if not self.distributed and self._batch_mask_is_empty(self.model_input):
                    if not self.opts.skip_empty_batches:
                        raise EvaError(f"batch {self.step} keeps no token after the padding/label mask; filter such "
                                       "batches out, set use_label_mask=False, or pass skip_empty_batches=True")
                    warnings.warn(f"EVA: skipping batch {self.step}: no token left after masking")
                    self.step += 1
                    continue
                tf = time.perf_counter()
                self._forward(batch)
                forward_seconds += time.perf_counter() - tf
                if self.discovering:
                    self._finish_discovery()
                captured = [g for g in self.groups if g.captured]
                for g in captured:
                    solve_group(g, self.opts, self.step, self.distributed)
                    g.solves += 1
                    g.steps += 1
                sync_groups(captured, self.step)
                apply_variance_floor(self.groups)
                self.step += 1
                self._update_convergence()
                if pbar is not None:
                    self._report(pbar, t0)
                if self._all_settled():
                    stop_reason = "converged"
                    break
        finally:
            self.remove_hooks()
            if pbar is not None:
                pbar.close()
        return build_result(self, stop_reason, t0, forward_seconds)

    def _dist_device(self) -> torch.device:
        if torch.distributed.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _progress(self, total):
        if not self.show_progress_bar:
            return None
        if self.distributed and torch.distributed.get_rank() != 0:
            return None
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return None
        return tqdm(total=total, desc="EVA", leave=False, unit="batch")

    def _report(self, pbar, t0) -> None:
        """Converged layers now, and how many converged earlier but were reopened.

        The count can go down: when the allocation moves ranks, a layer that had converged on
        the components it needed may need more, which must converge too (it is re-hooked).
        """
        layers_now = sum(len(g.members) for g in self.groups if g.converged)
        reopened = sum(len(g.members) for g in self.groups if g.ever_converged and not g.converged)
        tokens = max((g.tokens for g in self.groups), default=0)
        desc = f"EVA {layers_now}/{len(self.order)} layers converged"
        if reopened:
            desc += f" ({reopened} reopened: rank moved to them)"
        pbar.set_description(desc)
        pbar.set_postfix_str(f"{tokens / max(time.perf_counter() - t0, 1e-9):,.0f} tok/s")
        pbar.update(1)

    # ---------------------------------------------------------------- result ---------------


def run_eva(model, dataloader, targets, settings, forward_fn, prepare_model_inputs_fn,
            prepare_layer_inputs_fn, device, gather_distributed_inputs, show_progress_bar) -> EvaStateDict:
    """Run the engine with the model in eval mode under no_grad; hooks and mode always restored."""
    engine = _Engine(model, targets, settings, forward_fn, prepare_model_inputs_fn, prepare_layer_inputs_fn,
                     device, gather_distributed_inputs, show_progress_bar)
    if engine.distributed:  # PEFT's warning, word for word, then how we combine the ranks
        warnings.warn("torch.distributed is initialized and `gather_distributed_inputs` is True, therefore EVA "
                      "initialization will gather tensors from all ranks. Ensure the model does not receive the "
                      "same inputs on different ranks. (eva-kernels sums each layer's statistics over the ranks "
                      "instead of gathering activations; pass gather_distributed_inputs=False for independent "
                      "per-rank runs.)")
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            return engine.run(dataloader)
    finally:
        engine.remove_hooks()
        for module, training in modes:  # per module: mixed train/eval states survive
            module.training = training
