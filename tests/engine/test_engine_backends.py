"""The engine end to end with each eva_kernels backend: exact PCA of the consumed tokens, and
the same answer as the torch backend.

* ``cpp``: selected with ``EVA_BACKEND=cpp`` (as a user would), skipped when the extension
  cannot run on CPU; ``auto`` on CPU also picks it for ``cov_update``.
* ``triton``: ``backend="triton"``, only under ``TRITON_INTERPRET=1`` (``make test``); the
  interpreter is slow, so that model is tiny (hidden 24, one layer, two batches).
"""
from __future__ import annotations

import os

import pytest
from peft import LoraConfig
from peft.tuners.lora.config import EvaConfig

import eva
import eva_kernels
from eva.testing import TokenRecorder, check_against_exact
from helpers import random_token_batches, tiny_llama_model

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QKVD = ["query", "key", "value", "dense"]

needs_cpp = pytest.mark.skipif("cpp" not in eva_kernels.available_backends("cpu"),
                               reason="the C++ extension cannot run on CPU here")
needs_interpreted_triton = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" or "triton" not in eva_kernels.available_backends("cpu"),
    reason="Triton on CPU needs TRITON_INTERPRET=1 set before eva_kernels is imported")



def lora_config(targets, r=4, rho=2.0, tau=0.99):
    return LoraConfig(r=r, target_modules=targets, init_lora_weights="eva", eva_config=EvaConfig(rho=rho, tau=tau))


def assert_matches(sd, ref, min_overlap=0.999):
    """Same layers, tokens, ranks and (overlap >= min_overlap) subspaces as ``ref``."""
    assert list(sd) == list(ref)
    for name in sd:
        a, b = sd.metadata["layers"][name], ref.metadata["layers"][name]
        assert (a["tokens"], a["steps"]) == (b["tokens"], b["steps"]), name
        assert sd[name].shape == ref[name].shape, name
        if sd[name].shape[0]:
            ov = float(eva_kernels.subspace_overlap(sd[name].double(), ref[name].double()))
            assert ov >= min_overlap, f"{name}: overlap {ov:.6f} with the torch backend"


def run(model, batches, cfg, **kw):
    """One run and the tokens each statistic consumed (a :class:`eva.testing.TokenRecorder`)."""
    seen = TokenRecorder()
    return eva.get_eva_state_dict(model, batches, cfg, show_progress_bar=False, observers=[seen], **kw), seen


# ---------------------------------------------------------------- cpp -----------------------------
@needs_cpp
@pytest.mark.filterwarnings("ignore:EVA stopped")
def test_cpp_env_backend_matches_exact_and_torch(tiny_llama, monkeypatch):
    batches = random_token_batches(tiny_llama.config.vocab_size, 4, batch=4, seq=15, seed=5)
    cfg = lora_config(LLAMA_TARGETS, r=4)
    monkeypatch.setenv("EVA_BACKEND", "cpp")
    sd, seen = run(tiny_llama, batches, cfg)
    assert sd.metadata["run"]["backend"] == "cpp"
    # cpp has no eigensolver products: the eigensolver took auto, and the metadata says so
    assert sd.metadata["run"]["backends"] == {"cov_update": "cpp", "topk_eigh": "torch"}
    check_against_exact(sd, seen)
    monkeypatch.delenv("EVA_BACKEND")
    assert_matches(sd, run(tiny_llama, batches, cfg, backend="torch")[0])


@needs_cpp
@pytest.mark.filterwarnings("ignore:EVA stopped")  # few batches: tau=0.99 is not reached, by design
def test_auto_backend_runs_cpp_cov_update_on_cpu(tiny_llama, monkeypatch):
    """``auto`` picks the C++ cov_update on CPU (and torch for the eigensolver steps)."""
    monkeypatch.delenv("EVA_BACKEND", raising=False)
    batches = random_token_batches(tiny_llama.config.vocab_size, 4, batch=4, seq=15, seed=5)
    cfg = lora_config(LLAMA_TARGETS, r=4)
    sd, seen = run(tiny_llama, batches, cfg)
    assert sd.metadata["run"]["backends"] == {"cov_update": "cpp", "topk_eigh": "torch"}
    assert sd.metadata["run"]["orthonormalization"] == "householder"
    assert sd.metadata["settings"]["backend"] is None
    check_against_exact(sd, seen)
    ref, seen = run(tiny_llama, batches, cfg, backend="torch")
    assert ref.metadata["run"]["backends"] == {"cov_update": "torch", "topk_eigh": "torch"}
    check_against_exact(ref, seen)
    assert_matches(sd, ref)


@needs_cpp
@pytest.mark.filterwarnings("ignore:EVA stopped")
@pytest.mark.parametrize("env", ["cpp", "auto"])
def test_minilm_cpp_backend(minilm, minilm_loader, monkeypatch, env):
    model, _ = minilm
    monkeypatch.setenv("EVA_BACKEND", env)
    sd, seen = run(model, minilm_loader(n_batches=3), lora_config(QKVD, r=4))
    assert sd.metadata["run"]["backend"] == "cpp"
    check_against_exact(sd, seen)
    assert sum(v.shape[0] for v in sd.values()) == 4 * len(sd)


# ---------------------------------------------------------------- triton (interpreter) ------------
@pytest.fixture(scope="module")
def micro_llama():
    return tiny_llama_model(hidden=24, intermediate=40, layers=1, vocab=61, positions=32)


@needs_interpreted_triton
@pytest.mark.interpreter
@pytest.mark.filterwarnings("ignore:EVA stopped")  # two batches: tau=0.99 is not reached, by design
def test_triton_backend_matches_exact_and_torch(micro_llama):
    batches = random_token_batches(micro_llama.config.vocab_size, 2, batch=3, seq=9, seed=2, pad_last=3)
    cfg = lora_config(LLAMA_TARGETS, r=3)  # 6 components + 8 oversampling < 24: the iterative path runs
    sd, seen = run(micro_llama, batches, cfg, backend="triton")
    assert sd.metadata["run"]["backends"] == {"cov_update": "triton", "topk_eigh": "triton"}
    assert sd.metadata["run"]["steps"] == 2
    check_against_exact(sd, seen)
    ref, seen = run(micro_llama, batches, cfg, backend="torch")
    check_against_exact(ref, seen)
    assert_matches(sd, ref)


@needs_interpreted_triton
@pytest.mark.interpreter
@pytest.mark.filterwarnings("ignore:EVA stopped")
def test_triton_bf16_model_takes_the_split_and_matches_exact(micro_llama):
    """A bf16 model: every statistic update is shifted 16-bit input, i.e. the bf16-split tensor-core
    path of the Triton kernel; the components still match the exact PCA of the consumed tokens."""
    import copy

    import torch
    model = copy.deepcopy(micro_llama).to(torch.bfloat16)
    batches = random_token_batches(model.config.vocab_size, 2, batch=3, seq=9, seed=4)
    sd, seen = run(model, batches, lora_config(LLAMA_TARGETS, r=3), backend="triton")
    assert sd.metadata["run"]["backend"] == "triton"
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())  # so every layer input is bf16
    check_against_exact(sd, seen, min_overlap=0.999)
