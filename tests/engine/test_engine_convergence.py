"""Convergence bookkeeping: hooks detach on convergence; a rank reallocation never starves a
layer: under the allocated-ranks rule (the default without a memory budget) a layer whose rank
drops to 0 is paused (it holds nothing up) but keeps taking every batch; under the
all-components rule ranks play no part in convergence."""
from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora.config import EvaConfig

import eva
from helpers import random_token_batches, starve_layer_at_first

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def cfg(tau):
    return LoraConfig(r=3, target_modules=TARGETS, init_lora_weights="eva", eva_config=EvaConfig(rho=2.0, tau=tau))


@pytest.mark.parametrize("rule", ["auto", "allocated_ranks", "all_components"])
def test_rank_moves_never_starve_a_layer(tiny_llama, monkeypatch, token_spy, rule):
    """tau = 1.0, the loader read once: every layer consumes every batch, whatever the allocation
    does mid-run (the victim's rank is 0 at the first two checks)."""
    victim = "layers.0.self_attn.o_proj"
    starve_layer_at_first(monkeypatch, victim, allocations=2)
    batches = random_token_batches(tiny_llama.config.vocab_size, 6, batch=3, seq=11)
    sd = eva.get_eva_state_dict(tiny_llama, batches, cfg(tau=1.0), show_progress_bar=False, observers=[token_spy],
                                convergence=rule)
    kept = sum(int(b["attention_mask"].sum()) for b in batches)
    assert sd.metadata["run"]["convergence"] == ("allocated_ranks" if rule == "auto" else rule)
    for name, info in sd.metadata["layers"].items():
        assert info["steps"] == 6 and info["tokens"] == kept, name
        assert sum(r.shape[0] for r in token_spy[info["group"]]) == kept
    # the summary says, per layer, the tokens it used and how many of the batches read
    row = next(ln for ln in sd.summary().splitlines() if ln.startswith(victim))
    assert row.split()[3:5] == [str(kept), "6/6"]


def test_paused_layer_holds_nothing_up(tiny_llama, monkeypatch):
    """A layer whose rank is 0 counts as settled: with tau = 0 everything else converges at the
    second batch and the run stops there, while the paused layer was never waited for."""
    victim = "layers.0.self_attn.o_proj"
    starve_layer_at_first(monkeypatch, victim, allocations=10)
    batches = random_token_batches(tiny_llama.config.vocab_size, 6, batch=3, seq=11)
    sd = eva.get_eva_state_dict(tiny_llama, batches, cfg(tau=0.0), show_progress_bar=False)
    assert sd.metadata["run"]["stop_reason"] == "converged" and sd.metadata["run"]["steps"] == 2
    assert sd.metadata["layers"][victim]["steps"] == 2


def test_converged_groups_stop_consuming(tiny_llama):
    batches = random_token_batches(tiny_llama.config.vocab_size, 8, batch=3, seq=11)
    sd = eva.get_eva_state_dict(tiny_llama, batches, cfg(tau=0.0), show_progress_bar=False)
    # tau = 0: every group converges at its second estimate; the run stops after two batches
    assert sd.metadata["run"]["stop_reason"] == "converged"
    assert sd.metadata["run"]["steps"] == 2
    assert all(v["steps"] == 2 and v["converged"] for v in sd.metadata["layers"].values())


def test_progress_bar_runs(tiny_llama, capsys):
    batches = random_token_batches(tiny_llama.config.vocab_size, 3, batch=3, seq=11)
    sd = eva.get_eva_state_dict(tiny_llama, batches, cfg(tau=0.0), show_progress_bar=True)
    assert sum(v.shape[0] for v in sd.values()) == 3 * len(sd)
    assert "EVA" in capsys.readouterr().err
    assert torch.isfinite(torch.cat([v.flatten() for v in sd.values()])).all()
