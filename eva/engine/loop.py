"""The EVA streaming loop: batches in, converged estimates out.

One run (:func:`eva.engine.run.run_eva` sets it up and picks this engine or the layer-sequential one):

1. First batch: every target layer is hooked (:mod:`.capture`); shared-input groups form on
   the fly and are checked call by call at its end; each call's token sequence is recorded
   (:mod:`.sequences`); layers never called raise. Afterwards only group leaders stay hooked.
2. Each batch: its token rules per sequence (:mod:`.batch_tokens`); forward under ``no_grad``
   in eval mode; each hooked group adds its tokens (fused masked ``cov_update``, no gathered
   copy); once every hooked group has its input the forward is stopped (results unchanged). Then every group that got data re-solves its top
   ``r * rho`` eigenpairs warm-started from its previous Ritz basis (:mod:`.solve`), and one host
   sync brings back token counts, finiteness flags, cosines with the previous estimate and
   explained variance ratios. A group converges when the cosines of the components it must
   converge on (``EvaOptions.convergence``: those its layers need under the current allocation,
   redistributed at every check by :mod:`.allocation`, or all of its ``r * rho``) are >= tau, and
   its hook is detached (re-attached if its need grows). A group whose layers need nothing is
   paused: settled, but still hooked, so it keeps every batch.
3. End (all converged, loader exhausted, or ``max_steps``): :mod:`.finalize` polishes, allocates,
   whitens and builds the result from the :class:`RunState`.

Hooks are removed and the model's train/eval mode restored in ``finally``.
"""
from __future__ import annotations

import time
import warnings
from typing import Callable, List, Optional

import torch
from torch import nn

import eva_kernels

from .. import distributed as dist_utils
from ..config import EvaSettings
from ..errors import EvaError, _StopForward
from ..result import EvaStateDict
from . import allocation
from .capture import Capture
from .batch_tokens import BatchTokens, from_batch, from_model_input
from .cadence import SolveCadence
from .finalize import build_result
from .observer import EvaObserver, Observers
from .progress import ProgressBar
from .solve import Solver
from .state import RunState
from .tokens import move_inputs_to_device
from .variance_floor import apply_variance_floor

#: ``Traffic.step`` of the collectives of the final solves.
FINAL_SOLVES = -1

#: Marker for the built-in model-input rule (:func:`eva.engine.batch_tokens.from_batch` with the
#: resolved label-mask settings): what the default ``prepare_model_inputs_fn`` is turned into.
TOKEN_MASK = object()


def topk_eigh_backend(requested: Optional[str], device: torch.device) -> eva_kernels.Backend:
    """The eigensolver's backend: the requested one when it implements ``topk_eigh``, else auto.

    The ``backend`` option names the backend of ``cov_update`` (which must be available: the
    resolution raises with the fix otherwise); ``cpp`` has no eigensolver products, so with it
    the eigensolver takes ``auto``. The result's metadata names what ran each op.
    """
    chosen = eva_kernels.resolve_backend("cov_update", device, requested)
    if chosen.implements("topk_eigh"):
        return eva_kernels.resolve_backend("topk_eigh", device, chosen)
    return eva_kernels.resolve_backend("topk_eigh", device, "auto")


class Engine:
    """One run: drives the batches; the capture, solves and allocation act on its :class:`RunState`."""

    def __init__(self, model: nn.Module, state: RunState, capture: Capture, settings: EvaSettings,
                 forward_fn: Callable, prepare_model_inputs_fn, device: Optional[torch.device],
                 observer: EvaObserver, show_progress_bar: bool):
        self.model = model
        self.state = state
        self.capture = capture
        self.settings = settings
        self.opts = settings.options
        self.forward_fn = forward_fn
        self.prepare_model_inputs_fn = prepare_model_inputs_fn
        self.device = device
        self.observer = observer
        self.show_progress_bar = show_progress_bar
        self.solver: Optional[Solver] = None
        self._fetched = False  # whether a batch was fetched yet (the first step's rank check)
        if state.cadence is None:
            state.cadence = SolveCadence(self.opts.check_every)
        self.cadence = state.cadence

    # ---------------------------------------------------------------- one step -------------
    def _model_input(self, batch) -> BatchTokens:
        """The batch's token rules per sequence (:mod:`eva.engine.batch_tokens`)."""
        layout = self.capture.layout
        if self.prepare_model_inputs_fn is TOKEN_MASK:
            return from_batch(batch, layout, self.settings.use_label_mask, self.settings.label_mask_value)
        if self.prepare_model_inputs_fn is None:
            return from_model_input(batch, layout, is_batch=True)
        return from_model_input(self.prepare_model_inputs_fn(batch, self.settings.peft_config), layout,
                                is_batch=False)

    @staticmethod
    def _batch_mask_is_empty(tokens: BatchTokens) -> bool:
        return tokens.keeps_nothing()

    def _forward(self, batch) -> None:
        try:
            self.forward_fn(self.model, batch)
        except _StopForward:
            pass

    def _make_solver(self) -> Solver:
        device = self.state.stats_device()
        backend = topk_eigh_backend(self.opts.backend, device)
        method = eva_kernels.orthonormalization_for(device.type, self.opts.orthonormalization)
        self.state.orthonormalization = method
        return Solver(self.opts, backend, method, self.state.traffic if self.state.distributed else None,
                      device.type)

    def _in_play(self) -> List:
        """The groups whose convergence this run is deciding now (all of them)."""
        return self.state.groups

    def _need(self, group) -> int:
        """Components ``group`` must converge on (``EvaOptions.convergence``): what its layers need
        under the current allocation ("allocated_ranks"), or all of its ``r * rho``."""
        if self.opts.convergence_rule == "allocated_ranks":
            return self.state.needed(group)
        return group.max_components

    def _reallocate(self) -> None:
        """Mid-run allocation: only the allocated-ranks rule needs it (the final one is in finalize)."""
        if self.opts.convergence_rule == "allocated_ranks" and all(g.estimate.ratios is not None
                                                                   for g in self.state.groups):
            allocation.reallocate(self.state)

    def _update_convergence(self) -> None:
        """Re-allocate ranks from the latest ratios; (un)hook groups by what they now need.

        A zero-variance group (see :mod:`eva.engine.variance_floor`) offers no component, so it
        needs nothing, but it is not "converged": it stays hooked while the run goes on (later
        batches may bring variance) without holding the run up (see ``RunState.all_settled``).
        A group whose layers need nothing (rank 0 under the current allocation) is *paused*: it
        counts as converged (it holds nothing up) but stays hooked, so it keeps every batch and a
        later reallocation never finds it short of data.
        """
        state = self.state
        self._reallocate()
        tau = self.settings.tau
        for g in self._in_play():
            need = self._need(g)
            est = g.estimate
            enough = est.tokens >= allocation.tokens_needed(need, self.opts.centered)
            was = g.converged
            g.converged = not est.zero_variance and (need == 0 or (enough and est.converged_prefix(tau) >= need))
            g.ever_converged = g.ever_converged or g.converged
            self.capture.set_hooked(g, not g.converged or need == 0)
            if g.converged and not was:
                self.observer.on_group_converged(state.step, g)

    def _step(self, batch) -> None:
        """One batch: forward and accumulate; on check steps (every ``check_every`` batches) the
        groups that got data since their last solve re-solve, one host sync, the variance floor,
        the reallocation and the convergence decisions."""
        state = self.state
        tf = time.perf_counter()
        self._forward(batch)
        if self.capture.discovering and self.capture.finish_discovery():
            # groups were split call by call: the first batch again, into the final groups
            self.capture.begin_batch(self.capture.tokens)
            self._forward(batch)
        state.forward_seconds += time.perf_counter() - tf
        # distributed: the hooked groups, captured on some rank (lockstep)
        self._end_step(lambda g: g.hooks.captured or (state.distributed and g.hooks.hooked))

    def _end_step(self, consumed) -> None:
        """Count the step for the groups ``consumed(group)`` says took part; check when due."""
        state = self.state
        for g in state.groups:
            if consumed(g):
                g.estimate.steps += 1
                g.hooks.unsolved = True
        state.step += 1
        if self.cadence.due(state.step):
            self._check()
        self.observer.on_step(state.step, state)

    def _check(self) -> None:
        if self.solver is None:
            self.solver = self._make_solver()
        state = self.state
        ts = time.perf_counter()
        due = [g for g in state.groups if g.hooks.unsolved]
        self.solver.solve_all(due, state.step - 1)
        for g in due:
            g.estimate.solves += 1
            g.hooks.unsolved = False
        self.solver.sync(due, state.step - 1)
        apply_variance_floor(state.groups)
        took = time.perf_counter() - ts
        state.solve_seconds += took
        self._update_convergence()
        self._plan_next_check(took)

    def _plan_next_check(self, took: float) -> None:
        """Tell the cadence what the check cost against a batch's forward and statistics."""
        state = self.state
        agree = None
        if state.distributed:
            agree = lambda k: dist_utils.agreed_min(k, dist_utils.collective_device(), state.traffic)  # noqa: E731
        self.cadence.checked(state.step, took, state.forward_seconds / max(state.step, 1), agree)

    # ---------------------------------------------------------------- main loop ------------
    def _next_batch(self, it):
        """``(batch, ranks)``: this rank's next batch (None: its loader is exhausted) and how many
        ranks have one this step (1 or 0 on one process).

        Distributed: one all-reduce says which ranks have data. A rank without a batch at the
        first step raises on every rank (the first forward finds the groups and the shift, with
        collectives inside it); later, a rank whose loader ran out takes idle steps in lockstep.
        """
        try:
            batch = next(it)
        except StopIteration:
            batch = None
        if not self.state.distributed:
            return batch, int(batch is not None)
        have = dist_utils.ranks_with_data(batch is not None, dist_utils.collective_device(), self.state.traffic)
        if not self._fetched and have:
            missing = [r for r in range(torch.distributed.get_world_size()) if r not in have]
            if missing:
                raise EvaError(f"rank(s) {missing} have no batch at EVA's first step while rank(s) {have} do: every "
                               "rank needs at least one batch (the first forward finds the layer groups and the "
                               "centring shift, with collectives inside it); shard the data so that each rank gets "
                               "some, or run on fewer ranks")
        self._fetched = True
        return batch, len(have)

    def _idle_step(self) -> None:
        """A step of a distributed run on a rank whose loader ran out: no forward, no tokens; the
        hooked groups' solves (which all-reduce) and decisions in lockstep with the other ranks."""
        self._end_step(lambda g: g.hooks.hooked)

    def _start(self, dataloader) -> Optional[int]:
        """Start the clock; the loader's length (None: unsized), refusing an empty loader."""
        self.state.started = time.perf_counter()
        total_len = len(dataloader) if hasattr(dataloader, "__len__") else None
        if total_len == 0 and not self.state.distributed:  # distributed: decided with the other ranks
            raise EvaError("dataloader is empty: EVA needs at least one batch")
        return total_len

    def run(self, dataloader) -> EvaStateDict:
        state = self.state
        total_len = self._start(dataloader)
        limit = self.opts.max_steps
        bar = self._progress(total_len if limit is None else min(limit, total_len or limit))
        it = iter(dataloader)
        self.capture.attach_all_targets()
        try:
            while True:
                state.traffic.step = state.step + 1  # collectives of this batch, its forward and its check
                if limit is not None and state.step >= limit:
                    state.stop_reason = "max_steps"
                    break
                batch, ranks = self._next_batch(it)
                if ranks == 0:
                    if state.step == 0:
                        raise EvaError("dataloader yielded no batch: EVA needs at least one batch")
                    state.stop_reason = "exhausted"
                    break
                if batch is None:  # distributed: this rank's data ran out, the others' did not
                    self._idle_step()
                    if state.all_settled():
                        state.stop_reason = "converged"
                        break
                    continue
                batch = move_inputs_to_device(batch, self.device)
                model_input = self._model_input(batch)
                if not state.distributed and self._batch_mask_is_empty(model_input):
                    if not self.opts.skip_empty_batches:
                        raise EvaError(f"batch {state.step} keeps no token after the padding/label mask; filter such "
                                       "batches out, set use_label_mask=False, or pass skip_empty_batches=True")
                    warnings.warn(f"EVA: skipping batch {state.step}: no token left after masking")
                    state.step += 1
                    continue
                self.capture.begin_batch(model_input, batch)
                state.count_batch(model_input.kept_tokens)
                self._step(batch)
                if state.all_settled():
                    state.stop_reason = "converged"
                    break
        finally:
            self.capture.remove_hooks()
            if bar is not None:
                bar.close()
        state.traffic.step = FINAL_SOLVES
        if self.solver is None and state.stats_device() is not None:  # fewer batches than check_every
            self.solver = self._make_solver()
        state.backends = self._backends_used()
        state.polish_krylov_depth = self.solver.krylov_depth if self.solver is not None else None
        return build_result(state, self.settings, self.solver, self.device, self.observer)

    def _backends_used(self) -> dict:
        names = sorted({b.name for b in self.capture.backends.values()})
        out = {"cov_update": ",".join(names)}
        if self.solver is not None:
            out["topk_eigh"] = self.solver.backend.name
            if self.solver.batched:
                out["topk_eigh_batched"] = "torch"  # streaming solves and polish of groups sharing a shape
                out["small_eigh"] = ",".join(self.solver.small_eigh_used) or self.solver.rayleigh_ritz  # (b, b) eighs
                out["batched_products"] = ",".join(self.solver.products_used) or None  # how A Q was computed
        return out

    def _progress(self, total) -> Optional[ProgressBar]:
        if not self.show_progress_bar:
            return None
        if self.state.distributed and torch.distributed.get_rank() != 0:
            return None
        try:
            bar = ProgressBar(total)
        except ImportError:
            return None
        self.observer = Observers([bar, self.observer])
        return bar
