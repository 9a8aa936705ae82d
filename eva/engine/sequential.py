"""Layer-sequential calibration: the model's blocks a window at a time, within a memory budget.

When the statistics of every shared-input group do not fit in ``EvaOptions.memory_budget``
together (:mod:`.memory_budget`), :func:`eva.engine.run.run_eva` runs a
:class:`LayerSequentialEngine`:

1. **Discovery** (first batch): one real forward with every target hooked finds the groups
   (no statistic is created) while a :class:`.block_probe.BlockProbe` records each block's call.
   If the groups' statistics fit after all (groups share inputs, the first estimate could not
   know), the run continues as the usual all-at-once run on the same batches.
2. **Cache**: each batch's inputs of the first block, and every block's other arguments, come
   from one forward in which the blocks are stubs (:class:`.blocks.BlockStubs`); they are kept
   on ``offload_device`` (:class:`.block_inputs.BlockInputCache`), checked on the first batch
   against the real forward (:func:`.block_probe.compare_calls`).
3. **Plan**: the groups inside the blocks are packed, in block order, into windows that fit the
   budget (:func:`.memory_budget.plan_windows`); the groups outside every block form one *tail*
   window, run after the others with full forwards of the cached batches (kept for it), when
   their statistics fit the budget together.
4. **Windows**, in order: every cached batch, then new batches from the loader, is advanced
   block by block to the window and through it, with only the window's groups hooked; a batch's
   cached hidden states move forward with it (up to the next window's first block), so no block
   runs twice on one batch unless a block's groups are split over two windows. The check
   schedule, seeds and convergence test per batch are the all-at-once run's. When every group of
   the window has converged, the data ran out or ``max_steps`` was reached, the window's groups
   get their final solve and their statistics are freed.
5. **End**: the variance floor and the rank allocation over all groups, then the result.

The allocation needs every layer's explained variance, unknown while later blocks are unseen, so
each group converges on all of its ``r * rho`` components; an all-at-once run with a
``memory_budget`` does the same (``EvaOptions.convergence``), so both modes give the same
components and ranks. KV caches are disabled (``config.use_cache``).
"""
from __future__ import annotations

import itertools
import time
import warnings
from contextlib import contextmanager
from typing import Dict, List, Optional

import torch
from torch import nn

from ..errors import EvaError, _StopForward
from ..result import EvaStateDict
from ..sizes import format_bytes
from . import memory_budget
from .block_inputs import BlockInputCache, CachedBatch
from .block_probe import BlockProbe, compare_calls
from .blocks import BlockCall, BlockList, BlockStubs, containing_lists, find_blocks
from .capture import Capture
from .finalize import build_result, polish_groups
from .loop import FINAL_SOLVES, Engine
from .state import RunState
from .tokens import move_inputs_to_device


@contextmanager
def cache_disabled(model: nn.Module):
    """``config.use_cache = False`` on every config of ``model`` inside the block (restored after):
    replayed blocks must not append to a KV cache."""
    configs = {id(c): c for m in model.modules() for c in [getattr(m, "config", None)]
               if c is not None and hasattr(c, "use_cache")}
    saved = {k: c.use_cache for k, c in configs.items()}
    try:
        for c in configs.values():
            c.use_cache = False
        yield
    finally:
        for k, c in configs.items():
            c.use_cache = saved[k]


def _world(distributed: bool) -> int:
    return torch.distributed.get_world_size() if distributed else 1


class _Replayed:
    """The batches already taken, then the rest of the loader (for the all-at-once fallback)."""

    def __init__(self, taken: list, it):
        self.taken, self.it = taken, it

    def __iter__(self):
        return itertools.chain(self.taken, self.it)


class _ReplayedSized(_Replayed):
    def __init__(self, taken: list, it, length: int):
        super().__init__(taken, it)
        self.length = length

    def __len__(self) -> int:
        return self.length


def no_blocks_message(budget: int, need: int) -> str:
    return (f"the statistics need {format_bytes(need)} at once, more than memory_budget={format_bytes(budget)}, so "
            "the run must be layer-sequential, but the model has no list of repeated blocks (an nn.ModuleList of "
            "same-class layers); pass blocks='<dotted name of the decoder/encoder layer list>', e.g. "
            f"blocks='model.layers', or a memory_budget of at least {need} bytes")


class LayerSequentialEngine(Engine):
    """An :class:`Engine` that calibrates a window of blocks at a time (module docstring).

    Args:
        base: the engine set up for the run (its state, capture, settings and callbacks are used).
        blocks: the model's block list (None: none found; an error if the run needs one).
        budget: bytes the statistics may hold.
    """

    def __init__(self, base: Engine, blocks: Optional[BlockList], budget: int):
        super().__init__(base.model, base.state, base.capture, base.settings, base.forward_fn,
                         base.prepare_model_inputs_fn, base.device, base.observer, base.show_progress_bar)
        self.blocks = blocks
        self.budget = budget
        self.cache = BlockInputCache(torch.device(self.opts.offload_device))
        self.window_groups: List = []
        self.block_of: Dict[int, int] = {}      # group index -> block index
        self.taken = 0                          # batches taken from the loader
        self.replay: Optional[List] = []        # those batches, until the mode is decided (fallback)
        self.it = None
        self.exhausted = False
        self.out_of_data = ""                   # why no new batch can come: "exhausted" / "max_steps"
        self.keep_batches = False               # cache the batches themselves (a tail window needs them)
        self.batch_total: Optional[int] = None  # batches the run may read (progress bar; None: unknown)

    # --------------------------------------------------------- convergence rule -------------
    def _in_play(self) -> List:
        return self.window_groups

    # --------------------------------------------------------- batches ----------------------
    def _take(self):
        """``(index, batch, model_input)`` of the next usable batch, or None (``out_of_data`` says why)."""
        limit = self.opts.max_steps
        while True:
            if self.exhausted or (limit is not None and self.taken >= limit):
                self.out_of_data = self.out_of_data or "max_steps"
                return None
            batch, ranks = self._next_batch(self.it)
            if batch is None or ranks < _world(self.state.distributed):  # windows stop at the shortest rank's data
                self.exhausted, self.out_of_data = True, "exhausted"
                return None
            index = self.taken
            self.taken += 1
            if self.replay is not None:
                self.replay.append(batch)
            batch = move_inputs_to_device(batch, self.device)
            model_input = self._model_input(batch)
            if not self.state.distributed and self._batch_mask_is_empty(model_input):
                if not self.opts.skip_empty_batches:
                    raise EvaError(f"batch {index} keeps no token after the padding/label mask; filter such "
                                   "batches out, set use_label_mask=False, or pass skip_empty_batches=True")
                warnings.warn(f"EVA: skipping batch {index}: no token left after masking")
                continue
            return index, batch, model_input

    def _record_calls(self, batch) -> List[BlockCall]:
        """Every block's call for ``batch``, from a forward whose blocks are stubs."""
        blocks = self.blocks
        calls: List[Optional[BlockCall]] = [None] * len(blocks)

        def record(j, args, kwargs):
            calls[j] = BlockCall.of(blocks.block_name(j), args, kwargs)
            return calls[j].hidden
        t0 = time.perf_counter()
        with BlockStubs(blocks, record):
            self._forward(batch)
        self.state.forward_seconds += time.perf_counter() - t0
        missing = [blocks.block_name(j) for j, c in enumerate(calls) if c is None]
        if missing:
            raise EvaError(f"forward_fn did not call block(s) {missing[:4]} of {blocks.name}; layer-sequential runs "
                           "need a forward that runs every block (or blocks= another list)")
        return calls

    def _cache(self, index: int, batch, model_input, real: Optional[List[BlockCall]] = None) -> CachedBatch:
        calls = self._record_calls(batch)
        if real is not None:
            problem = compare_calls(self.blocks, real, calls)
            if problem:
                raise self._not_replayable(problem)
        entry = self.cache.add(index, model_input, calls, batch if self.keep_batches else None)
        self.state.count_batch(model_input.kept_tokens)
        self.state.peak_cache_bytes = self.cache.peak_bytes
        return entry

    def _entry(self, pos: int) -> Optional[CachedBatch]:
        if pos < len(self.cache.entries):
            return self.cache.entries[pos]
        got = self._take()
        return None if got is None else self._cache(*got)

    def _not_replayable(self, problem: str) -> EvaError:
        need = sum(memory_budget.statistic_bytes(g.d, self.opts.centered) for g in self.state.groups)
        return EvaError(f"layer-sequential calibration replays the blocks of {self.blocks.name} one at a time, which "
                        f"is not exact for this model: {problem}. Pass blocks= a list whose blocks form a plain "
                        f"chain, or memory_budget={need} (all statistics at once), or leave memory_budget unset")

    # --------------------------------------------------------- discovery and plan -----------
    def _discover(self, batch, model_input) -> Optional[BlockProbe]:
        """The first forward: groups found (no statistic), block calls recorded."""
        capture = self.capture
        capture.accumulate = False
        capture.attach_all_targets()
        capture.begin_batch(model_input, batch)
        probe = BlockProbe(self.blocks) if self.blocks is not None else None
        t0 = time.perf_counter()
        if probe is None:
            self._forward(batch)
        else:
            with probe:
                self._forward(batch)
            probe.check_complete()
        self.state.forward_seconds += time.perf_counter() - t0
        capture.finish_discovery()
        for g in self.state.groups:
            capture.set_hooked(g, False)
        capture.accumulate = True
        return probe

    def _check_replayable(self, probe: Optional[BlockProbe]) -> None:
        """A layer-sequential run needs a block list whose blocks replay exactly (first batch)."""
        if self.blocks is None:
            need = sum(memory_budget.statistic_bytes(g.d, self.opts.centered) for g in self.state.groups)
            raise EvaError(no_blocks_message(self.budget, need))
        if probe.problem:
            raise self._not_replayable(probe.problem)

    def _plan(self):
        """``(windows, tail)``: windows of the groups inside the blocks, in block order, and the
        groups outside every block (an LM head, a pooler, a projection before the blocks) as one
        tail window calibrated all at once after the blocks, with full forwards (None: none)."""
        state, centered = self.state, self.opts.centered
        need = sum(memory_budget.statistic_bytes(g.d, centered) for g in state.groups)
        outside = [g for g in state.groups if self.blocks.index_of(state.targets[g.leader].module) is None]
        tail = None
        if outside:
            nbytes = sum(memory_budget.statistic_bytes(g.d, centered) for g in outside)
            if nbytes > self.budget:
                raise EvaError(self._outside_message(outside, nbytes, need))
            tail = memory_budget.Window(outside, -1, -1, nbytes)
        inside = [g for g in state.groups if g not in outside]
        for g in inside:
            self.block_of[g.index] = self.blocks.index_of(state.targets[g.leader].module)
        return memory_budget.plan_windows(inside, [self.block_of[g.index] for g in inside], self.budget,
                                          centered), tail

    def _outside_message(self, outside, nbytes: int, need: int) -> str:
        """Why the targets outside the blocks cannot run all at once, with the fixes that work:
        another block list (only one whose own outside targets would fit), a larger budget, or
        leaving them out."""
        state, centered = self.state, self.opts.centered
        names = [m for g in outside for m in g.members]
        hint = ""
        for lname, held in containing_lists(self.model, [state.targets[n].module for n in names],
                                            self.blocks.name).items():
            other = find_blocks(self.model, lname)
            inner = {id(sub) for block in other.modules for sub in block.modules()}
            rest = sum(memory_budget.statistic_bytes(g.d, centered) for g in state.groups
                       if id(state.targets[g.leader].module) not in inner)
            if rest <= self.budget:
                hint += f"blocks={lname!r} (holds {', '.join(held[:3])}{' ...' if len(held) > 3 else ''}), "
        return (f"layer-sequential calibration (the statistics need {format_bytes(need)}, more than "
                f"memory_budget={format_bytes(self.budget)}) runs the blocks of {self.blocks.name} a window at a time "
                f"and the targets outside them ({names[:6]}{' ...' if len(names) > 6 else ''}) all at once "
                f"afterwards, but their statistics alone need {format_bytes(nbytes)}; pass {hint}a memory_budget of "
                f"at least {nbytes} bytes, or remove them from target_modules")

    # --------------------------------------------------------- windows ----------------------
    def _advance(self, entry: CachedBatch, last: int, keep_until: int) -> None:
        """Run ``entry``'s batch from its cached level through block ``max(last, keep_until - 1)``:
        ``last`` is the last block with a hooked group, ``keep_until`` the next window's first block
        (whose input is cached: up to it, blocks run to the end and their outputs are kept). The
        capture may stop the forward early (``skip_rest_of_forward``) only in blocks past it."""
        blocks, cache, capture = self.blocks, self.cache, self.capture
        end = max(last, keep_until - 1)
        j = entry.level
        hidden = cache.hidden(entry) if j <= end else None
        kept = None  # (level, hidden): the furthest block input to cache, stored once at the end
        try:
            while j <= end:
                capture.skip_rest_of_forward = self.opts.skip_rest_of_forward and j >= keep_until
                hidden = blocks.run(j, hidden, cache.call(entry, j))
                j += 1
                if j <= keep_until:
                    kept = (j, hidden)
        except _StopForward:
            pass
        finally:
            capture.skip_rest_of_forward = self.opts.skip_rest_of_forward
        if kept is not None:
            cache.store(entry, *kept)

    def _window_step(self, entry: CachedBatch, keep_until: int) -> None:
        """One cached batch through the window's blocks (from its cached level)."""
        last = max(self.block_of[g.index] for g in self.window_groups if g.hooks.hooked)
        self._step_on(entry, lambda: self._advance(entry, last, keep_until))

    def _tail_step(self, entry: CachedBatch) -> None:
        """One cached batch through the whole model (the tail window: targets outside the blocks)."""
        self._step_on(entry, lambda: self._forward(self.cache.batch(entry)))

    def _step_on(self, entry: CachedBatch, forward) -> None:
        state = self.state
        state.traffic.step = entry.index + 1
        self.capture.begin_batch(entry.model_input)
        t0 = time.perf_counter()
        forward()
        state.forward_seconds += time.perf_counter() - t0
        for g in self.window_groups:
            if g.hooks.captured:
                g.estimate.steps += 1
                g.hooks.unsolved = True
        state.step = entry.index + 1
        if self.cadence.due(state.step):
            self._check()
        self.observer.on_step(state.step, state)

    def _settled(self) -> bool:
        groups = self.window_groups
        return all(g.converged or g.estimate.zero_variance for g in groups) and any(g.converged for g in groups)

    def _run_window(self, window: memory_budget.Window, step) -> str:
        """Calibrate ``window``'s groups to convergence (or the end of the data), ``step(entry)``
        per batch; final solve; free."""
        state = self.state
        self.window_groups = window.groups
        for g in window.groups:
            self.capture.set_hooked(g, True)
        pos, reason = 0, ""
        self.cadence.restart(1)  # the window's first batch is checked, as a run's first is
        while not reason:
            entry = self._entry(pos)
            if entry is None:
                reason = self.out_of_data
                break
            pos += 1
            step(entry)
            if self._settled():
                reason = "converged"
        for g in window.groups:
            self.capture.set_hooked(g, False)
            g.hooks.unsolved = False  # the final solve below consumes what the last check did not
        if self.solver is None:
            self.solver = self._make_solver()
        state.traffic.step = FINAL_SOLVES
        t0 = time.perf_counter()
        live = [g for g in window.groups if g.stats is not None]
        state.polish_rounds = max(state.polish_rounds, polish_groups(live, self.solver, state.step))
        state.polish_seconds += time.perf_counter() - t0
        for g in live:
            state.stat_bytes -= g.stats.release()
        blocks = None if window.first_block < 0 else [window.first_block, window.last_block]
        state.windows.append({"blocks": blocks,
                              "layers": sum(len(g.members) for g in window.groups),
                              "statistics_bytes": window.nbytes, "batches": pos, "stop_reason": reason})
        return reason

    # --------------------------------------------------------- run --------------------------
    def run(self, dataloader) -> EvaStateDict:
        state = self.state
        total_len = self._start(dataloader)
        limit = self.opts.max_steps
        self.batch_total = total_len if limit is None else min(limit, total_len or limit)  # None: unknown
        self.it = iter(dataloader)
        with cache_disabled(self.model):
            first = self._take()
            if first is None:
                if not self.taken:
                    raise EvaError("dataloader yielded no batch: EVA needs at least one batch")
                raise EvaError(f"every batch was skipped ({self.taken} batch(es)): no token left after the "
                               "padding/label mask; check the attention masks and labels, or set use_label_mask=False")
            index, batch, model_input = first
            probe = self._discover(batch, model_input)
            widths = [g.d for g in state.groups]
            if not memory_budget.fits_at_once(widths, self.budget, self.opts.centered):
                return self._run_windows(first, probe)
        return self._all_at_once(total_len)

    def _run_windows(self, first, probe: BlockProbe) -> EvaStateDict:
        state = self.state
        state.mode = "layer_sequential"
        self.replay = None
        self._check_replayable(probe)
        bar = None
        try:
            entry = self._cache(*first, real=probe.calls)  # the stubbed forward checked against the real one
            probe.calls = []
            windows, tail = self._plan()
            self.keep_batches = tail is not None
            if self.keep_batches:
                self.cache.keep_batch(entry, first[1])
            bar = self._progress(self.batch_total)
            count = len(windows) + (tail is not None)
            reasons = []
            for i, window in enumerate(windows):
                keep_until = windows[i + 1].first_block if i + 1 < len(windows) else window.first_block
                if bar is not None:
                    bar.start_window(i, count, window.groups)
                reasons.append(self._run_window(window, lambda e, k=keep_until: self._window_step(e, k)))
            if tail is not None:
                if bar is not None:
                    bar.start_window(count - 1, count, tail.groups)
                reasons.append(self._run_window(tail, self._tail_step))
        finally:
            self.capture.remove_hooks()
            self.cache.clear()
            if bar is not None:
                bar.close()
        state.step = self.taken
        state.stop_reason = next((r for r in reasons if r != "converged"), "converged")
        state.backends = self._backends_used()
        state.polish_krylov_depth = self.solver.krylov_depth if self.solver is not None else None
        return build_result(state, self.settings, self.solver, self.device, self.observer)

    def _all_at_once(self, total_len: Optional[int]) -> EvaStateDict:
        """Every statistic fits once groups are known: the usual run, on the batches already taken too."""
        old = self.state
        state = RunState.for_targets([old.targets[n] for n in old.order], old.distributed)
        state.memory_budget = old.memory_budget
        capture = Capture(state, self.capture.rules, self.capture.layout, self.opts.centered, self.opts.backend,
                          self.opts.skip_rest_of_forward, self.capture.observer, precision=self.capture.precision)
        engine = Engine(self.model, state, capture, self.settings, self.forward_fn, self.prepare_model_inputs_fn,
                        self.device, self.observer, self.show_progress_bar)
        rest = _Replayed(self.replay, self.it) if total_len is None else _ReplayedSized(self.replay, self.it, total_len)
        return engine.run(rest)
