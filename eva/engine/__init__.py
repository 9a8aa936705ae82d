"""The EVA engine: one run from batches to an :class:`eva.EvaStateDict`.

Rooms, one job each:

* :mod:`.state` — :class:`RunState` / :class:`GroupState`: everything a run decided, as data.
* :mod:`.run` — :func:`run_eva`: sets a run up and picks the engine (above the two engines).
* :mod:`.loop` — :class:`Engine`: the batch loop and convergence decisions.
* :mod:`.cadence` — when the solves run (``check_every``, or "auto": under 10% of the run).
* :mod:`.capture` — hooks, per-layer token rules, shared-input group discovery.
* :mod:`.sequences` — which token sequence each layer call belongs to (encoder/decoder, towers).
* :mod:`.batch_tokens` — a batch's token rules per sequence; :mod:`.masks` — reading a mask.
* :mod:`.tokens` — layer inputs and a token rule -> rows and the flat mask.
* :mod:`.statistics` — :class:`RunningStats`, the per-group covariance (``eva_kernels.cov_update``).
* :mod:`.solve` — :class:`Solver`: warm-started solves (per group, or every width batched), one
  sync a step; the final polish.
* :mod:`.variance_floor` — zero-variance groups and explained variance ratios.
* :mod:`.allocation` — rank redistribution and the tokens-per-rank rule.
* :mod:`.finalize` — polish, final allocation, whitening, the result and its metadata.
* :mod:`.observer` — :class:`EvaObserver` events (benches, tests); :mod:`.progress` — the bar.
* :mod:`.module_names` — module-name conventions (PEFT's prefix) the engine accepts.
* :mod:`.memory_budget` — bytes of a statistic, ``memory_budget`` ("auto"), windows of groups.
* :mod:`.sequential` — :class:`LayerSequentialEngine`: a window of blocks at a time within the budget.
* :mod:`.blocks`, :mod:`.block_probe`, :mod:`.block_inputs` — the block list and its stubs, the
  first-batch check that replaying blocks is exact, the block inputs cached per batch.
"""
from .loop import TOKEN_MASK, Engine
from .observer import EvaObserver
from .run import run_eva
from .state import GroupState, RunState

__all__ = ["run_eva", "Engine", "EvaObserver", "RunState", "GroupState", "TOKEN_MASK"]
