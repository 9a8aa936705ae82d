"""Models dispatched with accelerate (device_map with CPU and disk offload, cpu_offload,
disk_offload): hooks see the real activations on the execution device, the weights that
accelerate keeps on ``meta`` between forwards stay there, and the result equals the undispatched
model's: same tokens, steps and ranks, components equal to fp32 rounding (BLAS summation order
may differ between two runs of the same model, dispatched or not)."""
from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora.config import EvaConfig

import eva
from helpers import random_token_batches, tiny_llama_model

accelerate = pytest.importorskip("accelerate")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def reference():
    model = tiny_llama_model(layers=4)
    batches = random_token_batches(model.config.vocab_size, 4, batch=4, seq=15, seed=3)
    cfg = LoraConfig(r=4, target_modules=TARGETS, init_lora_weights="eva", eva_config=EvaConfig(rho=2.0, tau=0.99))
    with pytest.warns(UserWarning, match="EVA stopped"):
        sd = eva.get_eva_state_dict(model, batches, cfg, show_progress_bar=False)
    return model, batches, cfg, sd


def _dispatch(model, how, folder):
    from accelerate import dispatch_model
    from accelerate.big_modeling import cpu_offload, disk_offload
    cpu = torch.device("cpu")
    if how == "device_map":  # blocks 1 and 3 on disk, the rest on the CPU
        device_map = {"embed_tokens": "cpu", "layers.0": "cpu", "layers.1": "disk", "layers.2": "cpu",
                      "layers.3": "disk", "norm": "cpu", "rotary_emb": "cpu"}
        return dispatch_model(model, device_map=device_map, offload_dir=str(folder))
    if how == "cpu_offload":
        return cpu_offload(model, execution_device=cpu)
    return disk_offload(model, offload_dir=str(folder), execution_device=cpu)


@pytest.mark.parametrize("how", ["device_map", "cpu_offload", "disk_offload"])
@pytest.mark.filterwarnings("ignore:EVA stopped")
def test_offloaded_model_gives_the_same_result(reference, how, tmp_path):
    model, batches, cfg, ref = reference
    dispatched = _dispatch(copy.deepcopy(model), how, tmp_path)
    meta_before = [n for n, p in dispatched.named_parameters() if p.device.type == "meta"]
    assert meta_before, "the dispatch offloads some weights (they sit on meta between forwards)"
    sd = eva.get_eva_state_dict(dispatched, batches, cfg, show_progress_bar=False)
    assert [n for n, p in dispatched.named_parameters() if p.device.type == "meta"] == meta_before
    assert set(sd) == set(ref)
    for name in ref:
        a, b = sd.metadata["layers"][name], ref.metadata["layers"][name]
        assert (a["tokens"], a["steps"], a["rank"]) == (b["tokens"], b["steps"], b["rank"]), name
        torch.testing.assert_close(sd[name], ref[name], rtol=1e-4, atol=1e-5, msg=name)


def test_meta_weights_without_offload_still_raise(reference):
    model, batches, cfg, _ = reference
    broken = copy.deepcopy(model)
    broken.layers[0].self_attn.q_proj.to("meta")
    with pytest.raises(eva.EvaError, match=r"layers\.0\.self_attn\.q_proj.*meta device.*accelerate"):
        eva.get_eva_state_dict(broken, batches, cfg, show_progress_bar=False)


@pytest.mark.filterwarnings("ignore:EVA stopped")
def test_peft_wrapped_after_dispatch_says_so_and_the_advice_works(reference, tmp_path):
    """get_peft_model on a dispatched model leaves the offloaded layers' weights on meta with no
    hook to load them: the refusal says so, and its advice (EVA on the dispatched model, then
    loading the result into a PEFT model with real weights) gives the undispatched result."""
    from peft import get_peft_model
    model, batches, cfg, ref = reference
    dispatched = _dispatch(copy.deepcopy(model), "device_map", tmp_path)
    wrapped = get_peft_model(dispatched, copy.deepcopy(cfg))
    with pytest.raises(eva.EvaError, match=r"no accelerate hook loads it any more: the model was dispatched with "
                                           r"accelerate.*wrapped by get_peft_model.*eva\.get_eva_state_dict\(model, "
                                           r"dataloader, lora_config\)"):
        eva.initialize_lora_eva_weights(wrapped, batches, show_progress_bar=False)
    # the advice, followed
    sd = eva.get_eva_state_dict(_dispatch(copy.deepcopy(model), "device_map", tmp_path / "again"), batches,
                                copy.deepcopy(cfg), show_progress_bar=False)
    peft_model = get_peft_model(copy.deepcopy(model), copy.deepcopy(cfg))
    eva.initialize_lora_eva_weights(peft_model, eva_state_dict=sd)
    name = "layers.1.self_attn.q_proj"
    lora_a = peft_model.base_model.model.layers[1].self_attn.q_proj.lora_A["default"].weight
    torch.testing.assert_close(lora_a, ref[name][: lora_a.shape[0]], rtol=1e-4, atol=1e-5)
