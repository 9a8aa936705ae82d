"""``check_every``: solves, reallocations and convergence tests every k-th batch only; the
statistics still take every batch, so the components stay the exact PCA of the tokens consumed."""
from __future__ import annotations

import pytest
from peft import LoraConfig
from peft.tuners.lora.config import EvaConfig

import eva
from eva.testing import TokenRecorder, check_against_exact
from helpers import random_token_batches

pytestmark = pytest.mark.filterwarnings("ignore:EVA stopped")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _run(model, n_batches, check_every, tau=1.0):
    seen = TokenRecorder()
    cfg = LoraConfig(r=3, target_modules=TARGETS, init_lora_weights="eva", eva_config=EvaConfig(rho=2.0, tau=tau))
    sd = eva.get_eva_state_dict(model, random_token_batches(model.config.vocab_size, n_batches, batch=3, seq=13),
                                cfg, show_progress_bar=False, observers=[seen], check_every=check_every)
    return sd, seen


@pytest.mark.parametrize("check_every,solves", [(1, 7), (3, 2), (10, 0)])
def test_every_batch_is_consumed_and_solved_every_k(tiny_llama, check_every, solves):
    sd, seen = _run(tiny_llama, 7, check_every)  # tau = 1: nothing converges, every batch is used
    assert sd.metadata["settings"]["check_every"] == check_every
    for info in sd.metadata["layers"].values():
        assert (info["steps"], info["solves"], info["converged"]) == (7, solves, False)
    check_against_exact(sd, seen)


def test_convergence_is_decided_at_checks_only(tiny_llama):
    sd, seen = _run(tiny_llama, 8, 2, tau=0.0)  # tau = 0: converged at the first check with two estimates
    run = sd.metadata["run"]
    assert run["stop_reason"] == "converged" and run["steps"] == 4
    assert all(info["solves"] == 2 and info["converged"] for info in sd.metadata["layers"].values())
    check_against_exact(sd, seen)


def test_check_every_must_be_positive(tiny_llama):
    cfg = LoraConfig(r=3, target_modules=TARGETS, init_lora_weights="eva", eva_config=EvaConfig())
    with pytest.raises(eva.EvaError, match="check_every"):
        eva.get_eva_state_dict(tiny_llama, random_token_batches(97, 2), cfg, check_every=0)
