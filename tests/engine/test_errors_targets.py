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
            pytest.raises(EvaError, match=r"no target layers found for target_modules=.*q_proj"):
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
