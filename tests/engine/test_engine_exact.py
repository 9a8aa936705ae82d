"""The engine against the exact PCA (float64 SVD) of exactly the tokens it consumed."""
from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora.config import EvaConfig

import eva
from eva.testing import check_against_exact
from eva_kernels.testing import exact_pca
from helpers import UPPER_BMM_MARKS, random_token_batches

QKVD = ["query", "key", "value", "dense"]


def lora_config(targets, r=4, rho=2.0, tau=0.99, **eva_kwargs):
    return LoraConfig(r=r, target_modules=targets, init_lora_weights="eva",
                      eva_config=EvaConfig(rho=rho, tau=tau, **eva_kwargs))


def test_minilm_matches_exact_pca(minilm, minilm_loader, token_spy):
    model, _ = minilm
    cfg = lora_config(QKVD, r=4)
    sd = eva.get_eva_state_dict(model, minilm_loader(n_batches=6), cfg, show_progress_bar=False,
                                observers=[token_spy])
    check_against_exact(sd, token_spy)
    n_layers = len(sd)
    assert n_layers == 6 * 6 + 1  # q, k, v, attn-out, intermediate, output per layer + pooler
    assert sum(v.shape[0] for v in sd.values()) == 4 * n_layers  # budget honoured
    assert all(0 <= v.shape[0] <= 8 for v in sd.values())
    groups = sd.metadata["groups"]
    qkv = [g for g in groups if len(g) > 1]
    assert len(qkv) == 6 and all(len(g) == 3 and g[0].endswith("query") for g in qkv)
    # shared-input layers get identical components
    for g in qkv:
        a, b = sd[g[0]], sd[g[1]]
        k = min(a.shape[0], b.shape[0])
        assert torch.equal(a[:k], b[:k])
    # the pooler (input without a sequence dimension) got one row per sequence
    assert sd.metadata["layers"]["pooler.dense"]["tokens"] == sum(len(v) for v in token_spy["pooler.dense"])


@pytest.mark.parametrize("depth,batched", [(1, False), ("auto", False), ("auto", True)],
                         ids=["subspace_iteration", "krylov", "krylov_batched"])
def test_polish_depth_keeps_the_exact_pca(minilm, minilm_loader, token_spy, depth, batched):
    """The final polish as plain subspace iteration or restarted block Krylov (per group or
    batched): the same exact-PCA result; the depth that ran is in the metadata."""
    model, _ = minilm
    sd = eva.get_eva_state_dict(model, minilm_loader(n_batches=4), lora_config(QKVD, r=4, tau=1.0),
                                show_progress_bar=False, observers=[token_spy], final_krylov_depth=depth,
                                batch_solves=batched)
    check_against_exact(sd, token_spy, min_overlap=0.9999)
    assert sd.metadata["run"]["polish_krylov_depth"] == (1 if depth == 1 else 8)
    assert (sd.metadata["run"]["polish_rounds"] > 0) == batched  # rounds are counted for batched polishes


def test_gpt2_conv1d_matches_exact_pca(tiny_gpt2, token_spy):
    batches = random_token_batches(tiny_gpt2.config.vocab_size, 5)
    cfg = lora_config(["c_attn", "c_proj", "c_fc"], r=3)
    sd = eva.get_eva_state_dict(tiny_gpt2, batches, cfg, show_progress_bar=False, observers=[token_spy])
    assert set(sd) == {f"h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert sd["h.0.mlp.c_proj"].shape[1] == 4 * 48  # Conv1D in_features = weight.shape[0]
    check_against_exact(sd, token_spy)
    assert sum(v.shape[0] for v in sd.values()) == 3 * len(sd)
    # padding mask honoured: tokens = kept positions
    kept = sum(int(b["attention_mask"].sum()) for b in batches)
    assert sd.metadata["layers"]["h.0.attn.c_attn"]["tokens"] <= kept


@pytest.mark.parametrize("products", ["mirror", pytest.param("upper", marks=UPPER_BMM_MARKS)])
def test_batched_products_keep_the_exact_pca(tiny_llama, token_spy, products):
    """Batched solves whose products read the statistics in place (the Triton kernel, no d x d
    copy per step; the CUDA default) or from symmetric copies: the same exact-PCA result, and
    the metadata says which ran."""
    batches = random_token_batches(tiny_llama.config.vocab_size, 5, batch=4, seq=15)
    cfg = lora_config(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], r=4, tau=1.0)
    sd = eva.get_eva_state_dict(tiny_llama, batches, cfg, show_progress_bar=False, observers=[token_spy],
                                batch_solves=True, batched_products=products, rayleigh_ritz="host")
    check_against_exact(sd, token_spy, min_overlap=0.9999)
    assert sd.metadata["run"]["backends"]["batched_products"] == products


def test_batched_products_that_cannot_run_fall_back_and_say_so(tiny_llama, token_spy, monkeypatch):
    """A GPU where the in-place kernel cannot compile or launch: the run goes on with symmetric
    copies, warns, and the metadata names the fallback and its reason."""
    from eva_kernels.backends.triton import upper_bmm as kernel_module

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel image is available for execution on the device")
    monkeypatch.setattr(kernel_module, "upper_bmm", broken)
    batches = random_token_batches(tiny_llama.config.vocab_size, 3, batch=4, seq=15)
    cfg = lora_config(["q_proj", "o_proj", "down_proj"], r=4, tau=1.0)
    with pytest.warns(UserWarning, match="cannot run here"):
        sd = eva.get_eva_state_dict(tiny_llama, batches, cfg, show_progress_bar=False, observers=[token_spy],
                                    batch_solves=True, batched_products="upper", on_unconverged="warn")
    check_against_exact(sd, token_spy, min_overlap=0.9999)
    used = sd.metadata["run"]["backends"]["batched_products"]
    assert used.startswith("mirror (upper fell back: RuntimeError: no kernel image"), used


def test_device_small_eigh_that_fails_falls_back_to_the_host_and_says_so(tiny_llama, token_spy, monkeypatch):
    """Batched solves whose device ``eigh`` cannot run (a cuSOLVER without the batched routine):
    the run goes on with the host route, warns, and the metadata names the fallback."""
    real_eigh = torch.linalg.eigh

    def failing(a, *args, **kwargs):
        if a.dtype == torch.float32:
            raise RuntimeError("cusolver error: CUSOLVER_STATUS_NOT_SUPPORTED")
        return real_eigh(a, *args, **kwargs)
    monkeypatch.setattr(torch.linalg, "eigh", failing)
    batches = random_token_batches(tiny_llama.config.vocab_size, 3, batch=4, seq=15)
    cfg = lora_config(["q_proj", "o_proj", "down_proj"], r=4, tau=1.0)
    with pytest.warns(UserWarning, match="failed on the device"):
        sd = eva.get_eva_state_dict(tiny_llama, batches, cfg, show_progress_bar=False, observers=[token_spy],
                                    batch_solves=True, rayleigh_ritz="device")
    check_against_exact(sd, token_spy, min_overlap=0.9999)
    used = sd.metadata["run"]["backends"]["small_eigh"]
    assert used.startswith("host (device eigh fell back: RuntimeError: cusolver error"), used


def test_llama_groups_and_exact(tiny_llama, token_spy):
    batches = random_token_batches(tiny_llama.config.vocab_size, 5, batch=4, seq=15)
    cfg = lora_config(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], r=4)
    sd = eva.get_eva_state_dict(tiny_llama, batches, cfg, show_progress_bar=False, observers=[token_spy])
    check_against_exact(sd, token_spy)
    groups = {tuple(g) for g in sd.metadata["groups"]}
    assert ("layers.0.self_attn.q_proj", "layers.0.self_attn.k_proj", "layers.0.self_attn.v_proj") in groups
    assert ("layers.0.mlp.gate_proj", "layers.0.mlp.up_proj") in groups
    assert len(groups) == 2 * 4  # qkv, o, gate/up, down per layer


def test_uncentered_matches_exact(tiny_llama, token_spy):
    batches = random_token_batches(tiny_llama.config.vocab_size, 4, batch=4, seq=15, seed=3)
    cfg = lora_config(["o_proj", "down_proj"], r=3)
    sd = eva.get_eva_state_dict(tiny_llama, batches, cfg, show_progress_bar=False, centered=False,
                                observers=[token_spy])
    check_against_exact(sd, token_spy, centered=False)


def test_skipping_rest_of_forward_changes_nothing(minilm, minilm_loader):
    model, _ = minilm
    cfg = lora_config(["query", "key", "value"], r=4, tau=0.9)  # attention only: much can be skipped
    runs = [eva.get_eva_state_dict(model, minilm_loader(n_batches=5), cfg, show_progress_bar=False,
                                   skip_rest_of_forward=flag) for flag in (True, False)]
    assert runs[0].keys() == runs[1].keys()
    for name in runs[0]:
        assert runs[0].metadata["layers"][name]["tokens"] == runs[1].metadata["layers"][name]["tokens"]
        torch.testing.assert_close(runs[0][name], runs[1][name], rtol=1e-4, atol=1e-5)


def test_whiten_divides_once_per_layer(tiny_llama, token_spy):
    batches = random_token_batches(tiny_llama.config.vocab_size, 4, batch=4, seq=15)
    cfg_plain = lora_config(["q_proj", "k_proj", "v_proj"], r=3)
    cfg_white = lora_config(["q_proj", "k_proj", "v_proj"], r=3, whiten=True)
    plain = eva.get_eva_state_dict(tiny_llama, batches, cfg_plain, show_progress_bar=False)
    white = eva.get_eva_state_dict(tiny_llama, batches, cfg_white, show_progress_bar=False, observers=[token_spy])
    for name in plain:
        rank = plain[name].shape[0]
        if rank == 0:
            continue
        s, _, _ = exact_pca(token_spy[white.metadata["layers"][name]["group"]][-4:], rank)
        expected = plain[name] / s[:rank].sqrt().unsqueeze(1).float()  # PEFT: u / sqrt(sigma)
        torch.testing.assert_close(white[name], expected, rtol=2e-3, atol=1e-6)


def test_rho_one_keeps_configured_ranks(tiny_gpt2):
    batches = random_token_batches(tiny_gpt2.config.vocab_size, 3)
    cfg = lora_config(["c_attn", "c_fc"], r=5, rho=1.0)
    sd = eva.get_eva_state_dict(tiny_gpt2, batches, cfg, show_progress_bar=False)
    assert all(v.shape[0] == 5 for v in sd.values())


def test_rank_pattern_budget(tiny_gpt2):
    batches = random_token_batches(tiny_gpt2.config.vocab_size, 3)
    cfg = lora_config(["c_attn", "c_fc"], r=4, rho=2.0)
    cfg.rank_pattern = {"h.0.mlp.c_fc": 2}
    sd = eva.get_eva_state_dict(tiny_gpt2, batches, cfg, show_progress_bar=False)
    assert sum(v.shape[0] for v in sd.values()) == 4 * 3 + 2
    assert sd["h.0.mlp.c_fc"].shape[0] <= 4  # 2 * rho
    assert sd.metadata["layers"]["h.0.mlp.c_fc"]["max_components"] == 4
