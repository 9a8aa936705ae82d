"""The engine tracks the bytes of its live statistics: the run's peak is in the metadata and
equals what the statistics of every shared-input group hold (d^2 + 2d fp32 and one int64)."""
from __future__ import annotations

import pytest
from peft import LoraConfig
from peft.tuners.lora.config import EvaConfig

import eva
from helpers import random_token_batches, tiny_llama_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.filterwarnings("ignore:EVA stopped")
@pytest.mark.parametrize("centered", [True, False], ids=["centred", "uncentred"])
def test_peak_statistics_bytes(centered):
    model = tiny_llama_model(layers=2, hidden=40, intermediate=72)
    batches = random_token_batches(model.config.vocab_size, 2, batch=2, seq=7, seed=1)
    cfg = LoraConfig(r=2, target_modules=TARGETS, init_lora_weights="eva", eva_config=EvaConfig(rho=1.0))
    sd = eva.get_eva_state_dict(model, batches, cfg, show_progress_bar=False, centered=centered)
    # per layer: q/k/v (40), o (40), gate/up (40), down (72); shift (d fp32) only when centred
    widths = [40, 40, 40, 72] * 2
    per = [4 * d * d + 4 * d + 8 + (4 * d if centered else 0) for d in widths]
    assert sd.metadata["run"]["peak_statistics_bytes"] == sum(per)
