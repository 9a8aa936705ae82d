"""EVA's rank redistribution by explained variance ratio.

Every layer ``l`` offers the first ``max_components[l] = round(r_l * rho)`` components of its
group, each scored by its explained variance ratio ``lambda_i / trace(C)``. All offers of all
layers are ranked together and the top ``budget = sum_l r_l`` are kept; a layer's rank is the
number of its offers kept (0 .. r_l * rho). Layers sharing an input offer the same scores,
so they compete like PEFT's. Ties break deterministically by layer order, then component index.
"""
from __future__ import annotations

from typing import Dict, List, Sequence


def redistribute_ranks(layers: Sequence[str], max_components: Dict[str, int],
                       ratios: Dict[str, Sequence[float]], budget: int) -> Dict[str, int]:
    """Ranks per layer.

    Args:
        layers: layer names, in model order (tie-break order).
        max_components: offers per layer (``round(r * rho)``, capped at d).
        ratios: explained variance ratios per layer, descending, at least ``max_components`` long
            (a shorter list offers fewer components).
        budget: total rank to hand out (sum of the layers' configured ranks).
    """
    offers: List[tuple] = []
    for order, name in enumerate(layers):
        vals = list(ratios[name])[: max_components[name]]
        offers.extend((-float(v), order, i, name) for i, v in enumerate(vals))
    offers.sort()
    ranks = {name: 0 for name in layers}
    for _, _, _, name in offers[:budget]:
        ranks[name] += 1
    return ranks


def tokens_needed(rank: int, centered: bool) -> int:
    """Tokens a layer must have seen for ``rank`` components: ``rank`` (+1 when centred: the mean
    takes one degree of freedom)."""
    return rank + (1 if centered else 0)


def reallocate(state) -> None:
    """Redistribute ``state.ranks`` (an :class:`eva.engine.state.RunState`) from the groups' ratios."""
    state.ranks = redistribute_ranks(state.order, state.max_components(), state.offers(), state.budget)
