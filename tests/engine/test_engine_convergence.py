"""Convergence bookkeeping: hooks detach on convergence; under the default rule a rank
reallocation never pauses a layer; under PEFT's rule (``convergence="allocated_ranks"``) a
layer whose rank drops to 0 is detached and re-attached when its rank grows."""
from __future__ import annotations

import torch
from peft import LoraConfig
from peft.tuners.lora.config import EvaConfig

import eva
from helpers import random_token_batches, starve_layer_at_first

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def cfg(tau):
    return LoraConfig(r=3, target_modules=TARGETS, init_lora_weights="eva", eva_config=EvaConfig(rho=2.0, tau=tau))


def test_rank_moves_never_pause_a_layer_by_default(tiny_llama, monkeypatch, token_spy):
    """tau = 1.0, the loader read once: every layer consumes every batch, whatever the allocation
    does mid-run (the victim's rank is 0 at the first two checks)."""
    victim = "layers.0.self_attn.o_proj"
    starve_layer_at_first(monkeypatch, victim, allocations=2)
    batches = random_token_batches(tiny_llama.config.vocab_size, 6, batch=3, seq=11)
    sd = eva.get_eva_state_dict(tiny_llama, batches, cfg(tau=1.0), show_progress_bar=False, observers=[token_spy])
    kept = sum(int(b["attention_mask"].sum()) for b in batches)
    assert sd.metadata["settings"]["convergence"] == "all_components"
    for name, info in sd.metadata["layers"].items():
        assert info["steps"] == 6 and info["tokens"] == kept, name
        assert sum(r.shape[0] for r in token_spy[info["group"]]) == kept
    # the summary says, per layer, the tokens it used and how many of the batches read
    row = next(ln for ln in sd.summary().splitlines() if ln.startswith(victim))
    assert row.split()[3:5] == [str(kept), "6/6"]


def test_group_reattached_when_its_rank_grows(tiny_llama, monkeypatch, token_spy):
    victim = "layers.0.self_attn.o_proj"
    # PEFT's rule: after batches 0 and 1 the victim needs nothing: converged, hook detached
    starve_layer_at_first(monkeypatch, victim, allocations=2)
    batches = random_token_batches(tiny_llama.config.vocab_size, 6, batch=3, seq=11)
    sd = eva.get_eva_state_dict(tiny_llama, batches, cfg(tau=1.0), show_progress_bar=False, observers=[token_spy],
                                convergence="allocated_ranks")
    info = sd.metadata["layers"]
    assert sd.metadata["run"]["steps"] == 6
    assert info["layers.0.self_attn.q_proj"]["steps"] == 6
    # batch 0 (first forward), then detached for batches 1 and 2, re-attached for 3, 4, 5
    assert info[victim]["steps"] == 4
    kept = [int(b["attention_mask"].sum()) for b in batches]
    assert info[victim]["tokens"] == kept[0] + sum(kept[3:])
    assert sum(r.shape[0] for r in token_spy[victim]) == info[victim]["tokens"]


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
