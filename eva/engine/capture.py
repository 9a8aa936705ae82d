"""Capturing layer inputs: forward pre-hooks, per-layer token rules, shared-input groups.

First forward (*discovery*): every target layer is hooked; a layer whose prepared input is the
very same tensor view as an earlier layer's joins that layer's group (:mod:`.groups`), the
others found a group. Afterwards only group leaders stay hooked, and a group's hook is
detached while it is converged (:meth:`Capture.set_hooked`).

Each call of a leader's hook turns the layer input into rows (and a mask) by the layer's rule
(:func:`layer_rules`), checks them, and adds them to the group's :class:`RunningStats`. Once
every hooked group has its input for the batch the forward is stopped (``_StopForward``)
when ``skip_rest_of_forward``: what follows cannot change the statistics.
"""
from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Callable, Dict, Optional

import torch
from torch import Tensor

import eva_kernels

from ..errors import EvaError, _StopForward
from ..peft.targets import PEFT_PREFIX
from .groups import GroupFinder
from .observer import EvaObserver
from .state import GroupState, RunState
from .statistics import RunningStats
from .tokens import all_token_rows, layer_rows_and_mask

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class TokenRule:
    """Marker for a built-in layer-input rule (compared by identity, never called)."""

    def __init__(self, what: str):
        self.what = what

    def __repr__(self) -> str:
        return f"<{self.what}>"


MASKED_TOKENS = TokenRule("tokens kept by the padding/label mask (fused masked update)")
ALL_TOKENS = TokenRule("every token of the layer input (PEFT's rule without prepare_layer_inputs_fn)")


def _rule(fn: Optional[Callable], masked_defaults: tuple):
    if fn is None:
        return ALL_TOKENS
    if any(fn is d for d in masked_defaults):
        return MASKED_TOKENS
    if not callable(fn):
        raise EvaError(f"prepare_layer_inputs_fn must be a function, a mapping of layer names to functions, or None; "
                       f"got {type(fn).__name__}")
    return fn


def layer_rules(fn, state: RunState, masked_defaults: tuple) -> Dict[str, Any]:
    """Per-layer input preparation, as PEFT resolves it.

    A function in ``masked_defaults`` (the language-modeling defaults, ours and PEFT's) becomes
    :data:`MASKED_TOKENS` (the fused masked update, no gathered copy); ``None``, and a layer
    missing from a mapping, become :data:`ALL_TOKENS` (every row, padding included: PEFT's
    ``_prepare_layer_inputs_fn_default``). Mapping keys may be the model's module names or, for
    a PeftModel, the base model's.
    """
    if not isinstance(fn, Mapping):
        return {n: _rule(fn, masked_defaults) for n in state.order}

    def target_name(key) -> Optional[str]:
        if isinstance(key, str):
            for cand in (key, PEFT_PREFIX + key):
                if cand in state.targets:
                    return cand
        return None

    unknown = [k for k in fn if target_name(k) is None]
    if unknown:
        raise EvaError("prepare_layer_inputs_fn is a mapping but the following module names were not found in "
                       f"the model: {unknown} (they must be EVA target layers; e.g. {state.order[:3]})")
    by_name = {target_name(k): fn[k] for k in fn}
    return {n: _rule(by_name.get(n), masked_defaults) for n in state.order}


class Capture:
    """Hooks of one run and what they do with each layer input.

    Args:
        state: the run state (groups are created here during discovery).
        rules: per layer, :data:`MASKED_TOKENS`, :data:`ALL_TOKENS` or a user function.
        centered: statistics about the first batch's mean (else uncentred).
        requested_backend: the ``backend`` option; resolved once per statistics device.
        skip_rest_of_forward: stop the forward once every hooked group has its input.
        observer: receives ``on_rows`` before each accumulation.

    ``accumulate`` (attribute, default True): False makes the discovery forward only find the
    groups and check each layer's rows, creating no statistic (layer-sequential runs size their
    windows from the groups before any statistic exists).
    """

    def __init__(self, state: RunState, rules: Dict[str, Any], centered: bool, requested_backend: Optional[str],
                 skip_rest_of_forward: bool, observer: EvaObserver):
        self.state = state
        self.rules = rules
        self.centered = centered
        self.requested_backend = requested_backend
        self.skip_rest_of_forward = skip_rest_of_forward
        self.observer = observer
        self.model_input = None
        self.discovering = True
        self.called: set = set()
        self.finder = GroupFinder()
        self.handles: Dict[str, Any] = {}
        self.hooked_groups = 0
        self.complete_groups = 0
        self.backends: Dict[torch.device, eva_kernels.Backend] = {}
        self.accumulate = True

    # ------------------------------------------------------------------ hooks --------------
    def attach_all_targets(self) -> None:
        for name in self.state.order:
            self._attach(name)

    def _attach(self, name: str) -> None:
        if name not in self.handles:
            module = self.state.targets[name].module
            self.handles[name] = module.register_forward_pre_hook(self._make_hook(name), with_kwargs=True)

    def _detach(self, name: str) -> None:
        handle = self.handles.pop(name, None)
        if handle is not None:
            handle.remove()

    def remove_hooks(self) -> None:
        for name in list(self.handles):
            self._detach(name)

    def set_hooked(self, group: GroupState, hooked: bool) -> None:
        """(Un)hook the group's leader."""
        if hooked and not group.hooks.hooked:
            self._attach(group.leader)
        elif not hooked and group.hooks.hooked:
            self._detach(group.leader)
        group.hooks.hooked = hooked

    def _make_hook(self, name: str):
        def hook(module, args, kwargs):
            self._on_input(name, args, kwargs)
        return hook

    # ------------------------------------------------------------------ per batch ----------
    def begin_batch(self, model_input) -> None:
        """Reset the per-step counters; ``model_input`` is what the layer rules receive."""
        self.model_input = model_input
        for g in self.state.groups:
            g.hooks.captured = False
            g.hooks.this_step = 0
        self.complete_groups = 0
        self.hooked_groups = sum(g.hooks.hooked for g in self.state.groups)

    def finish_discovery(self) -> None:
        """After the first forward: every target was called; only group leaders stay hooked."""
        never = [n for n in self.state.order if n not in self.called]
        if never:
            raise EvaError(f"target layer(s) never called during the forward pass: {never[:8]}"
                           f"{' ...' if len(never) > 8 else ''}; remove them from target_modules or make "
                           "forward_fn run them")
        self.discovering = False
        self.finder.clear()
        self.remove_hooks()
        for g in self.state.groups:
            g.hooks.hooked = False
            self.set_hooked(g, True)

    def _on_input(self, name: str, args, kwargs) -> None:
        layer_input = args if args else tuple(v for v in kwargs.values() if isinstance(v, Tensor))
        raw = layer_input[0] if layer_input and isinstance(layer_input[0], Tensor) else None
        if raw is not None and raw.device.type == "meta":
            raise EvaError(f"layer {name}: its input is on the meta device; materialise the model's weights "
                           "(and the inputs) before running EVA")
        rule = self.rules[name]
        if self.discovering:
            group = self._discover(name, raw, rule)
            if group is not None:
                group.hooks.per_forward += 1
                if self.accumulate:
                    self._accumulate(group, name, layer_input, rule)
                else:
                    self._rows(group, name, layer_input, rule)
            return
        group = self.state.group_of[name]
        self._accumulate(group, name, layer_input, rule)
        group.hooks.this_step += 1
        if group.hooks.this_step == group.hooks.per_forward:
            self.complete_groups += 1
            if self.skip_rest_of_forward and self.complete_groups >= self.hooked_groups:
                raise _StopForward()

    def _discover(self, name: str, raw: Optional[Tensor], rule) -> Optional[GroupState]:
        """The group that accumulates this call during discovery (None: a follower's call)."""
        state = self.state
        self.called.add(name)
        target = state.targets[name]
        group = state.group_of.get(name)
        if group is None and raw is not None:
            group = self.finder.match(raw, id(rule))
            if group is not None:  # same view of the same live tensor: share the statistic
                group.members.append(name)
                group.max_components = max(group.max_components, target.max_components)
                state.group_of[name] = group
                return None
        if group is None:
            group = GroupState(index=len(state.groups), members=[name], d=target.in_features,
                               max_components=target.max_components)
            state.groups.append(group)
            state.group_of[name] = group
        elif group.leader != name:
            return None
        if raw is not None:
            self.finder.remember(raw, id(rule), group)
        return group

    def _rows(self, group: GroupState, name: str, layer_input, rule):
        """The rows (N, d) and optional mask (N,) this call contributes, checked."""
        if rule is MASKED_TOKENS:
            rows, mask = layer_rows_and_mask(layer_input, self.model_input, name)
        elif rule is ALL_TOKENS:
            rows, mask = all_token_rows(layer_input, name), None
        else:
            rows, mask = rule(layer_input, self.model_input, name), None
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
        return rows, mask

    def _accumulate(self, group: GroupState, name: str, layer_input, rule) -> None:
        rows, mask = self._rows(group, name, layer_input, rule)
        new = group.stats is None
        if new:
            group.stats = RunningStats(group.d, rows.device, self.centered, self._backend(rows.device),
                                       traffic=self.state.traffic if self.state.distributed else None,
                                       name=group.leader)
        elif group.stats.device != rows.device:
            raise EvaError(f"layer {name}: input moved from {group.stats.device} to {rows.device} between "
                           "batches; keep each layer on one device during EVA")
        self.observer.on_rows(group, rows, mask)
        t0 = time.perf_counter()
        group.stats.update(rows, mask)
        self.state.stats_seconds += time.perf_counter() - t0
        group.hooks.captured = True
        if new:  # after the first update, which also allocates the shift
            self.state.stat_bytes += group.stats.nbytes
            self.state.peak_stat_bytes = max(self.state.peak_stat_bytes, self.state.stat_bytes)

    def _backend(self, device: torch.device) -> eva_kernels.Backend:
        """``cov_update``'s backend for ``device``, resolved once (raises with the fix if unavailable)."""
        if device not in self.backends:
            self.backends[device] = eva_kernels.resolve_backend("cov_update", device, self.requested_backend)
        return self.backends[device]
