"""Errors of ``initialize_lora_eva_weights`` / ``get_eva_state_dict`` on a PeftModel.

A model that is not a PeftModel, a LoRA config without ``init_lora_weights='eva'``, neither
data nor a state dict, an unknown adapter, and a corrupt ``eva_state_dict`` (wrong shape, an
extra layer, NaN) each raise a clear ``EvaError`` and leave the PeftModel unchanged: the same
weights, modules and peft_config. A failed run inside ``initialize_lora_eva_weights`` also
restores hooks / train flags (``model_state``) and re-enables the adapters; a good state dict
is written into lora_A (lora_B stays zero).
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer

import eva
from eva import EvaError
from helpers import random_token_batches
from model_state import assert_peft_unchanged, assert_restored, lora_config, peft_state, snapshot

pytestmark = pytest.mark.filterwarnings("ignore:EVA stopped:UserWarning", "ignore:lora with eva initialization")


@pytest.fixture(scope="module")
def _peft_llama(tiny_llama):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(copy.deepcopy(tiny_llama),
                              lora_config(["q_proj", "v_proj", "down_proj"], r=2))


@pytest.fixture
def peft_llama(_peft_llama):
    return copy.deepcopy(_peft_llama).train()


def llama_batches(n=2):
    return random_token_batches(97, n, batch=4, seq=15)


@pytest.fixture(scope="module")
def llama_eva_sd(_peft_llama):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return eva.get_eva_state_dict(copy.deepcopy(_peft_llama), llama_batches(3), show_progress_bar=False)


def test_initialize_requires_peft_model(tiny_llama):
    with pytest.raises(EvaError, match=r"model must be a PeftModel.*get_peft_model"):
        eva.initialize_lora_eva_weights(tiny_llama, llama_batches())


def test_initialize_requires_eva_init(tiny_llama):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(copy.deepcopy(tiny_llama), LoraConfig(r=2, target_modules=["q_proj"]))
    before = peft_state(model)
    with pytest.raises(EvaError, match=r"^`initialize_lora_eva_weights` can only be used with `init_lora_weights='eva'`.*=True"):
        eva.initialize_lora_eva_weights(model, llama_batches())
    assert_peft_unchanged(model, before)


def test_initialize_needs_data_or_state_dict(peft_llama):
    before = peft_state(peft_llama)
    with pytest.raises(EvaError, match="^dataloader is required if eva_state_dict is not provided"):
        eva.initialize_lora_eva_weights(peft_llama)
    assert_peft_unchanged(peft_llama, before)


def test_unknown_adapter(peft_llama):
    with pytest.raises(EvaError, match=r"adapter 'other' not found.*\['default'\]"):
        eva.get_eva_state_dict(peft_llama, llama_batches(), adapter_name="other", show_progress_bar=False)
    with pytest.raises(EvaError, match=r"adapter 'other' not found"):
        eva.initialize_lora_eva_weights(peft_llama, llama_batches(), adapter_name="other")


def _first_nonempty(sd):
    return next(k for k, v in sd.items() if v.shape[0] > 0)


@pytest.mark.parametrize("corruption", ["width", "one-d", "extra-key", "nan"])
def test_bad_eva_state_dict_leaves_peft_model_unchanged(peft_llama, llama_eva_sd, corruption):
    bad = dict(llama_eva_sd)
    key = _first_nonempty(bad)
    if corruption == "width":
        bad[key] = torch.randn(bad[key].shape[0], 39)
        message = rf"eva_state_dict\['{key}'\] has shape \(\d+, 39\) but layer .* needs \(rank, 40\)"
    elif corruption == "one-d":
        bad[key] = torch.randn(40)
        message = rf"eva_state_dict\['{key}'\] has shape \(40,\)"
    elif corruption == "extra-key":
        bad["base_model.model.layers.0.mlp.up_proj"] = torch.randn(2, 40)
        message = r"entries for layers without a LoRA adapter 'default': \['base_model\.model\.layers\.0\.mlp\.up_proj'\]"
    else:
        bad[key] = bad[key].clone()
        bad[key][0, 0] = float("nan")
        message = rf"eva_state_dict\['{key}'\] contains NaN/Inf"
    # the bad entry is last in iteration order for "extra-key", first otherwise: nothing may change either way
    before = peft_state(peft_llama)
    with pytest.raises(EvaError, match=message):
        eva.initialize_lora_eva_weights(peft_llama, eva_state_dict=bad)
    assert_peft_unchanged(peft_llama, before)


def test_failed_run_inside_initialize_leaves_peft_model_unchanged(peft_llama):
    before = peft_state(peft_llama)
    snap = snapshot(peft_llama)
    data = llama_batches(2)
    data[1]["attention_mask"][:] = 0
    with pytest.raises(EvaError, match="batch 1 keeps no token"):
        eva.initialize_lora_eva_weights(peft_llama, data, show_progress_bar=False)
    assert_peft_unchanged(peft_llama, before)
    assert_restored(peft_llama, snap)
    # the adapters were re-enabled after the run (disable_adapter context exited)
    tuner_layers = [m for m in peft_llama.modules() if isinstance(m, BaseTunerLayer)]
    assert tuner_layers and not any(m.disable_adapters for m in tuner_layers)


def test_initialize_with_good_state_dict(peft_llama, llama_eva_sd):
    eva.initialize_lora_eva_weights(peft_llama, eva_state_dict=llama_eva_sd)
    for name, comp in llama_eva_sd.items():
        if comp.shape[0] == 0:
            assert not hasattr(peft_llama.get_submodule(name), "lora_A")
            continue
        layer = peft_llama.get_submodule(name)
        torch.testing.assert_close(layer.lora_A["default"].weight, comp)
        assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
