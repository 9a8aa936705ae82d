"""Layer-sequential runs within a memory budget equal the all-at-once run.

On the same batches, with every group forced to the same number of steps (``tau=1.0`` never
converges on random data), a run that calibrates one window of blocks at a time computes the
same statistics as the all-at-once run, hence the same components (overlap >= 0.99999 per
layer, equal to rounding here) and the same ranks. Checked on a tiny GQA Llama (4 decoder
layers, q/k/v and gate/up sharing inputs) and on GPT-2 ``Conv1D`` blocks, for windows of two
blocks, one block, and parts of a block; the statistics' peak stays within the budget and each
block runs once per batch (plus the discovery forward)."""
from __future__ import annotations

import collections
import copy
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.config import EvaConfig

import eva
from eva.engine.memory_budget import statistic_bytes
from eva.testing import TokenRecorder, check_against_exact
from eva_kernels import subspace_overlap
from helpers import random_token_batches, tiny_llama_model

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
D, DFF = 40, 72
#: one Llama block's statistics: q/k/v share one, gate/up one, o and down one each
LLAMA_BLOCK = 3 * statistic_bytes(D, True) + statistic_bytes(DFF, True)


def _run(model, batches, cfg, **kw):
    """One run; the all-at-once references polish every component to ``final_tol`` as a
    layer-sequential run does (``polish_screen_tol=None``), so that the two agree to rounding;
    the screened polish is compared with the full one in ``test_polish_plan.py``."""
    kw.setdefault("polish_screen_tol", None)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "EVA stopped")
        return eva.get_eva_state_dict(model, batches, cfg, show_progress_bar=False, **kw)


def assert_same_result(sd, ref):
    assert set(sd) == set(ref)
    for name in ref:
        a, b = sd.metadata["layers"][name], ref.metadata["layers"][name]
        assert (a["rank"], a["tokens"], a["steps"]) == (b["rank"], b["tokens"], b["steps"]), name
        assert a["explained_variance_ratio"] == pytest.approx(b["explained_variance_ratio"], rel=1e-5, abs=1e-9)
        if ref[name].shape[0]:
            assert float(subspace_overlap(sd[name].double(), ref[name].double())) >= 0.99999, name
            torch.testing.assert_close(sd[name], ref[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.fixture(scope="module")
def llama():
    model = tiny_llama_model(hidden=D, intermediate=DFF, layers=4)
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA
    batches = random_token_batches(model.config.vocab_size, 5, batch=3, seq=15, seed=3)
    cfg = LoraConfig(r=4, target_modules=LLAMA_TARGETS, init_lora_weights="eva",
                     eva_config=EvaConfig(rho=2.0, tau=1.0))
    return model, batches, cfg, _run(model, batches, cfg)


@pytest.fixture(scope="module")
def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=101, n_positions=64, bos_token_id=0,
                     eos_token_id=0)
    model = GPT2LMHeadModel(cfg).eval()
    batches = random_token_batches(101, 5, batch=3, seq=15, seed=4)
    lcfg = LoraConfig(r=4, target_modules=["c_attn", "c_proj", "c_fc"], init_lora_weights="eva",
                      eva_config=EvaConfig(rho=2.0, tau=1.0))
    return model, batches, lcfg, _run(model, batches, lcfg)


@pytest.mark.parametrize("budget,windows", [(2 * LLAMA_BLOCK, [[0, 1], [2, 3]]),
                                            (LLAMA_BLOCK, [[0, 0], [1, 1], [2, 2], [3, 3]]),
                                            (statistic_bytes(DFF, True), [[j, j] for j in range(4) for _ in (0, 1)])])
def test_llama_layer_sequential_equals_all_at_once(llama, budget, windows):
    model, batches, cfg, ref = llama
    sd = _run(model, batches, cfg, memory_budget=budget)
    run = sd.metadata["run"]
    assert run["mode"] == "layer_sequential" and run["memory_budget"] == budget
    assert [w["blocks"] for w in run["windows"]] == windows
    assert all(w["batches"] == 5 and w["stop_reason"] == "exhausted" for w in run["windows"])
    assert 0 < run["peak_statistics_bytes"] <= budget
    assert run["peak_cache_bytes"] > 0
    assert ref.metadata["run"]["mode"] == "all_at_once"
    assert_same_result(sd, ref)


@pytest.mark.parametrize("blocks_per_window", [1, 2])
def test_gpt2_conv1d_layer_sequential_equals_all_at_once(gpt2, blocks_per_window):
    model, batches, cfg, ref = gpt2
    block = 2 * statistic_bytes(32, True) + statistic_bytes(96, True) + statistic_bytes(128, True)
    sd = _run(model, batches, cfg, memory_budget=blocks_per_window * block)
    run = sd.metadata["run"]
    assert run["mode"] == "layer_sequential"
    assert len(run["windows"]) == (3 if blocks_per_window == 1 else 2)
    assert run["peak_statistics_bytes"] <= blocks_per_window * block
    assert_same_result(sd, ref)


def test_options_that_change_the_schedule_agree(llama):
    """check_every, no early stop of the forward, a split block: still the all-at-once result."""
    model, batches, cfg, _ = llama
    for kw in (dict(check_every=2), dict(skip_rest_of_forward=False), dict(check_every=3, max_steps=4)):
        ref = _run(model, batches, cfg, **kw)
        sd = _run(model, batches, cfg, memory_budget=statistic_bytes(DFF, True) + statistic_bytes(D, True), **kw)
        assert sd.metadata["run"]["mode"] == "layer_sequential", kw
        assert sd.metadata["run"]["stop_reason"] == ref.metadata["run"]["stop_reason"], kw
        assert sd.metadata["run"]["steps"] == ref.metadata["run"]["steps"], kw
        assert_same_result(sd, ref)


def test_each_block_runs_once_per_batch(llama, monkeypatch):
    """The forward is computed once per batch and block (plus one discovery forward of the first
    batch), never once per window; a block split over two windows runs once per window."""
    from transformers.models.llama import modeling_llama
    model, batches, cfg, _ = llama
    calls = collections.Counter()
    real = modeling_llama.LlamaDecoderLayer.forward

    def counting(self, *args, **kwargs):
        calls[self.self_attn.layer_idx] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(modeling_llama.LlamaDecoderLayer, "forward", counting)
    _run(model, batches, cfg, memory_budget=LLAMA_BLOCK)
    assert dict(calls) == {j: 1 + len(batches) for j in range(4)}
    calls.clear()
    _run(model, batches, cfg, memory_budget=statistic_bytes(DFF, True))  # every block split in two
    assert dict(calls) == {j: 1 + 2 * len(batches) for j in range(4)}


def test_converges_on_all_components_and_matches_the_exact_pca(llama):
    """With real convergence (tau=0.9) each group stops on its own, converged on all r*rho
    components; the components are the exact PCA of the tokens each group consumed."""
    model, _, _, _ = llama
    batches = random_token_batches(model.config.vocab_size, 40, batch=4, seq=15, seed=5)
    cfg = LoraConfig(r=2, target_modules=LLAMA_TARGETS, init_lora_weights="eva",
                     eva_config=EvaConfig(rho=2.0, tau=0.9))
    seen = TokenRecorder()

    class AllComponents(eva.EvaObserver):
        converged = []

        def on_group_converged(self, step, group):
            self.converged.append(group.leader)
            assert group.estimate.converged_prefix(0.9) >= group.max_components  # not just the allocated rank

    watch = AllComponents()
    sd = _run(model, batches, cfg, memory_budget=LLAMA_BLOCK, observers=[seen, watch])
    run = sd.metadata["run"]
    assert run["mode"] == "layer_sequential" and run["stop_reason"] == "converged"
    assert all(w["stop_reason"] == "converged" for w in run["windows"])
    assert len(watch.converged) == len(sd.metadata["groups"])
    assert all(info["converged"] for info in sd.metadata["layers"].values())
    assert sum(info["rank"] for info in sd.metadata["layers"].values()) == 2 * len(sd)
    check_against_exact(sd, seen, min_overlap=0.999)


def test_grouped_statistics_that_fit_run_all_at_once(llama):
    """A budget below the estimate without sharing (every target its own statistic) but above
    the real need (q/k/v, gate/up share): the discovery forward finds the groups, and the run is
    the all-at-once run on the same batches."""
    model, batches, cfg, ref = llama
    grouped = 4 * LLAMA_BLOCK
    ungrouped = 4 * (6 * statistic_bytes(D, True) + statistic_bytes(DFF, True))
    sd = _run(model, batches, cfg, memory_budget=(grouped + ungrouped) // 2)
    assert sd.metadata["run"]["mode"] == "all_at_once"
    assert sd.metadata["run"]["peak_statistics_bytes"] == grouped
    assert_same_result(sd, ref)


def test_skipped_empty_batches_and_offload_device(llama):
    model, batches, cfg, _ = llama
    empty = {k: v.clone() for k, v in batches[1].items()}
    empty["attention_mask"].zero_()
    loader = [batches[0], empty] + batches[2:]
    with pytest.warns(UserWarning, match="skipping batch 1"):
        ref = _run(model, loader, cfg, skip_empty_batches=True)
    with pytest.warns(UserWarning, match="skipping batch 1"):
        sd = _run(model, loader, cfg, skip_empty_batches=True, memory_budget=LLAMA_BLOCK, offload_device="cpu")
    assert sd.metadata["run"]["steps"] == ref.metadata["run"]["steps"] == 5
    assert_same_result(sd, ref)


def test_peft_model_with_a_budget(llama):
    """The PEFT drop-in: block list found under ``base_model.model``; LoRA weights loaded."""
    model, batches, cfg, ref = llama
    peft_model = get_peft_model(copy.deepcopy(model), copy.deepcopy(cfg))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "EVA stopped")
        eva.initialize_lora_eva_weights(peft_model, batches, show_progress_bar=False, memory_budget=LLAMA_BLOCK,
                                        blocks="layers")
    lora_a = peft_model.base_model.model.layers[2].mlp.down_proj.lora_A["default"].weight
    name = "layers.2.mlp.down_proj"
    key = next(k for k in ref if k.endswith(name))
    torch.testing.assert_close(lora_a, ref[key][: lora_a.shape[0]], rtol=1e-4, atol=1e-5)
    assert all("forward" not in m.__dict__ for m in peft_model.modules())


@pytest.mark.filterwarnings("ignore:EVA stopped")
def test_accelerate_offloaded_model_layer_sequential(llama, tmp_path):
    """An accelerate-dispatched model (blocks on CPU and disk) calibrated layer by layer."""
    pytest.importorskip("accelerate")
    from accelerate import dispatch_model
    model, batches, cfg, ref = llama
    device_map = {"embed_tokens": "cpu", "layers.0": "cpu", "layers.1": "disk", "layers.2": "cpu",
                  "layers.3": "disk", "norm": "cpu", "rotary_emb": "cpu"}
    dispatched = dispatch_model(copy.deepcopy(model), device_map=device_map, offload_dir=str(tmp_path))
    sd = _run(dispatched, batches, cfg, memory_budget=2 * LLAMA_BLOCK)
    assert sd.metadata["run"]["mode"] == "layer_sequential"
    assert_same_result(sd, ref)


@pytest.mark.parametrize("tau", [1.0, 0.9])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_result_does_not_depend_on_the_memory_budget(family, tau, request):
    """The same data and settings give the same adapters with a 1 TB budget (all at once), a budget
    of one layer (layer-sequential) and no budget: one convergence rule for every mode, so no
    layer is paused by a mid-run rank allocation in one mode and not in the other."""
    model, _, cfg, _ = request.getfixturevalue(family)
    cfg = copy.deepcopy(cfg)
    cfg.eva_config.tau = tau
    cfg.r = 2
    batches = random_token_batches(model.config.vocab_size, 10, batch=4, seq=15, seed=6)
    one_layer = LLAMA_BLOCK if family == "llama" else 2 * statistic_bytes(32, True) + statistic_bytes(
        96, True) + statistic_bytes(128, True)
    big = _run(model, batches, cfg, memory_budget="1TB")
    small = _run(model, batches, cfg, memory_budget=one_layer)
    free = _run(model, batches, cfg, convergence="all_components")  # no budget, the same rule asked for
    assert big.metadata["run"]["mode"] == "all_at_once" and small.metadata["run"]["mode"] == "layer_sequential"
    for run in (big, small, free):
        assert run.metadata["run"]["convergence"] == "all_components"
    assert_same_result(small, big)
    assert_same_result(free, big)
    if tau < 1.0:  # some groups converged early: the rule was really exercised
        steps = {i["steps"] for i in big.metadata["layers"].values()}
        assert len(steps) > 1 or min(steps) < 10
