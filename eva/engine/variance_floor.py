"""Which groups saw (near-)zero variance, and their explained variance ratios.

A group's explained variance ratios are ``lambda_i / V`` with ``V`` the trace of its centred
scatter matrix (its total variance). When the group's input is constant (a buffer broadcast to
every token, the same sentence repeated, a batch of one repeated token), ``V`` is rounding
noise, and noise divided by noise gives ratios of any size: such a layer would take the whole
rank budget. A group is *zero-variance* (it offers no component to the rank allocation, gets
rank 0, and is named in one warning) when any of these holds, with ``eps = 2**-23`` the fp32
unit roundoff:

1. ``V`` is not finite or ``V <= 0``;
2. ``V <= resolution * R`` where ``R = sum_i ||x_i||^2`` is the raw energy of the tokens: the
   spread (relative to the tokens' magnitude) is at the level of rounding noise.
   ``resolution = max(RESOLUTION, u^2)`` with ``RESOLUTION = 2**-32`` (a relative standard
   deviation of 2**-16, about 128 fp32 units in the last place: deep fp32 forwards of identical
   tokens differ by a few) and ``u`` the unit roundoff of the coarsest input dtype the group
   received (2**-8 for bfloat16, 2**-11 for float16: identical tokens computed in bf16 can
   differ by one rounding);
3. ``V <= ACCUMULATION * S`` where ``S = sum_i ||x_i - s||^2`` is what the fp32 statistic
   accumulated about its shift ``s``: below the accumulation's rounding error
   (``ACCUMULATION = 1e-6``, about ``8 eps``);
4. its variance per token and feature ``V / (n d)`` is at most ``RELATIVE`` times the largest
   group's (``RELATIVE = eps^2``): its standard deviation is below fp32 resolution at the
   scale of the largest group.

For real activations ``V / R`` and ``V / S`` are far above these floors (``S ~ V`` since the
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


def _below_own_floor(total: float, accumulated: float, raw: float, input_roundoff: float) -> bool:
    if not math.isfinite(total) or total <= 0.0:
        return True
    resolution = max(RESOLUTION, input_roundoff ** 2)
    return total <= resolution * raw or total <= ACCUMULATION * accumulated


def apply_variance_floor(groups: Iterable) -> List:
    """Set ``zero_variance`` and ``ratios`` of every group whose estimate has synced variance terms.

    Each group's :class:`eva.engine.state.Estimate` carries ``variance = (V, S, R)`` (host floats,
    see the module docstring), ``eigenvalues_host`` (descending) and ``tokens``. Zero-variance
    groups get all-zero ratios; the others ``lambda_i / V``. Returns the zero-variance groups.
    """
    groups = [g for g in groups if g.estimate.variance is not None]
    per_feature = {}
    for g in groups:
        total, accumulated, raw = g.estimate.variance
        if not _below_own_floor(total, accumulated, raw, g.stats.input_roundoff):
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
