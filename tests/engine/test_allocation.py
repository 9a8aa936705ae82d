"""Rank redistribution by explained variance ratio."""
from eva.engine.allocation import redistribute_ranks


def test_top_budget_components_win():
    layers = ["a", "b", "c"]
    ratios = {"a": [0.5, 0.3, 0.1, 0.05], "b": [0.4, 0.02, 0.01, 0.0], "c": [0.2, 0.19, 0.18, 0.17]}
    ranks = redistribute_ranks(layers, {n: 4 for n in layers}, ratios, budget=6)
    assert ranks == {"a": 2, "b": 1, "c": 3}
    assert sum(ranks.values()) == 6


def test_caps_and_short_lists():
    ratios = {"a": [0.9, 0.8, 0.7], "b": [0.1]}
    ranks = redistribute_ranks(["a", "b"], {"a": 2, "b": 4}, ratios, budget=4)
    assert ranks == {"a": 2, "b": 1}  # a capped at 2, b only offers 1; budget cannot be met


def test_shared_ratios_tie_break_by_layer_order():
    same = [0.3, 0.2, 0.1]
    ranks = redistribute_ranks(["q", "k", "v"], {n: 3 for n in "qkv"}, {n: same for n in "qkv"}, budget=4)
    assert ranks == {"q": 2, "k": 1, "v": 1}


def test_rho_one_keeps_every_rank():
    ratios = {"a": [0.9, 0.8], "b": [0.01, 0.001]}
    assert redistribute_ranks(["a", "b"], {"a": 2, "b": 2}, ratios, budget=4) == {"a": 2, "b": 2}
