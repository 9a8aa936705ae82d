"""Layers whose input has (near-)zero variance get ratio 0, rank 0 and one warning naming them.

Before the fix, a constant input's total variance was clamped to the smallest float64, rounding
noise divided by it gave explained variance ratios near 1e292, and the allocation handed such a
layer every rank it could take.
"""
from __future__ import annotations

import copy
import warnings
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora.config import EvaConfig
from torch import nn

import eva
from helpers import random_token_batches, starve_layer_at_first
from eva.engine.state import Estimate, GroupState
from eva.engine.variance_floor import apply_variance_floor


def cfg(targets, r=2, rho=2.0, tau=0.99):
    return LoraConfig(r=r, target_modules=targets, init_lora_weights="eva", eva_config=EvaConfig(rho=rho, tau=tau))


def run(model, loader, config, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sd = eva.get_eva_state_dict(model, loader, config, show_progress_bar=False, **kw)
    return sd, [str(w.message) for w in caught if "zero variance" in str(w.message)]


class ConstantSecondInput(nn.Module):
    """``first`` sees the data; ``second`` sees a buffer broadcast to every token."""

    def __init__(self, d=12):
        super().__init__()
        self.first = nn.Linear(d, d)
        self.second = nn.Linear(d, d)
        self.register_buffer("const", torch.linspace(-1.0, 2.0, d))

    def forward(self, x):
        return self.first(x) + self.second(self.const.expand_as(x))


def test_constant_input_layer_gets_rank_zero_and_one_warning():
    torch.manual_seed(0)
    model = ConstantSecondInput()
    loader = [torch.randn(40, 12) for _ in range(6)]
    sd, warned = run(model, loader, cfg(["first", "second"], r=2, rho=2.0),
                     forward_fn=lambda m, x: m(x), prepare_model_inputs_fn=None,
                     prepare_layer_inputs_fn=None)
    assert sd.ranks == {"first": 4, "second": 0}  # first takes its cap r * rho, second nothing
    info = sd.metadata["layers"]["second"]
    assert info["zero_variance"] and not info["converged"]
    assert info["explained_variance_ratio"] == [0.0] * 4
    assert max(sd.metadata["layers"]["first"]["explained_variance_ratio"]) <= 1.0
    assert len(warned) == 1 and "['second']" in warned[0] and "rank 0" in warned[0]


def test_repeated_sentence_pooler_gets_rank_zero(minilm):
    model, tok = minilm
    batch = dict(tok(["the cat sat on the mat."] * 8, return_tensors="pt"))
    sd, warned = run(model, [batch, batch], cfg(["query", "key", "value", "dense"], r=4))
    assert sd.ranks["pooler.dense"] == 0
    assert sd.metadata["layers"]["pooler.dense"]["zero_variance"]
    assert all(max(i["explained_variance_ratio"]) <= 1.0 for i in sd.metadata["layers"].values())
    assert len(warned) == 1 and "pooler.dense" in warned[0]
    assert sum(sd.ranks.values()) == 4 * len(sd)  # the pooler's share went to the other layers


def _same_token_batches(n, token=5):
    return [{"input_ids": torch.full((3, 11), token), "attention_mask": torch.ones(3, 11, dtype=torch.long)}
            for _ in range(n)]


def test_all_the_same_token_is_an_error_not_a_silent_convergence(tiny_llama):
    """RMSNorm + RoPE + causal attention over identical tokens: every layer input is constant."""
    with pytest.raises(eva.EvaError, match=r"every target layer saw inputs with \(near-\)zero variance.*varied data"):
        eva.get_eva_state_dict(copy.deepcopy(tiny_llama), _same_token_batches(3),
                               cfg(["q_proj", "o_proj", "down_proj"]), show_progress_bar=False)


def test_zero_variance_group_keeps_consuming_until_data_varies(tiny_llama):
    """A group that is constant at first is not 'converged': it stays hooked and uses later batches."""
    loader = _same_token_batches(2) + random_token_batches(97, 6, batch=3, seq=11)
    sd, warned = run(copy.deepcopy(tiny_llama), loader, cfg(["q_proj", "down_proj"], tau=0.0))
    layers = sd.metadata["layers"]
    assert not warned and not any(i["zero_variance"] for i in layers.values())
    # tau = 0 converges a group as soon as it has variance and two estimates: the third batch
    assert all(i["steps"] == 3 and i["converged"] for i in layers.values())
    assert sd.metadata["run"]["stop_reason"] == "converged"


def _group(index, tokens, d, variance, eig, input_roundoff=2.0 ** -24):
    group = GroupState(index=index, members=[f"layer{index}"], d=d, max_components=len(eig),
                       estimate=Estimate(variance=variance, eigenvalues_host=eig, tokens=tokens))
    group.stats = SimpleNamespace(input_roundoff=input_roundoff)  # all the floor reads of the statistic
    return group


@pytest.mark.parametrize("variance, why", [
    ((0.0, 0.0, 0.0), "exactly zero"),
    ((-1e-9, 1.0, 1.0), "negative (cancellation)"),
    ((float("nan"), 1.0, 1.0), "not finite"),
    ((1e-3, 1e-3, 0.0), "no feature above the rounding of its own elements"),
    ((1e-7, 1.0, 1.0), "below the accumulation floor"),
    ((1e-18, 1e-18, 1.0), "negligible next to the largest group"),
], ids=["zero", "negative", "nan", "resolution", "accumulation", "relative"])
def test_variance_floor_rules(variance, why):
    """``variance`` = (V, S, F): total variance, accumulated energy, features above their floor."""
    real = _group(0, 100, 4, (40.0, 40.0, 4.0), [20.0, 10.0])
    tiny = _group(1, 100, 4, variance, [1e-3, 1e-4])
    flagged = apply_variance_floor([real, tiny])
    assert flagged == [tiny], why
    assert tiny.estimate.ratios == [0.0, 0.0] and tiny.estimate.zero_variance
    assert real.estimate.ratios == [0.5, 0.25] and not real.estimate.zero_variance


def test_variance_floor_keeps_small_but_real_variance():
    real = _group(0, 100, 4, (40.0, 40.0, 4.0), [20.0])
    small = _group(1, 100, 4, (4e-9, 4e-9, 1.0), [2e-9])  # std 1e-5 relative to the other: real data
    assert apply_variance_floor([real, small]) == []
    assert small.estimate.ratios == [0.5]


def _features_above(x: torch.Tensor, input_roundoff: float) -> float:
    """The engine's per-feature count F on the rows ``x`` (n, d), through RunningStats."""
    from eva.engine.statistics import RunningStats
    import eva_kernels
    stats = RunningStats(x.shape[1], torch.device("cpu"), True, eva_kernels.resolve_backend("cov_update", "cpu",
                                                                                             "torch"))
    stats.update(x, None)
    stats.input_roundoff = input_roundoff
    return float(stats.variance_terms(torch.diagonal(stats.cov), stats.colsum, stats.count)[2])


def test_rounding_is_judged_per_element():
    """One bf16 rounding of each element is noise; a channel with a huge mean does not hide the
    variation of the others (it used to: the floor was relative to the whole token's energy)."""
    torch.manual_seed(0)
    base = torch.full((64, 6), 3.0)
    one_rounding = base * (1 + 2.0 ** -9 * torch.randint(-1, 2, base.shape))  # identical tokens, bf16-rounded
    assert _features_above(one_rounding, 2.0 ** -8) == 0.0
    assert _features_above(one_rounding, 2.0 ** -24) == 6.0  # from fp32 inputs the same spread is signal
    massive = torch.randn(64, 6) * 0.02
    massive[:, 0] += 1000.0  # bf16 keeps ~3 digits of 1000: channel 0 is noise, the other five are signal
    assert _features_above(massive.bfloat16().float(), 2.0 ** -8) == 5.0


def test_progress_bar_explains_reopened_layers(tiny_llama, monkeypatch, capsys):
    """A layer that converged on rank 0 and then receives rank is counted as 'reopened'."""
    starve_layer_at_first(monkeypatch, "layers.0.self_attn.o_proj", allocations=2)
    loader = random_token_batches(97, 5, batch=3, seq=11)
    eva.get_eva_state_dict(copy.deepcopy(tiny_llama), loader, cfg(["q_proj", "o_proj"], tau=1.0),
                           show_progress_bar=True, convergence="allocated_ranks")
    err = capsys.readouterr().err
    assert err.count("EVA: 1 layer(s) reopened: the rank allocation moved rank to layers") == 1  # one line, once
