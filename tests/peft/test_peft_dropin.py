"""Drop-in compatibility with peft.tuners.lora.eva: keys, budget, loading into a PeftModel."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.config import EvaConfig
from peft.tuners.lora.eva import get_eva_state_dict as peft_get_eva_state_dict

import eva
from helpers import random_token_batches

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def cfg(r=4, rho=2.0, tau=0.99, targets=TARGETS, **eva_kwargs):
    return LoraConfig(r=r, lora_alpha=8, target_modules=targets, init_lora_weights="eva",
                      eva_config=EvaConfig(rho=rho, tau=tau, **eva_kwargs))


@pytest.fixture
def llama(tiny_llama):
    return copy.deepcopy(tiny_llama)


@pytest.fixture
def batches(tiny_llama):
    return random_token_batches(tiny_llama.config.vocab_size, 6, batch=4, seq=15)


def test_same_keys_and_shapes_as_peft(llama, batches):
    ours = eva.get_eva_state_dict(llama, batches, cfg(), show_progress_bar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft_get_eva_state_dict(llama, batches[:2] * 20, cfg(), show_progress_bar=False)
    assert sorted(ours) == sorted(theirs)
    assert sum(v.shape[0] for v in ours.values()) == sum(v.shape[0] for v in theirs.values())
    for name in ours:
        assert ours[name].shape[1] == theirs[name].shape[1]
        assert ours[name].dtype == torch.float32


def test_peft_model_input_and_names(llama, batches):
    peft_model = get_peft_model(llama, cfg())
    sd = eva.get_eva_state_dict(peft_model, batches, show_progress_bar=False)
    assert all(k.startswith("base_model.model.") for k in sd)
    assert len(sd) == 2 * len(TARGETS)
    assert sum(v.shape[0] for v in sd.values()) == 4 * len(sd)


def _output(model, batch):
    with torch.no_grad():
        return model(**batch).last_hidden_state


def test_initialize_keeps_output_and_redistributes(llama, batches):
    base_out = _output(llama, batches[0])
    peft_model = get_peft_model(llama, cfg())
    eva.initialize_lora_eva_weights(peft_model, batches, show_progress_bar=False)
    torch.testing.assert_close(_output(peft_model, batches[0]), base_out)  # B = 0: output unchanged
    conf = peft_model.peft_config["default"]
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            rank = module.lora_A["default"].weight.shape[0]
            bare = name.replace("base_model.model.", "")
            assert conf.rank_pattern.get(bare, conf.r) == rank
            assert torch.count_nonzero(module.lora_B["default"].weight) == 0
            expected_alpha = 8 * rank / 4  # adjust_scaling_factors: alpha * new_rank / r
            assert conf.alpha_pattern.get(bare, 8) == pytest.approx(expected_alpha)
            assert module.scaling["default"] == pytest.approx(expected_alpha / rank)


def test_rank_zero_layer_removed_and_state_dict_round_trip(llama, batches, tmp_path):
    sd = eva.get_eva_state_dict(llama, batches, cfg(), show_progress_bar=False)
    path = sd.save(str(tmp_path / "eva.safetensors"))
    loaded = eva.load_eva_state_dict(path)
    assert list(loaded) == list(sd) and loaded.metadata["layers"] == sd.metadata["layers"]
    for k in sd:
        assert torch.equal(loaded[k], sd[k].cpu())
    victim = "layers.1.mlp.down_proj"
    loaded[victim] = loaded[victim][:0]
    peft_model = get_peft_model(llama, cfg())
    eva.initialize_lora_eva_weights(peft_model, eva_state_dict=loaded)
    module = peft_model.get_submodule("base_model.model." + victim)
    assert isinstance(module, torch.nn.Linear) and not hasattr(module, "lora_A")
    targets = peft_model.peft_config["default"].target_modules
    assert victim not in targets and "layers.0.mlp.down_proj" in targets
    w = peft_model.get_submodule("base_model.model.layers.0.self_attn.q_proj").lora_A["default"].weight
    torch.testing.assert_close(w, loaded["layers.0.self_attn.q_proj"])


def test_plain_model_state_dict_loads_into_peft_model(llama, batches):
    sd = eva.get_eva_state_dict(llama, batches, cfg(), show_progress_bar=False)
    peft_model = get_peft_model(llama, cfg(), low_cpu_mem_usage=True)  # LoRA weights on meta
    eva.initialize_lora_eva_weights(peft_model, eva_state_dict=sd)
    for name, comp in sd.items():
        if comp.shape[0]:
            w = peft_model.get_submodule("base_model.model." + name).lora_A["default"].weight
            assert w.device.type == "cpu"
            torch.testing.assert_close(w, comp)
