"""LoRA layers EVA does not initialise (Embedding, Conv2d, ...) keep their LoRA, as in PEFT.

PEFT gives such layers the default LoRA init, keeps them in ``target_modules`` and warns with
"the following layers were initialized with init_lora_weights=True because they were not found
in the eva state_dict: ...". When ``target_modules`` matches no layer EVA can handle, PEFT returns
an empty state dict instead of raising; so do we (with a warning).
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.config import EvaConfig
from peft.tuners.lora.layer import Conv2d as LoraConv2d
from peft.tuners.lora.layer import Embedding as LoraEmbedding
from torch import nn

import eva
from helpers import random_token_batches

PEFT_WARNING = ("the following layers were initialized with init_lora_weights=True because they were not "
                "found in the eva state_dict: ")


def cfg(targets, r=3):
    return LoraConfig(r=r, lora_alpha=6, target_modules=targets, init_lora_weights="eva", eva_config=EvaConfig())


def gpt2_batches(n=4):
    return random_token_batches(101, n, batch=3, seq=17)


def peft_gpt2(tiny_gpt2, targets):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(copy.deepcopy(tiny_gpt2), cfg(targets))


def initialize(model, loader=None, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        eva.initialize_lora_eva_weights(model, loader, show_progress_bar=False, **kw)
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


def test_embedding_lora_kept_in_target_modules_with_default_init(tiny_gpt2):
    model = peft_gpt2(tiny_gpt2, ["c_attn", "wte"])
    messages = initialize(model, gpt2_batches())
    assert "wte" in model.peft_config["default"].target_modules
    wte = model.base_model.model.wte
    assert isinstance(wte, LoraEmbedding)
    # default LoRA init for embeddings: A zeros, B normal (PEFT's reset_lora_parameters(True))
    assert torch.count_nonzero(wte.lora_embedding_A["default"]) == 0
    assert torch.count_nonzero(wte.lora_embedding_B["default"]) > 0
    warned = [m for m in messages if m.startswith(PEFT_WARNING)]
    assert len(warned) == 1 and "'wte'" in warned[0] and "Embedding" in warned[0]
    c_attn = model.base_model.model.h[0].attn.c_attn
    assert torch.count_nonzero(c_attn.lora_B["default"].weight) == 0  # EVA init kept for the Conv1D layers


def test_embedding_adapter_survives_save_and_load(tiny_gpt2, tmp_path):
    model = peft_gpt2(tiny_gpt2, ["c_attn", "wte"])
    initialize(model, gpt2_batches())
    with torch.no_grad():  # "train" the embedding adapter
        model.base_model.model.wte.lora_embedding_A["default"].normal_()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(tiny_gpt2), tmp_path)
    got = loaded.base_model.model.wte
    assert isinstance(got, LoraEmbedding)
    torch.testing.assert_close(got.lora_embedding_A["default"], model.base_model.model.wte.lora_embedding_A["default"])
    ids = gpt2_batches(1)[0]
    model.eval(), loaded.eval()
    torch.testing.assert_close(loaded(**ids).last_hidden_state, model(**ids).last_hidden_state)


def test_only_unsupported_targets_warn_and_fall_back(tiny_gpt2):
    model = peft_gpt2(tiny_gpt2, ["wte"])
    calls = []
    messages = initialize(model, gpt2_batches(), forward_fn=lambda m, b: calls.append(1) or m(**b))
    assert not calls, "nothing to compute: the model must not be run"
    assert any("EVA found no layer it can initialise" in m and "'wte'" in m for m in messages)
    assert any(m.startswith(PEFT_WARNING) for m in messages)
    assert model.peft_config["default"].target_modules == ["wte"]
    assert torch.count_nonzero(model.base_model.model.wte.lora_embedding_B["default"]) > 0


def test_plain_model_with_only_unsupported_targets_returns_empty(tiny_gpt2):
    with pytest.warns(UserWarning, match=r"EVA found no layer it can initialise.*'wte'"):
        sd = eva.get_eva_state_dict(copy.deepcopy(tiny_gpt2), gpt2_batches(), cfg(["wte"]), show_progress_bar=False)
    assert dict(sd) == {} and sd.metadata["run"]["unsupported_layers"] == ["wte"]


def test_target_modules_matching_nothing_still_raises(tiny_gpt2):
    with pytest.raises(eva.EvaError, match=r"LoraConfig.target_modules entry 'q_proj' \(closest: c_proj, .*\) "
                                           r"matches no layer of the model; fix or remove it; an entry") as info:
        eva.get_eva_state_dict(copy.deepcopy(tiny_gpt2), gpt2_batches(), cfg(["q_proj"]), show_progress_bar=False)
    assert "silently" not in str(info.value)  # nothing matched, so nothing would have run silently


class ConvNet(nn.Module):
    """Conv2d -> Linear: LoRA on both; EVA handles the Linear only."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.head = nn.Linear(6 * 6 * 6, 10)

    def forward(self, pixels):
        return self.head(torch.relu(self.conv(pixels)).flatten(1))


def test_conv2d_lora_kept_with_default_init():
    torch.manual_seed(0)
    config = cfg(["conv", "head"], r=2)
    # PEFT 0.21 cannot create a LoRA Conv2d with init_lora_weights="eva" (its reset raises), so the
    # adapter is created with the default init and switched to "eva" afterwards.
    config.init_lora_weights = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(ConvNet(), config)
    model.peft_config["default"].init_lora_weights = "eva"
    with torch.no_grad():
        model.base_model.model.conv.lora_B["default"].weight.fill_(1.0)  # the default init must reset it
    loader = [{"pixels": torch.randn(16, 3, 8, 8)} for _ in range(3)]
    messages = initialize(model, loader, forward_fn=lambda m, b: m(b["pixels"]), prepare_model_inputs_fn=None)
    conv = model.base_model.model.conv
    assert isinstance(conv, LoraConv2d)
    assert sorted(model.peft_config["default"].target_modules) == ["conv", "head"]
    assert torch.count_nonzero(conv.lora_B["default"].weight) == 0  # default init: B = 0, A random
    assert torch.count_nonzero(conv.lora_A["default"].weight) > 0
    warned = [m for m in messages if m.startswith(PEFT_WARNING)]
    assert len(warned) == 1 and "'conv'" in warned[0] and "Conv2d" in warned[0]


def test_state_dict_entry_for_an_embedding_is_refused(tiny_gpt2):
    model = peft_gpt2(tiny_gpt2, ["c_attn", "wte"])
    sd = {"base_model.model.wte": torch.zeros(2, 48)}
    with pytest.raises(eva.EvaError, match=r"layer base_model\.model\.wte is a LoRA Embedding.*does not initialise"):
        eva.initialize_lora_eva_weights(model, eva_state_dict=sd)
