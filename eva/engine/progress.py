"""The run's progress bar: batches of data, converged layers, data tokens/s and an honest ETA.

One tqdm bar for the whole run (``show_progress_bar=True``), on stderr::

    EVA, batch 20/50, 30/36 layers converged, 1,210 data tok/s, ETA <= 0:31  40%|####      | [00:25]
    EVA window 3/30, batch 12/50, 2/12 layers converged, 1,150 data tok/s, window ETA <= 0:09, run ETA ~ 4:10  24%|##   | [01:02]

* The counter is batches of data: in a layer-sequential run (:mod:`.sequential`) each window
  passes over the same cached batches again, so the bar restarts per window and says which
  window it is; it never counts a replay as new data.
* tokens/s counts the tokens of the batches of data (their masks'), each once: over the run, or in
  a layer-sequential run over the current window's pass, so later windows, which replay the same
  batches, do not read as a run slowing down.
* The ETA comes from the last few steps of the current phase (the first step of a phase, which
  includes discovery and warm-up, is left out). It is an upper bound (``<=``): layers that
  converge stop the run (or the window) before the data runs out. A layer-sequential run adds
  ``run ETA ~``: this window's remainder plus the mean time of the windows done, per window left.
* Layers reopened by a reallocation (see :class:`ReopenedNote`) are explained in one line, once.
"""
from __future__ import annotations

import collections
import time
from typing import Deque, Optional

from .observer import EvaObserver
from .state import RunState

#: Steps of the current phase whose durations set the ETA.
_RATE_WINDOW = 5

#: The one line printed the first time a reallocation reopens converged layers.
REOPENED_NOTE = ("EVA: {n} layer(s) reopened: the rank allocation moved rank to layers that had already converged on "
                 "fewer components, so they calibrate on more batches; the converged count goes down meanwhile "
                 "(see docs/api.md, 'Progress')")


def clock(seconds: float) -> str:
    """``"4:10"`` / ``"1:02:03"`` for a duration in seconds."""
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ProgressBar(EvaObserver):
    """The bar (module docstring). ``total``: batches the run may read (None: unknown)."""

    def __init__(self, total: Optional[int], file=None):
        from tqdm.auto import tqdm
        self.tqdm = tqdm
        self.total = total
        self.bar = tqdm(total=total, desc="EVA", leave=False, unit="batch", file=file,
                        bar_format="{desc}{postfix} {percentage:3.0f}%|{bar}| [{elapsed}]" if total
                        else "{desc}{postfix} [{elapsed}]")
        self.started = time.perf_counter()
        self.window: Optional[tuple] = None  # (index from 1, count)
        self.window_groups: Optional[list] = None
        self.windows_done: list = []         # seconds per finished window
        self.window_started = self.started
        self.position = 0                    # batches of this phase (window) so far
        self.last_step: Optional[float] = None
        self.durations: Deque[float] = collections.deque(maxlen=_RATE_WINDOW)
        self.noted_reopened = False

    def start_window(self, index: int, count: int, groups: list) -> None:
        """A layer-sequential run starts window ``index`` (from 0) of ``count``, deciding ``groups``."""
        now = time.perf_counter()
        if self.window is not None:
            self.windows_done.append(now - self.window_started)
        self.window, self.window_started, self.window_groups = (index + 1, count), now, list(groups)
        self.position, self.last_step = 0, None
        self.durations.clear()
        self.bar.set_description_str(f"EVA window {index + 1}/{count}", refresh=False)
        self.bar.set_postfix_str("", refresh=False)  # the last window's counts must not show at 0 %
        self.bar.reset(total=self.total)

    def on_step(self, step: int, state: RunState) -> None:
        now = time.perf_counter()
        if self.last_step is not None:
            self.durations.append(now - self.last_step)
        self.last_step = now
        self.position += 1
        converged = sum(len(g.members) for g in self._groups(state) if g.converged)
        layers = sum(len(g.members) for g in self._groups(state))
        parts = [f"batch {self.position}/{self.total}" if self.total else f"batch {self.position}",
                 f"{converged}/{layers} layers converged", self._rate(state, now)]
        cadence = getattr(state, "cadence", None)
        if cadence is not None and (cadence.auto or cadence.k > 1):
            parts.append(f"solves every {cadence.k}")
        parts += self._eta(now)
        self.bar.set_postfix_str(", ".join(p for p in parts if p), refresh=False)
        self.bar.update(1)
        self._note_reopened(state)

    def _groups(self, state: RunState) -> list:
        """The groups this phase decides: the window's in a layer-sequential run, else all."""
        return state.groups if self.window_groups is None else self.window_groups

    def _rate(self, state: RunState, now: float) -> str:
        """Data tokens per second: over the run, or in a layer-sequential run over this window's
        pass (the tokens of the batches it has covered, each batch once); the groups' tokens when
        the masks could not be read (a distributed run, a batch without a mask)."""
        if self.window is None:
            tokens, since = state.data_tokens, self.started
        else:
            counts = state.batch_tokens[:self.position]
            tokens = None if None in counts else sum(counts)
            since = self.window_started
        if not tokens:
            tokens = max((g.estimate.tokens for g in self._groups(state)), default=0)
        return f"{tokens / max(now - since, 1e-9):,.0f} data tok/s" if tokens else ""

    def _eta(self, now: float) -> list:
        """``["ETA <= m:ss"]`` (and the run's in a layer-sequential run) from the recent steps."""
        if not self.total or not self.durations:
            return []
        per_step = sum(self.durations) / len(self.durations)
        left = max(self.total - self.position, 0) * per_step
        if self.window is None:
            return [f"ETA <= {clock(left)}"]
        out = [f"window ETA <= {clock(left)}"]
        if self.windows_done:
            index, count = self.window
            mean = sum(self.windows_done) / len(self.windows_done)
            out.append(f"run ETA ~ {clock(left + mean * (count - index))}")
        return out

    def _note_reopened(self, state: RunState) -> None:
        """One line, the first time converged layers are reopened by a reallocation."""
        if self.noted_reopened:
            return
        reopened = sum(len(g.members) for g in state.groups if g.ever_converged and not g.converged)
        if reopened:
            self.noted_reopened = True
            self.tqdm.write(REOPENED_NOTE.format(n=reopened), file=self.bar.fp)

    def close(self) -> None:
        self.bar.close()
