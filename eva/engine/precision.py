"""Which arithmetic each group's statistics use: ``EvaOptions.statistics_precision``.

A group's rows are accumulated about its shift ``s`` (its first batch's mean). For 16-bit
inputs ``cov_update`` then has two paths (:mod:`eva_kernels.ops.cov_update`):

* ``"exact"``: ``x - s`` as a bf16 ``hi + lo`` split, three tensor-core products per pair;
  relative error about 1e-5 whatever the data.
* ``"fast"``: the raw 16-bit rows, one product per pair, the shift taken out per 512-row
  chunk. Its error grows with ``R = max_j E[x_j^2] / max_j Var[x_j]``
  (:func:`eva_kernels.moment_ratio`): about ``2^-24 * 16 * R`` of the largest entry.

``"auto"`` (the default) measures ``R`` of every group at each solve (from the statistics
themselves: their diagonal, column sums, count and shift; no extra pass, no extra host sync)
and takes the fast path while ``R <= eva_kernels.FAST_RATIO_LIMIT`` (64: estimated error
<= 6.1e-5, under the 1e-4 tolerance of 16-bit statistics). Before a group's first solve it
has no ``R`` and stays exact; a group whose ``R`` rises past the limit (a massive-activation
channel appearing) goes back to exact. fp32 inputs, unshifted (uncentred) statistics and
backends without a fast path (``torch``, ``cpp``) always run exact.
"""
from __future__ import annotations

import math
from typing import Optional

import eva_kernels

STATISTICS_PRECISIONS = ("auto", "exact", "fast")


def initial(option: str) -> str:
    """The path a new group starts on: ``"fast"`` only when forced (auto has no ``R`` yet)."""
    return "fast" if option == "fast" else "exact"


def route(option: str, ratio: Optional[float]) -> str:
    """The path for the next batches of a group whose latest ``R`` is ``ratio`` (None: unknown)."""
    if option != "auto":
        return option
    if ratio is None or math.isnan(ratio):
        return "exact"
    return "fast" if ratio <= eva_kernels.FAST_RATIO_LIMIT else "exact"


def summary(groups) -> Optional[dict]:
    """``run.statistics_precision`` of the metadata: the option, the batches each path
    accumulated (summed over groups), the groups that used the fast path, and the largest ``R``
    measured (None before any solve). None when no group has statistics."""
    stats = [g.stats for g in groups if g.stats is not None]
    if not stats:
        return None
    ratios = [s.max_ratio for s in stats if s.max_ratio is not None]
    return {
        "option": stats[0].precision,
        "batches": {path: sum(s.batches[path] for s in stats) for path in ("exact", "fast")},
        "fast_groups": sum(1 for s in stats if s.batches["fast"]),
        "max_ratio": max(ratios) if ratios else None,
        "ratio_limit": eva_kernels.FAST_RATIO_LIMIT,
    }


def warn_if_exceeded(groups) -> None:
    """Warn, naming the layers, where fast batches were accumulated although the group's ``R``
    was later measured above the limit (its error may exceed 1e-4; "exact" avoids it)."""
    over = [g for g in groups if g.stats is not None and g.stats.batches["fast"]
            and g.stats.fast_ratio is not None and g.stats.fast_ratio > eva_kernels.FAST_RATIO_LIMIT]
    if not over:
        return
    names = [m for g in over for m in g.members]
    worst = max(g.stats.fast_ratio for g in over)
    import warnings
    warnings.warn(f"EVA: {len(names)} layer(s) accumulated 16-bit statistics on the fast path although their inputs' "
                  f"mean-to-spread ratio R later reached {worst:.3g} (> {eva_kernels.FAST_RATIO_LIMIT:g}), where "
                  f"its error may exceed 1e-4: {names[:6]}{' ...' if len(names) > 6 else ''}; pass "
                  "statistics_precision='exact' for these inputs")
