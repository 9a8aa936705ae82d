"""Batched streaming solves (``batch_solves``; "auto" batches on GPUs): the same answer as one
solve per group, and solver calls per step that depend on the number of distinct group shapes,
not on the number of layers. Forced on here (``batch_solves=True``) to run on CPU."""
from __future__ import annotations

import pytest
from peft import LoraConfig
from peft.tuners.lora.config import EvaConfig

import eva
import eva_kernels
from eva.testing import TokenRecorder, check_against_exact
from helpers import random_token_batches, tiny_llama_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _cfg(tau=0.99):
    return LoraConfig(r=4, target_modules=TARGETS, init_lora_weights="eva", eva_config=EvaConfig(rho=2.0, tau=tau))


def _run(model, batches, **kw):
    seen = TokenRecorder()
    sd = eva.get_eva_state_dict(model, batches, _cfg(), show_progress_bar=False, observers=[seen], backend="torch",
                                **kw)
    return sd, seen


class _Calls:
    """Counts the engine solver's calls: ``topk_eigh`` (per group), ``solve_batches`` (batched,
    every width at once) and the sizes of the ``SubspaceBatch`` chunks they run."""

    def __init__(self, monkeypatch):
        self.single, self.batched, self.batch_sizes = 0, 0, []
        real_single, real_solve, real_batch = eva_kernels.topk_eigh, eva_kernels.solve_batches, eva_kernels.SubspaceBatch

        def single(*a, **k):
            self.single += 1
            return real_single(*a, **k)

        def solve(batches, *a, **k):
            self.batched += 1
            return real_solve(batches, *a, **k)

        def batch(covs, *a, **k):
            self.batch_sizes.append(len(covs))
            return real_batch(covs, *a, **k)

        monkeypatch.setattr(eva_kernels, "topk_eigh", single)
        monkeypatch.setattr(eva_kernels, "solve_batches", solve)
        monkeypatch.setattr(eva_kernels, "SubspaceBatch", batch)


@pytest.mark.filterwarnings("ignore:EVA stopped")
def test_batched_equals_per_group_solves():
    model = tiny_llama_model(layers=3)
    batches = random_token_batches(model.config.vocab_size, 5, batch=4, seq=15, seed=2)
    sd, seen = _run(model, batches, batch_solves=True)
    ref, _ = _run(model, batches, batch_solves=False)
    default, _ = _run(model, batches)  # "auto" on CPU: per group, bit for bit
    assert "topk_eigh_batched" not in default.metadata["run"]["backends"]
    assert all(default[n].equal(ref[n]) for n in ref)
    assert sd.metadata["run"]["backends"]["topk_eigh_batched"] == "torch"
    assert "topk_eigh_batched" not in ref.metadata["run"]["backends"]
    check_against_exact(sd, seen)
    for name in ref:
        a, b = sd.metadata["layers"][name], ref.metadata["layers"][name]
        assert (a["tokens"], a["steps"], a["rank"]) == (b["tokens"], b["steps"], b["rank"]), name
        if sd[name].shape[0]:
            ov = float(eva_kernels.subspace_overlap(sd[name].double(), ref[name].double()))
            assert ov >= 0.99999, f"{name}: overlap {ov}"


@pytest.mark.filterwarnings("ignore:EVA stopped")
def test_solver_calls_per_step_do_not_grow_with_layers(monkeypatch):
    """A Llama block has 4 groups of 2 widths here (q/k/v, o_proj and gate/up read width 40 =
    hidden = heads x head_dim; down_proj d_ff = 72): every step makes one batched call for every
    width together, whether the model has 2 or 4 layers, and no per-group solve (the final
    polish included)."""
    per_step = {}
    for layers in (2, 4):
        model = tiny_llama_model(layers=layers, hidden=40, intermediate=72)
        batches = random_token_batches(model.config.vocab_size, 3, batch=4, seq=15, seed=3)
        calls = _Calls(monkeypatch)
        sd = eva.get_eva_state_dict(model, batches, _cfg(tau=1.0), show_progress_bar=False, backend="torch",
                                    batch_solves=True, polish_screen_tol=None)  # the polish: one call
        steps = sd.metadata["run"]["steps"]
        per_step[layers] = (calls.batched - 1) / steps  # one call is the final polish
        assert calls.single == 0, calls.single
        assert sorted(set(calls.batch_sizes)) == [layers, 3 * layers]
    assert per_step[2] == per_step[4] == 1, per_step


def test_option_is_validated():
    model = tiny_llama_model(layers=1)
    batches = random_token_batches(model.config.vocab_size, 1, batch=2, seq=5, seed=1)
    with pytest.raises(eva.EvaError, match="batch_solves"):
        eva.get_eva_state_dict(model, batches, _cfg(), show_progress_bar=False, batch_solves="yes")
    with pytest.raises(eva.EvaError, match="solve_batch_bytes"):
        eva.get_eva_state_dict(model, batches, _cfg(), show_progress_bar=False, solve_batch_bytes=0)
