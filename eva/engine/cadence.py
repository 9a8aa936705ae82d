"""When the solves run: every ``check_every`` batches, or ("auto") spaced to stay under 10% of wall time.

The statistics take every batch whatever the cadence; only the streaming solves (the re-estimate
of every group, its convergence test and the rank reallocation) are spaced. Convergence then
compares estimates ``k`` batches apart, a stricter test, and the final polish keeps the
exact-PCA result.

``"auto"`` measures both costs as the run goes: after each check, with ``s`` the seconds that
check took and ``f`` the mean seconds of a batch's forward and statistics so far, the next check
comes ``k = ceil(9 s / f)`` batches later (so that ``s / (k f + s) <= 10%``), ``1 <= k <=``
:data:`MAX_CADENCE`. The first check is after the first batch. In a distributed run the ranks
take the smallest ``k`` any of them measured, so that they solve in lockstep. On a GPU the check's
host synchronisation also waits for the forwards queued before it, so ``s`` is overestimated and
``k`` errs on the side of fewer solves.
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Union

#: The share of wall time the streaming solves may take under ``check_every="auto"``.
TARGET_SHARE = 0.10
#: The longest gap between two checks under ``"auto"`` (batches).
MAX_CADENCE = 32


class SolveCadence:
    """The check schedule of one run (module docstring). ``option``: ``EvaOptions.check_every``."""

    def __init__(self, option: Union[int, str]):
        self.auto = option == "auto"
        self.k = 1 if self.auto else int(option)
        self.next = 1                        # "auto": the step of the next check
        self.chosen: List[int] = []          # "auto": k after each check

    def due(self, step: int) -> bool:
        """Whether the batch that made ``step`` (counted from 1) is followed by a check."""
        if not self.auto:
            return step % self.k == 0
        return step >= self.next

    def restart(self, step: int) -> None:
        """A new phase (a layer-sequential window) whose first check is due at ``step``."""
        if self.auto:
            self.next = step

    def checked(self, step: int, check_seconds: float, batch_seconds: float,
                agree: Optional[Callable[[int], int]] = None) -> None:
        """Plan the next check after the one that followed ``step`` took ``check_seconds``;
        ``batch_seconds``: the mean forward + statistics time of a batch; ``agree``: the ranks'
        common choice (distributed runs)."""
        if not self.auto:
            return
        share = (1.0 - TARGET_SHARE) / TARGET_SHARE
        k = math.ceil(share * check_seconds / max(batch_seconds, 1e-9))
        k = max(1, min(MAX_CADENCE, k))
        if agree is not None:
            k = agree(k)
        self.k = k
        self.next = step + k
        self.chosen.append(k)

    def describe(self) -> dict:
        """The metadata entry: the option, and under "auto" the gap chosen after each check."""
        return {"check_every": "auto" if self.auto else self.k, "chosen": list(self.chosen)}
