"""Which groups saw (near-)zero variance, and their explained variance ratios.

A group's explained variance ratios are ``lambda_i / V`` with ``V`` the trace of its centred
scatter matrix (its total variance). When the group's input is constant (a buffer broadcast to
every token, the same sentence repeated, a batch of one repeated token), ``V`` is rounding
noise, and noise divided by noise gives ratios of any size: such a layer would take the whole
rank budget. A group is *zero-variance* (it offers no component to the rank allocation, gets
rank 0, and is named in one warning) when any of these holds, with ``eps = 2**-23`` the fp32
unit roundoff:

1. ``V`` is not finite or ``V <= 0``;
2. **no feature varies beyond the rounding of its own elements**: feature ``j`` is rounding
   noise when ``V_j <= resolution * R_j``, with ``V_j = sum_i (x_ij - mean_j)^2`` its variance
   and ``R_j = sum_i x_ij^2`` its raw energy (both over the tokens): its standard deviation is
   at most ``sqrt(resolution)`` times its root-mean-square. ``resolution = max(RESOLUTION, u^2)``
   with ``RESOLUTION = 2**-32`` (a relative standard deviation of 2**-16, about 128 fp32 units
   in the last place: deep fp32 forwards of identical tokens differ by a few) and ``u`` the unit
   roundoff of the coarsest input dtype the group received (2**-8 for bfloat16, 2**-11 for
   float16: identical tokens computed in bf16 can differ by one rounding *of each element*).
   Each element is rounded relative to its own magnitude, so a channel with a huge mean (the
   "massive activations" of LLMs) is judged against its own scale only, and cannot hide the
   variation of the other channels. ``F`` counts the features above their floor;
3. ``V <= ACCUMULATION * S`` where ``S = sum_i ||x_i - s||^2`` is what the fp32 statistic
   accumulated about its shift ``s``: below the accumulation's rounding error
   (``ACCUMULATION = 1e-6``, about ``8 eps``);
4. its variance per token and feature ``V / (n d)`` is at most ``RELATIVE`` times the largest
   group's (``RELATIVE = eps^2``): its standard deviation is below fp32 resolution at the
   scale of the largest group.

For real activations many features are far above their floors, and ``V / S`` is near 1 (the
shift is the first batch's mean); only constant data, or data whose mean drifts hundreds of
standard deviations away from the first batch's, comes near them.
"""
from __future__ import annotations

import math
from typing import Iterable, List

FP32_EPS = 2.0 ** -23
RESOLUTION = 2.0 ** -32
ACCUMULATION = 1e-6
RELATIVE = FP32_EPS ** 2


def resolution(input_roundoff: float) -> float:
    """Relative variance of a feature below which it is rounding noise (rule 2)."""
    return max(RESOLUTION, input_roundoff ** 2)


def _below_own_floor(total: float, accumulated: float, features_above: float) -> bool:
    if not math.isfinite(total) or total <= 0.0:
        return True
    return features_above < 1 or total <= ACCUMULATION * accumulated


def apply_variance_floor(groups: Iterable) -> List:
    """Set ``zero_variance`` and ``ratios`` of every group whose estimate has synced variance terms.

    Each group's :class:`eva.engine.state.Estimate` carries ``variance = (V, S, F)`` (host floats,
    see the module docstring: total variance, accumulated energy, features above their own
    rounding floor), ``eigenvalues_host`` (descending) and ``tokens``. Zero-variance groups get
    all-zero ratios; the others ``lambda_i / V``. Returns the zero-variance groups.
    """
    groups = [g for g in groups if g.estimate.variance is not None]
    per_feature = {}
    for g in groups:
        total, accumulated, above = g.estimate.variance
        if not _below_own_floor(total, accumulated, above):
            per_feature[g.index] = total / (max(g.estimate.tokens, 1) * g.d)
    largest = max(per_feature.values(), default=0.0)
    flagged = []
    for g in groups:
        est = g.estimate
        v = per_feature.get(g.index)
        est.zero_variance = v is None or v <= RELATIVE * largest
        if est.zero_variance:
            est.ratios = [0.0] * len(est.eigenvalues_host)
            flagged.append(g)
        else:
            total = est.variance[0]
            est.ratios = [max(lam, 0.0) / total for lam in est.eigenvalues_host]
    return flagged
