"""Which components the final polish must make exact: those the rank allocation may keep.

The final polish (:meth:`eva.engine.solve.Solver.polish`) solves each group's top
``max_components`` eigenpairs to ``final_tol``. The allocation (:mod:`eva.engine.allocation`)
then keeps only the top ``budget`` offers of all layers, so most components of most groups are
never used: on an 8B-shaped Llama, three of four ``down_proj`` inputs get rank 0. A *screened*
polish (``EvaOptions.polish_screen_tol``) first polishes every group to a loose tolerance
``s``, then makes exact only the components the allocation may still keep:

* After a polish, each wanted Ritz value ``theta_i`` of a group is within its residual
  ``||r_i|| <= e * theta_1`` of its eigenvalue ``lambda_i`` (``e``: the worst wanted residual
  relative to ``theta_1``, at most ``s`` unless the polish stopped at ``final_max_iters``), and
  (Cauchy interlacing) ``theta_i <= lambda_i``. In explained-variance ratios (divided by the
  group's variance ``V``): ``low_i = theta_i / V <= lambda_i / V <= low_i + e * low_1``: the
  *margin* is ``e * low_1``. (The bound takes ``theta_i`` to approximate ``lambda_i``, the
  assumption of every residual test: a subspace blind to an eigenvector cannot see it.)
* ``cutoff`` = the ``budget``-th largest ``low`` over every layer's offers. The true cutoff (the
  ``budget``-th largest true ratio) is at least ``cutoff``, because every true ratio is at least
  its ``low``.
* A component with ``low_i + margin < cutoff`` is *certainly dropped*: its true ratio is below
  the true cutoff, and a later polish only raises the other values (Ritz values grow with the
  subspace, which a warm-started polish only enlarges), so it stays below the final cutoff too.
  Its group need not polish it further; the others (a prefix of each group, since values are
  descending) are polished to ``final_tol``, unless the screen already met it.

The result: the same ranks and the same
exact components as polishing everything to ``final_tol``, up to what ``final_tol`` itself
leaves undecided (ratios within its residual bound of the cutoff). Certainly-dropped
components keep their screened values (accurate to ``s`` relative to the group's first) in
the metadata's ``explained_variance_ratio``.
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence


def margins(groups: Sequence) -> Dict[int, float]:
    """Per group index, the ratio margin ``residual * ratios[0]`` from the last polish's worst
    wanted residual relative to theta_1 (``estimate.polished_residual``; never polished:
    infinite)."""
    out = {}
    for g in groups:
        resid, ratios = g.estimate.polished_residual, g.estimate.ratios or [0.0]
        out[g.index] = math.inf if resid is None else resid * max(ratios[0], 0.0)
    return out


def cutoff(offers: Dict[str, List[float]], max_components: Dict[str, int], budget: int) -> float:
    """The ``budget``-th largest offer (every layer offers its first ``max_components``); -inf
    when there are at most ``budget`` offers (all are kept)."""
    values = sorted((v for name, vals in offers.items() for v in list(vals)[: max_components[name]]), reverse=True)
    return values[budget - 1] if 0 < budget <= len(values) else -math.inf


def components_to_polish(groups: Sequence, offers: Dict[str, List[float]], max_components: Dict[str, int],
                         budget: int, margin: Dict[int, float]) -> Dict[int, int]:
    """Per group index, how many leading components may still be kept (0: none; see the module
    docstring): those with ``ratio + margin >= cutoff`` among the members' offers."""
    cut = cutoff(offers, max_components, budget)
    out = {}
    for g in groups:
        offered = max((min(max_components[m], len(offers[m])) for m in g.members), default=0)
        vals = offers[g.members[0]][:offered] if offered else []
        out[g.index] = sum(1 for v in vals if v + margin[g.index] >= cut)
    return out
