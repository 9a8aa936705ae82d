"""Capturing layer inputs: forward pre-hooks, per-layer token rules, shared-input groups.

First forward (*discovery*): every target layer is hooked. A layer whose first call's prepared
input is the very same tensor view as an earlier layer's joins that layer's group (tentatively),
the others found a group; every call's input view and sequence are recorded
(:mod:`.groups`, :mod:`.sequences`). At the end of that forward the groups are checked call by
call: a group whose members' calls differ (one of them was called again on another input) is
split by signature, and the first batch is accumulated again for the new groups (only then).
Afterwards only group leaders stay hooked, and a group's hook is detached while it is
converged (:meth:`Capture.set_hooked`).

Each call of a leader's hook turns the layer input into rows (and a mask) by the layer's rule
(:func:`layer_rules`) and the batch's token rules for that call's sequence
(:class:`eva.engine.batch_tokens.BatchTokens`), checks them, and adds them to the group's
:class:`RunningStats`. Once every hooked group has its input for the batch the forward is
stopped (``_StopForward``) when ``skip_rest_of_forward``: what follows cannot change the statistics.
"""
from __future__ import annotations

import time
import warnings
from collections.abc import Mapping
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import Tensor

import eva_kernels

from ..errors import EvaError, _StopForward
from .module_names import PEFT_PREFIX
from .groups import LiveViews, group_by_signature
from .observer import EvaObserver, wants_rows
from .sequences import SequenceLayout
from .state import GroupState, RunState
from .statistics import RunningStats
from .tokens import all_token_rows, first_tensor, masked_rows

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class TokenRule:
    """Marker for a built-in layer-input rule (compared by identity, never called)."""

    def __init__(self, what: str):
        self.what = what

    def __repr__(self) -> str:
        return f"<{self.what}>"


MASKED_TOKENS = TokenRule("tokens kept by the padding/label mask (fused masked update)")
ALL_TOKENS = TokenRule("every token of the layer input (PEFT's rule without prepare_layer_inputs_fn)")


class LayerInputRules(dict):
    """A ``prepare_layer_inputs_fn`` mapping whose missing layers take ``default`` instead of
    PEFT's every-token rule (built by :func:`eva.layer_input_rules`)."""

    def __init__(self, overrides, default):
        super().__init__(overrides)
        self.default = default


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
    missing from a plain mapping, become :data:`ALL_TOKENS` (every row, padding included: PEFT's
    ``_prepare_layer_inputs_fn_default``); a layer missing from a :class:`LayerInputRules`
    takes its ``default``. Mapping keys may be the model's module names or, for a PeftModel,
    the base model's.
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
    default = fn.default if isinstance(fn, LayerInputRules) else None
    return {n: _rule(by_name[n] if n in by_name else default, masked_defaults) for n in state.order}


class Capture:
    """Hooks of one run and what they do with each layer input.

    Args:
        state: the run state (groups are created here during discovery).
        rules: per layer, :data:`MASKED_TOKENS`, :data:`ALL_TOKENS` or a user function.
        layout: the model's token sequences (which sequence each call's input belongs to).
        centered: statistics about the first batch's mean (else uncentred).
        requested_backend: the ``backend`` option; resolved once per statistics device.
        skip_rest_of_forward: stop the forward once every hooked group has its input.
        observer: receives ``on_rows`` before each accumulation.
        precision: ``EvaOptions.statistics_precision`` of the statistics created here.

    ``accumulate`` (attribute, default True): False makes the discovery forward only find the
    groups and check each layer's rows, creating no statistic (layer-sequential runs size their
    windows from the groups before any statistic exists).
    """

    def __init__(self, state: RunState, rules: Dict[str, Any], layout: SequenceLayout, centered: bool,
                 requested_backend: Optional[str], skip_rest_of_forward: bool, observer: EvaObserver,
                 precision: str = "exact"):
        self.state = state
        self.rules = rules
        self.layout = layout
        self.centered = centered
        self.requested_backend = requested_backend
        self.skip_rest_of_forward = skip_rest_of_forward
        self.observer = observer
        self.precision = precision
        self.tokens = None                   # the batch's BatchTokens
        self.discovering = True
        self.called: List[str] = []          # targets in first-call order (discovery)
        self.views = LiveViews()             # input view -> (view id, group of its first caller)
        self._views_seen = 0
        self.signature: Dict[str, list] = {}  # target -> view id of each call (discovery)
        self._held_rows: Optional[list] = None  # on_rows events of the discovery forward, held
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
        self.layout.end_discovery()

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
    def begin_batch(self, tokens, batch=None) -> None:
        """Reset the per-step counters; ``tokens`` (:class:`eva.engine.batch_tokens.BatchTokens`)
        are the batch's token rules. During discovery ``batch`` (the batch handed to the forward)
        lets the layout see which modules receive which batch tensors."""
        self.tokens = tokens
        for g in self.state.groups:
            g.hooks.captured = False
            g.hooks.this_step = 0
        self.complete_groups = 0
        self.hooked_groups = sum(g.hooks.hooked for g in self.state.groups)
        if self.discovering:
            self.layout.begin_discovery(batch)
            self._held_rows = [] if (self.accumulate and wants_rows(self.observer)) else None

    def finish_discovery(self) -> bool:
        """After the first forward: every target was called; groups checked call by call (split
        where members' calls differ); only group leaders stay hooked. Returns True when groups
        were split after the first batch was accumulated: the caller must accumulate it again."""
        never = [n for n in self.state.order if n not in self.signature]
        if never:
            raise EvaError(f"target layer(s) never called during the forward pass: {never[:8]}"
                           f"{' ...' if len(never) > 8 else ''}; remove them from target_modules (a list of the "
                           "layers to calibrate in place of 'all-linear'; some models read a layer's weight without "
                           "calling it) or make forward_fn run them")
        self.layout.end_discovery()
        self.discovering = False
        self.views.clear()
        split = self._check_groups()
        held, self._held_rows = self._held_rows, None
        if held is not None and not split:
            for group, rows, mask in held:
                self.observer.on_rows(group, rows, mask)
        self.remove_hooks()
        for g in self.state.groups:
            g.hooks.hooked = False
            self.set_hooked(g, True)
        return split and self.accumulate

    def _check_groups(self) -> bool:
        """Regroup by call signature when a tentative group's members were called differently."""
        state = self.state
        for g in state.groups:
            g.hooks.per_forward = len(self.signature[g.leader])
        if all(self.signature[m] == self.signature[g.leader] for g in state.groups for m in g.members):
            return False
        state.split_groups = [list(g.members) for g in state.groups
                              if any(self.signature[m] != self.signature[g.leader] for m in g.members)]
        for g in state.groups:
            if g.stats is not None:
                state.stat_bytes -= g.stats.release()
        sig = {n: (tuple(self.signature[n]), id(self.rules[n])) for n in self.called}
        state.groups, state.group_of = [], {}
        for members in group_by_signature(self.called, sig):
            g = GroupState(index=len(state.groups), members=members, d=state.targets[members[0]].in_features,
                           max_components=max(state.targets[m].max_components for m in members))
            g.hooks.per_forward = len(self.signature[members[0]])
            state.groups.append(g)
            for m in members:
                state.group_of[m] = g
        return True

    def _on_input(self, name: str, args, kwargs) -> None:
        layer_input = args if args else tuple(v for v in kwargs.values() if isinstance(v, Tensor))
        raw = layer_input[0] if layer_input and isinstance(layer_input[0], Tensor) else None
        if raw is not None and raw.device.type == "meta":
            raise EvaError(f"layer {name}: its input is on the meta device; materialise the model's weights "
                           "(and the inputs) before running EVA")
        rule = self.rules[name]
        if self.discovering:
            self.layout.record_call(name, raw)
            call = len(self.layout.calls[name]) - 1
            group = self._discover(name, raw, rule)
            if group is not None:
                if self.accumulate:
                    self._accumulate(group, name, layer_input, rule, call)
                else:
                    self._rows(group, name, layer_input, rule, call)
            return
        group = self.state.group_of[name]
        self._accumulate(group, name, layer_input, rule, group.hooks.this_step)
        group.hooks.this_step += 1
        if group.hooks.this_step == group.hooks.per_forward:
            self.complete_groups += 1
            if self.skip_rest_of_forward and self.complete_groups >= self.hooked_groups:
                raise _StopForward()

    def _discover(self, name: str, raw: Optional[Tensor], rule) -> Optional[GroupState]:
        """Record this call's input view; the group that accumulates it (None: a follower's call).

        A layer's first call joins the group of the first layer that saw the same live view
        (tentatively: :meth:`_check_groups` compares every call at the end of the forward)."""
        state = self.state
        target = state.targets[name]
        seen = self.views.get(raw, id(rule))
        if seen is None:
            seen, self._views_seen = (self._views_seen, None), self._views_seen + 1
        vid, view_group = seen
        first_call = name not in self.signature
        self.signature.setdefault(name, []).append(vid)
        if first_call:
            self.called.append(name)
        group = state.group_of.get(name)
        if group is None and view_group is not None:  # same view of the same live tensor: share the statistic
            group = view_group
            group.members.append(name)
            group.max_components = max(group.max_components, target.max_components)
            state.group_of[name] = group
            return None
        if group is None:
            group = GroupState(index=len(state.groups), members=[name], d=target.in_features,
                               max_components=target.max_components)
            state.groups.append(group)
            state.group_of[name] = group
        if self.views.get(raw, id(rule)) is None:
            self.views.put(raw, id(rule), (vid, group))
        return group if group.leader == name else None

    def _rows(self, group: GroupState, name: str, layer_input, rule, call: int):
        """The rows (N, d) and optional mask (N,) call ``call`` of layer ``name`` contributes, checked."""
        if rule is MASKED_TOKENS:
            x = first_tensor(layer_input, name)
            rows, mask = masked_rows(x, self.tokens.rule(name, call), name, self.layout.convert_resolution, call)
        elif rule is ALL_TOKENS:
            rows, mask = all_token_rows(layer_input, name), None
        else:
            rows, mask = rule(layer_input, self.tokens.user_input(name, call), name), None
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

    def _accumulate(self, group: GroupState, name: str, layer_input, rule, call: int) -> None:
        rows, mask = self._rows(group, name, layer_input, rule, call)
        new = group.stats is None or not group.stats.live
        if new:
            group.stats = RunningStats(group.d, rows.device, self.centered, self._backend(rows.device),
                                       traffic=self.state.traffic if self.state.distributed else None,
                                       name=group.leader, precision=self.precision)
        elif group.stats.device != rows.device:
            raise EvaError(f"layer {name}: input moved from {group.stats.device} to {rows.device} between "
                           "batches; keep each layer on one device during EVA")
        if self._held_rows is not None:
            self._held_rows.append((group, rows, mask))
        else:
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
            if self.precision == "fast" and self.backends[device].cov_update_fast is None:
                warnings.warn(f"EVA: statistics_precision='fast' has no effect with the {self.backends[device].name!r} "
                              f"backend on {device} (only 'triton' has a fast path): its statistics are exact")
        return self.backends[device]
