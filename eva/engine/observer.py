"""Engine events, for progress bars, benches and tests (instead of patching the engine).

Pass observers to :func:`eva.get_eva_state_dict` (``observers=[...]``). Every method has a
no-op default; override what you need. Observers must not modify what they are handed.

* ``on_rows(group, rows, mask)`` — a group's statistic is about to consume ``rows`` (N, d)
  (``mask`` (N,) bool or None): exactly the tokens the statistic sees.
* ``on_step(step, state)`` — after the step's solves, sync and rank allocation (``step`` counts
  from 1; ``state`` is the :class:`eva.engine.state.RunState`).
* ``on_group_converged(step, group)`` — a group's needed components converged at this step
  (again after a reallocation reopened it).
* ``on_finish(state)`` — after the final solve and allocation, before the result is built.
"""
from __future__ import annotations

from typing import Iterable, List, Optional

from torch import Tensor

from .state import GroupState, RunState


class EvaObserver:
    """Base class of engine observers (every event a no-op)."""

    def on_rows(self, group: GroupState, rows: Tensor, mask: Optional[Tensor]) -> None:
        pass

    def on_step(self, step: int, state: RunState) -> None:
        pass

    def on_group_converged(self, step: int, group: GroupState) -> None:
        pass

    def on_finish(self, state: RunState) -> None:
        pass


class Observers(EvaObserver):
    """Several observers as one (events are delivered in order)."""

    def __init__(self, observers: Iterable[EvaObserver] = ()):
        self.items: List[EvaObserver] = list(observers)
        for obs in self.items:
            if not isinstance(obs, EvaObserver):
                raise TypeError(f"observers must be eva.EvaObserver instances, got {type(obs).__name__}")

    def on_rows(self, group, rows, mask):
        for obs in self.items:
            obs.on_rows(group, rows, mask)

    def on_step(self, step, state):
        for obs in self.items:
            obs.on_step(step, state)

    def on_group_converged(self, step, group):
        for obs in self.items:
            obs.on_group_converged(step, group)

    def on_finish(self, state):
        for obs in self.items:
            obs.on_finish(state)


def wants_rows(observer: EvaObserver) -> bool:
    """Whether ``observer`` (or one inside an :class:`Observers`) handles ``on_rows``: the engine
    then holds the first forward's rows until its groups are final (rows are not copied)."""
    if isinstance(observer, Observers):
        return any(wants_rows(o) for o in observer.items)
    return type(observer).on_rows is not EvaObserver.on_rows
