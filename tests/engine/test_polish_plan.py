"""The screened polish (:mod:`eva.engine.polish_plan`): which components may still be kept.

Unit cases of the cutoff and the certain drops; a property test (a certainly-dropped component
is never kept by the allocation of any true values within the margins); the engine with and
without the screen: the same ranks and components, the exact PCA, fewer components polished,
and whole groups skipped where the allocation cannot keep them (a wide ``down_proj``).
"""
from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from peft import LoraConfig
from peft.tuners.lora.config import EvaConfig

import eva
from eva.engine import polish_plan
from eva.engine.allocation import redistribute_ranks
from eva.errors import EvaError
from eva.testing import check_against_exact
from eva_kernels import subspace_overlap
from helpers import random_token_batches, tiny_llama_model


def _group(index, members, ratios, residual):
    return SimpleNamespace(index=index, members=members,
                           estimate=SimpleNamespace(ratios=ratios, polished_residual=residual))


def test_cutoff_is_the_budget_th_offer_or_minus_infinity():
    offers = {"a": [0.5, 0.3, 0.1], "b": [0.05, 0.04]}
    assert polish_plan.cutoff(offers, {"a": 3, "b": 2}, 3) == 0.1
    assert polish_plan.cutoff(offers, {"a": 2, "b": 2}, 3) == 0.05  # a offers only its first two
    assert polish_plan.cutoff(offers, {"a": 3, "b": 2}, 5) == 0.04
    assert polish_plan.cutoff(offers, {"a": 3, "b": 2}, 6) == -math.inf  # every offer is kept


def test_components_beyond_the_margin_are_dropped_and_the_rest_kept():
    groups = [_group(0, ["a"], [0.5, 0.3, 0.1], 0.02), _group(1, ["b", "c"], [0.05, 0.04], 0.02),
              _group(2, ["z"], [], None)]  # a zero-variance group offers nothing
    offers = {"a": [0.5, 0.3, 0.1], "b": [0.05, 0.04], "c": [0.05, 0.04], "z": []}
    max_c = {"a": 3, "b": 1, "c": 2, "z": 4}
    margin = polish_plan.margins(groups)
    assert margin == {0: pytest.approx(0.01), 1: pytest.approx(0.001), 2: math.inf}
    assert polish_plan.components_to_polish(groups, offers, max_c, 3, margin) == {0: 3, 1: 0, 2: 0}
    # a margin reaching the cutoff keeps the group's components in play
    wide = {0: 0.0, 1: 0.06, 2: 0.0}
    assert polish_plan.components_to_polish(groups, offers, max_c, 3, wide) == {0: 3, 1: 2, 2: 0}
    # never polished: no margin, every offer stays
    assert polish_plan.components_to_polish(groups, offers, max_c, 3, {0: 0.0, 1: math.inf, 2: 0.0})[1] == 2
    # a budget above the offers keeps everything
    assert polish_plan.components_to_polish(groups, offers, max_c, 50, margin) == {0: 3, 1: 2, 2: 0}


@given(st.lists(st.tuples(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=5), st.floats(0.0, 0.2),
                          st.integers(1, 5)), min_size=1, max_size=6),
       st.integers(1, 12), st.randoms(use_true_random=False))
def test_a_certainly_dropped_component_is_never_kept_whatever_the_true_values(spec, budget, rnd):
    """Lower bounds ``low`` (descending) and margins; any true values in ``[low, low + margin]``
    (descending too) allocate no rank to a component the plan dropped."""
    groups, offers, max_c, truth = [], {}, {}, {}
    for i, (vals, resid, mc) in enumerate(spec):
        low = sorted(vals, reverse=True)
        name = f"l{i}"
        groups.append(_group(i, [name], low, resid))
        offers[name], max_c[name] = low, mc
    margin = polish_plan.margins(groups)
    keep = polish_plan.components_to_polish(groups, offers, max_c, budget, margin)
    for g, (_, resid, _) in zip(groups, spec):
        low = offers[g.members[0]]
        bound = resid * low[0]  # |lambda_i - theta_i| <= ||r_i|| <= resid * theta_1, in ratios
        true = sorted((v + rnd.uniform(0.0, bound) for v in low), reverse=True)
        true = [max(t, lo) for t, lo in zip(true, low)]  # sorting keeps each true value >= its low
        truth[g.members[0]] = true
    ranks = redistribute_ranks(list(offers), max_c, truth, budget)
    for g in groups:
        assert ranks[g.members[0]] <= keep[g.index], (keep, ranks, offers, margin)


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _run(model, batches, screen, batched, spy=None):
    cfg = LoraConfig(r=4, target_modules=TARGETS, init_lora_weights="eva", eva_config=EvaConfig(rho=2.0, tau=0.99))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "EVA stopped")
        return eva.get_eva_state_dict(model, batches, cfg, show_progress_bar=False, polish_screen_tol=screen,
                                      batch_solves=batched, observers=[spy] if spy is not None else ())


@pytest.mark.parametrize("batched", [False, True], ids=["per_group", "batched"])
def test_screened_polish_gives_the_same_ranks_and_exact_components(token_spy, batched):
    """A Llama whose down_proj input (width 400) is 10x the others: with flat random spectra its
    ratios are far below the cutoff, so the screen skips those groups entirely."""
    model = tiny_llama_model(hidden=40, intermediate=400, layers=2)
    batches = random_token_batches(model.config.vocab_size, 6, batch=4, seq=15, seed=5)
    full = _run(model, batches, None, batched)
    screened = _run(model, batches, 1e-2, batched, token_spy)
    assert full.metadata["run"]["polish_screen"] is None
    info = screened.metadata["run"]["polish_screen"]
    assert info["groups_polished"] < info["groups"] and info["components_polished"] < info["components_offered"]
    for name in full:
        assert full[name].shape == screened[name].shape, name
        if full[name].shape[0]:
            assert subspace_overlap(full[name], screened[name]) > 0.99999, name
    assert all(screened[f"layers.{i}.mlp.down_proj"].shape[0] == 0 for i in range(2))
    check_against_exact(screened, token_spy, min_overlap=0.9999)


def test_screened_polish_on_minilm_matches_the_full_polish(minilm, minilm_loader):
    model, _ = minilm
    cfg = LoraConfig(r=4, target_modules=["query", "key", "value", "dense"], init_lora_weights="eva",
                     eva_config=EvaConfig(rho=2.0, tau=0.99))
    runs = {s: eva.get_eva_state_dict(model, minilm_loader(n_batches=8), cfg, show_progress_bar=False,
                                      polish_screen_tol=s) for s in (None, 1e-2)}
    full, screened = runs[None], runs[1e-2]
    info = screened.metadata["run"]["polish_screen"]
    assert info["components_polished"] < info["components_offered"]
    for name in full:
        assert full[name].shape == screened[name].shape, name
        if full[name].shape[0]:
            assert subspace_overlap(full[name], screened[name]) > 0.99999, name
            assert torch.allclose(full[name], screened[name], atol=1e-3)


@pytest.mark.parametrize("bad", [0.0, 1.0, -1e-3, float("nan"), "1e-2"])
def test_bad_screen_tolerance_is_refused(bad):
    with pytest.raises(EvaError, match=r"polish_screen_tol must be None \(no screening\) or a number in \(0, 1\)"):
        eva.EvaOptions(polish_screen_tol=bad)


def test_layer_sequential_run_agrees_with_the_screened_polish():
    """A layer-sequential run polishes every component of each window (the allocation comes
    after); the default all-at-once run screens: the same ranks, components to the tolerance."""
    model = tiny_llama_model(hidden=40, intermediate=72, layers=3)
    batches = random_token_batches(model.config.vocab_size, 5, batch=3, seq=15, seed=3)
    screened = _run(model, batches, 1e-2, False)
    cfg = LoraConfig(r=4, target_modules=TARGETS, init_lora_weights="eva", eva_config=EvaConfig(rho=2.0, tau=0.99))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "EVA stopped")
        sequential = eva.get_eva_state_dict(model, batches, cfg, show_progress_bar=False, memory_budget=30_000)
    assert sequential.metadata["run"]["mode"] == "layer_sequential"
    assert screened.metadata["run"]["polish_screen"] is not None
    assert sequential.metadata["run"]["polish_screen"] is None  # windows polish before the allocation
    assert sequential.ranks == screened.ranks
    for name in screened:
        if screened[name].shape[0]:
            assert subspace_overlap(sequential[name], screened[name]) > 0.99999, name
