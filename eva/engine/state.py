"""The state of one EVA run, as plain data: what every stage of the engine reads and writes.

* :class:`Estimate` — a group's running eigen-estimate and what the last host sync brought back.
* :class:`HookCounts` — the capture bookkeeping of a group within one forward pass.
* :class:`GroupState` — one shared-input group: its members, statistic, estimate, convergence.
* :class:`RunState` — the whole run: targets in model order, groups, ranks, step, timings and
  the backends that ran each op. ``finalize.build_result`` turns it into the result.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from ..distributed import Traffic
from .statistics import RunningStats


@dataclass
class Estimate:
    """A group's top ``max_components`` eigenpairs, device and host sides.

    Device (no sync): ``basis`` (b, d) Ritz basis (the next solve's warm start), ``components``
    (k, d), ``eigenvalues`` (k,), and ``pending``: values awaiting the step's one host sync.
    Host (after the sync): ``eigenvalues_host`` (descending), ``variance = (V, S, R)`` (see
    :mod:`eva.engine.variance_floor`), ``tokens``, ``cosines`` with the previous estimate, and
    the explained variance ``ratios`` set by the variance floor (all zero when
    ``zero_variance``). ``steps``: batches the group consumed; ``solves``: streaming solves so far
    (one per check, ``EvaOptions.check_every``; equal to ``steps`` when every batch is checked).
    """

    basis: Optional[Tensor] = None
    components: Optional[Tensor] = None
    eigenvalues: Optional[Tensor] = None
    pending: Dict[str, Tensor] = field(default_factory=dict)
    eigenvalues_host: Optional[List[float]] = None
    variance: Optional[Tuple[float, float, float]] = None
    tokens: int = 0
    cosines: Optional[List[float]] = None
    ratios: Optional[List[float]] = None
    zero_variance: bool = False
    steps: int = 0
    solves: int = 0
    #: the last polish's worst residual ``||A v - theta v|| / theta_1`` over its wanted pairs
    #: (None: not polished)
    polished_residual: Optional[float] = None

    def converged_prefix(self, tau: float) -> int:
        """Number of leading components whose cosine with the previous estimate is >= tau."""
        if self.cosines is None or self.solves < 2:
            return 0
        n = 0
        for c in self.cosines:
            if c < tau:
                break
            n += 1
        return n


@dataclass
class HookCounts:
    """Capture bookkeeping: leader calls per forward (learnt in the first forward), calls in
    this step, whether the group got data this step, whether it got data since its last solve,
    and whether its hook is attached."""

    per_forward: int = 0
    this_step: int = 0
    captured: bool = False
    unsolved: bool = False
    hooked: bool = False


@dataclass
class GroupState:
    """Layers fed the very same input (``members``, leader first) sharing one statistic."""

    index: int
    members: List[str]
    d: int
    max_components: int  # components computed: max over members of round(r * rho), capped at d
    stats: Optional[RunningStats] = None
    estimate: Estimate = field(default_factory=Estimate)
    hooks: HookCounts = field(default_factory=HookCounts)
    converged: bool = False
    ever_converged: bool = False  # converged at some step (a rank reallocation can reopen it)

    @property
    def leader(self) -> str:
        return self.members[0]


@dataclass
class RunState:
    """Everything one run decided so far (the engine's only mutable state besides its hooks)."""

    order: List[str]                      # target layer names, model order (allocation tie-break)
    targets: Dict[str, Any]               # name -> eva.peft.targets.Target
    budget: int                           # total rank: sum of the targets' configured ranks
    ranks: Dict[str, int]                 # current allocation
    groups: List[GroupState] = field(default_factory=list)
    group_of: Dict[str, GroupState] = field(default_factory=dict)
    step: int = 0                         # batches taken from the loader (skipped ones included)
    batches_read: int = 0                 # batches that reached a forward (skipped ones excluded)
    data_tokens: Optional[int] = 0        # tokens those batches' masks keep (None: some batch had no mask)
    batch_tokens: List[Optional[int]] = field(default_factory=list)  # per batch read, in order (progress bar)
    stop_reason: str = ""
    distributed: bool = False
    backends: Dict[str, str] = field(default_factory=dict)  # op -> backend that ran it
    orthonormalization: str = ""
    started: float = 0.0                  # time.perf_counter() at the start
    forward_seconds: float = 0.0          # forwards, including the statistic updates in the hooks
    stats_seconds: float = 0.0            # the statistic updates alone (wall clock: on a GPU, launches)
    solve_seconds: float = 0.0            # streaming solves, syncs and variance floor
    polish_seconds: float = 0.0
    polish_rounds: int = 0                # most rounds of a batched polish (0: per-group polish)
    polish_krylov_depth: Optional[int] = None  # products per polish cycle (before the cap by width)
    polish_screen: Optional[Dict[str, Any]] = None  # the screened polish's counts (eva.engine.polish_plan)
    cadence: Any = None                   # the run's eva.engine.cadence.SolveCadence (set by the engine)
    stat_bytes: int = 0                   # bytes of the live statistics (all groups, all devices)
    peak_stat_bytes: int = 0              # their peak over the run
    mode: str = "all_at_once"             # or "layer_sequential" (see eva.engine.sequential)
    memory_budget: Optional[int] = None   # bytes the statistics may hold (None: unbounded)
    windows: List[Dict[str, Any]] = field(default_factory=list)  # layer-sequential windows, as run
    peak_cache_bytes: int = 0             # peak bytes of cached block inputs (layer-sequential)
    traffic: Traffic = field(default_factory=Traffic)  # this rank's collectives (distributed runs)
    split_groups: List[List[str]] = field(default_factory=list)  # first-call groups split by call signature

    @classmethod
    def for_targets(cls, targets: List[Any], distributed: bool) -> "RunState":
        return cls(order=[t.name for t in targets], targets={t.name: t for t in targets},
                   budget=sum(t.rank for t in targets), ranks={t.name: t.max_components for t in targets},
                   distributed=distributed)

    def max_components(self) -> Dict[str, int]:
        """Components each layer may offer to the allocation: round(r * rho), capped at d."""
        return {n: self.targets[n].max_components for n in self.order}

    def offers(self) -> Dict[str, List[float]]:
        """Explained variance ratios per layer for the allocation; zero-variance groups offer none."""
        return {m: ([] if g.estimate.zero_variance else g.estimate.ratios) for g in self.groups for m in g.members}

    def needed(self, group: GroupState) -> int:
        """Components the group's layers need under the current allocation."""
        return max(self.ranks[m] for m in group.members)

    def count_batch(self, kept_tokens: Optional[int]) -> None:
        """A new batch of data reached a forward, its masks keeping ``kept_tokens`` tokens
        (None: unknown, then :attr:`data_tokens` becomes None for the rest of the run)."""
        self.batches_read += 1
        self.data_tokens = None if kept_tokens is None or self.data_tokens is None else self.data_tokens + kept_tokens
        self.batch_tokens.append(kept_tokens)

    def all_settled(self) -> bool:
        """Every group converged or zero-variance, and at least one converged."""
        return (all(g.converged or g.estimate.zero_variance for g in self.groups)
                and any(g.converged for g in self.groups))

    def stats_device(self) -> Optional[torch.device]:
        """Device of the first statistic (None before any was created)."""
        return next((g.stats.device for g in self.groups if g.stats is not None), None)
