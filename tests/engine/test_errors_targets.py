"""Target layers EVA cannot use: clear errors, and the model left exactly as it was.

``target_modules`` matching nothing, a target the forward never calls, a model entirely on the
meta device, a target whose weight or input is on the meta device. Those visible before the
run are raised before the model is touched (no forward, no train()/eval(), see ``model_state``).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from eva import EvaError
from model_state import D, assert_restored, batches, lora_config, run, snapshot, untouched

pytestmark = pytest.mark.filterwarnings("ignore:EVA stopped:UserWarning", "ignore:lora with eva initialization")


def test_target_modules_matching_nothing(gpt2):
    with untouched(gpt2) as spy, \
            pytest.raises(EvaError, match=r"target_modules entry 'q_proj' \(closest: c_proj.*\) matches no layer"):
        run(gpt2, batches(2), lora_config(["q_proj"]), forward_fn=spy.forward_fn)


def test_target_never_called(gpt2):
    gpt2.h[0].unused = nn.Linear(D, 8)  # registered but never used by forward
    before = snapshot(gpt2)
    with pytest.raises(EvaError, match=r"never called.*h\.0\.unused.*remove them from target_modules"):
        run(gpt2, batches(2), lora_config(["c_attn", "unused"]))
    assert_restored(gpt2, before)


def test_model_entirely_on_meta(tiny_gpt2):
    with torch.device("meta"):
        model = type(tiny_gpt2)(tiny_gpt2.config)
    model.train()
    with untouched(model) as spy, pytest.raises(EvaError, match="all on the meta device.*load real weights"):
        run(model, batches(2), forward_fn=spy.forward_fn)


def test_target_weight_on_meta(gpt2):
    layer = gpt2.h[1].attn.c_attn
    layer.weight = nn.Parameter(torch.empty_like(layer.weight, device="meta"))
    with untouched(gpt2) as spy, \
            pytest.raises(EvaError, match=r"layer h\.1\.attn\.c_attn: its weight is on the meta device"):
        run(gpt2, batches(2), forward_fn=spy.forward_fn)


def test_target_input_on_meta(gpt2):
    def forward_fn(model, batch):  # feeds the (real) target layer a meta tensor
        return model.h[0].mlp.c_fc(torch.empty(2, 5, D, device="meta"))

    before = snapshot(gpt2)
    with pytest.raises(EvaError, match=r"layer h\.0\.mlp\.c_fc: its input is on the meta device"):
        run(gpt2, batches(2), lora_config(["h.0.mlp.c_fc"]), forward_fn=forward_fn)
    assert_restored(gpt2, before)


def test_all_linear_layers_a_model_never_calls_and_the_advice():
    """Mamba's slow path reads dt_proj's weight without calling the layer: 'all-linear' picks it up;
    the refusal says to list the layers instead, and that list runs."""
    from peft import LoraConfig
    from peft.tuners.lora.config import EvaConfig
    from transformers import MambaConfig, MambaForCausalLM
    import eva
    from helpers import random_token_batches
    torch.manual_seed(0)
    model = MambaForCausalLM(MambaConfig(hidden_size=32, num_hidden_layers=2, vocab_size=99, state_size=4,
                                         expand=2)).eval()
    data = random_token_batches(99, 2, batch=2, seq=9)

    def config(targets):
        return LoraConfig(r=2, target_modules=targets, init_lora_weights="eva", eva_config=EvaConfig(tau=1.0))

    with pytest.raises(EvaError, match=r"never called.*dt_proj.*a list of the layers to calibrate in place of "
                                       r"'all-linear'"):
        eva.get_eva_state_dict(model, data, config("all-linear"), show_progress_bar=False)
    sd = eva.get_eva_state_dict(model, data, config(["in_proj", "x_proj", "out_proj"]), show_progress_bar=False)
    assert len(sd) == 6
