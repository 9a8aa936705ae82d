"""``statistics_precision``: which ``cov_update`` path each group's 16-bit statistics take.

Where no Triton kernel runs (CPU), the torch backend is given the fast path's arithmetic
(:func:`eva_kernels.testing.cov_update_fast_reference`: raw fp32 products per 512-row chunk,
then the shift correction) so that the engine's routing runs for real on real models; the
Triton kernel itself runs in the interpreter on a tiny Llama. Checked: components equal to the
exact float64 PCA of the consumed tokens (overlap >= 0.9999 on MiniLM in bf16), "auto" taking
the fast path only after a group's first solve and only where ``R <= 64``, massive-activation
channels staying exact, the metadata, the option's validation and the warning.
"""
from __future__ import annotations

import os
import types
import warnings

import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora.config import EvaConfig

import eva
import eva_kernels
from eva.engine import precision
from eva.engine.statistics import RunningStats
from eva.errors import EvaError
from eva.testing import TokenRecorder, check_against_exact
from eva_kernels import _registry
from helpers import random_token_batches, tiny_llama_model

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LIMIT = eva_kernels.FAST_RATIO_LIMIT


def _run(model, batches, cfg, **kw):
    seen = TokenRecorder()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "EVA stopped")
        sd = eva.get_eva_state_dict(model, batches, cfg, show_progress_bar=False, observers=[seen], **kw)
    return sd, seen


def _cfg(targets, r=4, tau=0.99):
    return LoraConfig(r=r, target_modules=targets, init_lora_weights="eva", eva_config=EvaConfig(rho=2.0, tau=tau))


# ---------------------------------------------------------------- routing ------------------------
def test_route():
    assert precision.initial("auto") == "exact" and precision.initial("fast") == "fast"
    assert precision.route("auto", 1.0) == "fast" and precision.route("auto", LIMIT) == "fast"
    assert precision.route("auto", LIMIT * 1.01) == "exact"
    assert precision.route("auto", None) == "exact" and precision.route("auto", float("nan")) == "exact"
    assert precision.route("auto", float("inf")) == "exact"
    assert precision.route("exact", 1.0) == "exact" and precision.route("fast", 1e9) == "fast"


@pytest.mark.parametrize("bad", ["tf32", "Fast", None, 1])
def test_bad_option_is_refused_before_the_model_runs(tiny_llama, bad):
    with pytest.raises(EvaError, match="statistics_precision must be one of"):
        eva.get_eva_state_dict(tiny_llama, [], _cfg(LLAMA_TARGETS), statistics_precision=bad)


def test_running_stats_switch_back_and_forth_by_ratio(torch_with_fast_path):
    stats = RunningStats(5, torch.device("cpu"), True, _registry.get_backend("torch"), precision="auto")
    x = (torch.randn(40, 5) + 1).bfloat16()
    stats.update(x, None)
    assert stats.batches == {"exact": 1, "fast": 0}  # no R before the first solve
    stats.observe_ratio(3.0)
    stats.update(x, None)
    stats.observe_ratio(500.0)  # a massive channel appeared: back to exact
    stats.update(x, None)
    stats.update(x.float(), None)  # fp32 rows are exact whatever the path
    assert stats.batches == {"exact": 3, "fast": 1}
    assert stats.max_ratio == 500.0 and stats.fast_ratio == 500.0 and stats.path == "exact"


def test_warning_names_layers_whose_ratio_rose_after_fast_batches():
    stats = types.SimpleNamespace(batches={"exact": 1, "fast": 2}, fast_ratio=300.0)
    group = types.SimpleNamespace(stats=stats, members=["layers.0.q_proj", "layers.0.k_proj"])
    with pytest.warns(UserWarning, match=r"layers.0.q_proj.*statistics_precision='exact'"):
        precision.warn_if_exceeded([group])
    stats.fast_ratio = 10.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        precision.warn_if_exceeded([group])


# ---------------------------------------------------------------- engine -------------------------
def test_minilm_bf16_auto_takes_the_fast_path_and_stays_exact(minilm, minilm_loader, torch_with_fast_path):
    """MiniLM in bf16: after each group's first solve "auto" takes the fast path where R <= 64;
    components match the exact PCA of the consumed bf16 tokens (>= 0.9999) and the all-exact run."""
    model = minilm[0].to(torch.bfloat16)
    try:
        cfg = _cfg(["query", "key", "value", "dense"], r=4)
        sd, seen = _run(model, minilm_loader(n_batches=6), cfg, backend="torch", max_steps=6)
        ref, _ = _run(model, minilm_loader(n_batches=6), cfg, backend="torch", max_steps=6,
                      statistics_precision="exact")
    finally:
        minilm[0].float()
    summary = sd.metadata["run"]["statistics_precision"]
    assert summary["option"] == "auto" and summary["batches"]["fast"] > 0, summary
    assert ref.metadata["run"]["statistics_precision"]["batches"]["fast"] == 0
    for name, info in sd.metadata["layers"].items():
        batches, ratio = info["statistics_batches"], info["moment_ratio"]
        assert batches["exact"] >= 1  # the first batch, before any R
        if ratio is not None and ratio < LIMIT / 2 and info["steps"] > 1:
            assert batches["fast"] > 0, (name, info)
        if ratio is not None and ratio > 2 * LIMIT:
            assert batches["fast"] == 0, (name, info)
    assert check_against_exact(sd, seen, min_overlap=0.9999) >= 0.9999
    for name in sd:
        if sd[name].shape[0]:
            assert float(eva_kernels.subspace_overlap(sd[name].double(), ref[name].double())) >= 0.9999, name


def test_massive_channel_groups_stay_exact(torch_with_fast_path):
    """A Llama whose embedding channel 0 carries +1000 (bf16): the groups reading it (R ~ 1e5)
    never take the fast path; the others do; everything still matches the exact PCA."""
    model = tiny_llama_model(layers=2)
    with torch.no_grad():
        model.embed_tokens.weight[:, 0] += 1000.0
    model = model.to(torch.bfloat16)
    batches = random_token_batches(97, 5, batch=4, seq=16)
    sd, seen = _run(model, batches, _cfg(LLAMA_TARGETS, r=2, tau=1.0), backend="torch")
    layers = sd.metadata["layers"]
    ratios = {n: i["moment_ratio"] for n, i in layers.items()}
    assert max(ratios.values()) > 100 * LIMIT, ratios
    for name, info in layers.items():
        if ratios[name] > LIMIT:
            assert info["statistics_batches"]["fast"] == 0, (name, info)
        else:
            assert info["statistics_batches"]["fast"] == 4, (name, info)  # every batch after the first
    check_against_exact(sd, seen, min_overlap=0.999)


def test_forced_paths(tiny_llama, torch_with_fast_path):
    batches = random_token_batches(97, 3, batch=4, seq=12)
    model = tiny_llama.to(torch.bfloat16)
    try:
        fast, seen = _run(model, batches, _cfg(LLAMA_TARGETS), backend="torch", statistics_precision="fast")
        exact, _ = _run(model, batches, _cfg(LLAMA_TARGETS), backend="torch", statistics_precision="exact")
    finally:
        tiny_llama.float()
    assert fast.metadata["run"]["statistics_precision"]["batches"]["exact"] == 0
    assert exact.metadata["run"]["statistics_precision"]["batches"]["fast"] == 0
    assert exact.metadata["layers"][next(iter(exact))]["moment_ratio"] is None  # not measured when exact
    check_against_exact(fast, seen, min_overlap=0.999)


def test_forced_fast_without_a_fast_backend_warns_and_stays_exact(tiny_llama):
    batches = random_token_batches(97, 2, batch=2, seq=8)
    model = tiny_llama.to(torch.bfloat16)
    try:
        with pytest.warns(UserWarning, match="statistics_precision='fast' has no effect with the 'torch' backend"):
            sd = eva.get_eva_state_dict(model, batches, _cfg(LLAMA_TARGETS), backend="torch",
                                        statistics_precision="fast", show_progress_bar=False, max_steps=2)
    finally:
        tiny_llama.float()
    assert sd.metadata["run"]["statistics_precision"]["batches"]["fast"] == 0


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or "triton" not in eva_kernels.available_backends("cpu"),
                    reason="Triton on CPU needs TRITON_INTERPRET=1 set before eva_kernels is imported")
@pytest.mark.parametrize("option", ["auto", "fast"])
def test_triton_kernel_fast_path_in_the_engine(option):
    """The Triton kernel's fast path (interpreter) inside the engine, on a tiny bf16 Llama."""
    model = tiny_llama_model(hidden=24, intermediate=40, layers=1).to(torch.bfloat16)
    batches = random_token_batches(model.config.vocab_size, 3, batch=3, seq=12, seed=4)
    sd, seen = _run(model, batches, _cfg(LLAMA_TARGETS, r=2, tau=1.0), backend="triton",
                    statistics_precision=option)
    summary = sd.metadata["run"]["statistics_precision"]
    assert summary["batches"]["fast"] > 0 and sd.metadata["run"]["backend"] == "triton", summary
    check_against_exact(sd, seen, min_overlap=0.9999)
