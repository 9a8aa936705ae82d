"""Code written against ``peft.tuners.lora.eva`` keeps working: same exception types, messages that
start with PEFT's own words (taken live from PEFT here, not copied), and PEFT's token rule for
layers without a ``prepare_layer_inputs_fn``."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import eva as peft_eva
from peft.tuners.lora.config import EvaConfig

import eva
from helpers import random_token_batches
from eva_kernels.testing import exact_pca
from eva_kernels import subspace_overlap

TARGETS = ["q_proj", "v_proj"]


def cfg(r=2, targets=TARGETS, **eva_kwargs):
    return LoraConfig(r=r, target_modules=targets, init_lora_weights="eva", eva_config=EvaConfig(**eva_kwargs))


def batches(n=3):
    return random_token_batches(97, n, batch=3, seq=13)


def raised(fn, *args, **kwargs) -> BaseException:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the exception is the result
            return exc
    raise AssertionError(f"{getattr(fn, '__name__', fn)} raised nothing")


def assert_same_start(ours: BaseException, peft: BaseException, upto: str = None) -> None:
    """Same exception family, and our message starts with PEFT's (up to ``upto`` if given)."""
    expected = str(peft) if upto is None else str(peft).split(upto)[0] + upto
    assert isinstance(ours, type(peft)), f"ours is {type(ours).__name__}, PEFT raises {type(peft).__name__}"
    assert str(ours).startswith(expected), f"\nours: {ours}\npeft: {expected}"
    assert isinstance(ours, eva.EvaError)


@pytest.fixture
def llama(tiny_llama):
    return copy.deepcopy(tiny_llama)


def _peft_model(model, config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(model, config)


def test_empty_dataloader(llama):
    assert_same_start(raised(eva.get_eva_state_dict, llama, [], cfg(), show_progress_bar=False),
                      raised(peft_eva.get_eva_state_dict, llama, [], cfg(), show_progress_bar=False))


def test_peft_config_required(llama):
    assert_same_start(raised(eva.get_eva_state_dict, llama, batches()),
                      raised(peft_eva.get_eva_state_dict, llama, batches()))


def test_mapping_with_unknown_module_names(llama):
    fns = {"layers.0.self_attn.q_prj": lambda x, m, n: x[0].reshape(-1, 40)}
    ours = raised(eva.get_eva_state_dict, llama, batches(), cfg(), prepare_layer_inputs_fn=dict(fns),
                  show_progress_bar=False)
    peft = raised(peft_eva.get_eva_state_dict, llama, batches(), cfg(), prepare_layer_inputs_fn=dict(fns),
                  show_progress_bar=False)
    assert str(ours).startswith(
        "prepare_layer_inputs_fn is a mapping but the following module names were not found")
    assert_same_start(ours, peft, upto="not found in the model: ")
    assert "layers.0.self_attn.q_prj" in str(ours)


def test_non_dict_batches_with_language_modeling_inputs(llama):
    data = [b["input_ids"] for b in batches()]
    fwd = lambda m, x: m(input_ids=x)  # noqa: E731
    assert_same_start(raised(eva.get_eva_state_dict, llama, data, cfg(), forward_fn=fwd, show_progress_bar=False),
                      raised(peft_eva.get_eva_state_dict, llama, data, cfg(), forward_fn=fwd,
                             show_progress_bar=False))


def test_unsupported_layer_input_type():
    layer_input, mask = {"hidden": torch.zeros(2, 3)}, torch.ones(1, 2, dtype=torch.bool)
    assert_same_start(
        raised(eva.prepare_layer_inputs_fn_language_modeling, layer_input, mask, "some.layer"),
        raised(peft_eva.prepare_layer_inputs_fn_language_modeling, layer_input, mask.nonzero(), "some.layer"))


@pytest.mark.parametrize("field, value", [("rho", 0.5), ("tau", 1.5)])
def test_eva_config_values(llama, field, value):
    config = cfg()
    setattr(config.eva_config, field, value)  # bypass EvaConfig's own check, as a loaded config can
    peft = raised(EvaConfig, **{field: value})
    assert_same_start(raised(eva.get_eva_state_dict, llama, batches(), config, show_progress_bar=False), peft)


def test_initialize_needs_peft_model(llama):
    assert_same_start(raised(eva.initialize_lora_eva_weights, llama, batches()),
                      raised(peft_eva.initialize_lora_eva_weights, llama, batches()))


def test_initialize_needs_eva_init(llama):
    config = cfg()
    config.init_lora_weights = True
    model = _peft_model(llama, config)
    assert_same_start(raised(eva.initialize_lora_eva_weights, model, batches()),
                      raised(peft_eva.initialize_lora_eva_weights, model, batches()))


def test_initialize_needs_data(llama):
    model = _peft_model(llama, cfg())
    assert_same_start(raised(eva.initialize_lora_eva_weights, model),
                      raised(peft_eva.initialize_lora_eva_weights, model))


def test_initialize_single_active_adapter(llama):
    model = _peft_model(llama, cfg())
    model.add_adapter("other", cfg())
    model.base_model.set_adapter(["default", "other"])
    assert_same_start(raised(eva.initialize_lora_eva_weights, model, batches()),
                      raised(peft_eva.initialize_lora_eva_weights, model, batches()))


def test_missing_layers_warning_starts_like_peft(llama):
    """Both libraries warn for LoRA layers without an entry; the text up to the names is PEFT's."""
    model = _peft_model(llama, cfg())
    sd = eva.get_eva_state_dict(copy.deepcopy(model), batches(), show_progress_bar=False)
    sd.pop("base_model.model.layers.1.self_attn.v_proj")

    def warning_of(fn, target):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn(target, eva_state_dict=dict(sd))
        return [str(w.message) for w in caught if "init_lora_weights=True" in str(w.message)]

    ours, peft = warning_of(eva.initialize_lora_eva_weights, copy.deepcopy(model)), \
        warning_of(peft_eva.initialize_lora_eva_weights, copy.deepcopy(model))
    head = peft[0].split("[")[0]
    assert len(ours) == 1 and ours[0].startswith(head) and "'layers.1.self_attn.v_proj'" in ours[0]


# ---------------------------------------------------- layers without a prepare function ---------
def _rows_seen(llama, layer_fns, data):
    """Exact PCA check: components of q_proj in layer 0 equal the PCA of the given rows."""
    seen = {}

    def capture(module, args):
        seen.setdefault("x", []).append(args[0].detach().reshape(-1, args[0].shape[-1]))

    handle = llama.layers[0].self_attn.q_proj.register_forward_pre_hook(capture)
    try:
        sd = eva.get_eva_state_dict(llama, data, cfg(tau=1.0), prepare_layer_inputs_fn=layer_fns,
                                    show_progress_bar=False, on_unconverged="warn")
    finally:
        handle.remove()
    return sd, torch.cat(seen["x"])


@pytest.mark.parametrize("layer_fns", [None, {"layers.1.self_attn.q_proj": eva.prepare_layer_inputs_fn_language_modeling}],
                         ids=["none", "mapping-without-the-layer"])
def test_no_layer_fn_uses_every_token_like_peft(llama, layer_fns):
    data = batches(3)  # the last sequence of each batch ends in 4 padding positions
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        sd, rows = _rows_seen(llama, layer_fns, data)
    info = sd.metadata["layers"]["layers.0.self_attn.q_proj"]
    positions = sum(b["input_ids"].numel() for b in data)
    assert info["tokens"] == positions  # padding included, as PEFT's default hook does
    k = info["rank"]
    _, exact, _ = exact_pca([rows], k)
    assert subspace_overlap(sd["layers.0.self_attn.q_proj"].double(), exact) > 0.9999
    if isinstance(layer_fns, dict):  # the mapped layer keeps the masked default
        kept = sum(int(b["attention_mask"].sum()) for b in data)
        assert sd.metadata["layers"]["layers.1.self_attn.q_proj"]["tokens"] == kept


def test_mapping_accepts_base_model_names_on_a_peft_model(llama):
    model = _peft_model(llama, cfg())
    called = []

    def fn(layer_input, model_input, name):
        called.append(name)
        return layer_input[0].reshape(-1, 40)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        eva.get_eva_state_dict(model, batches(2), prepare_layer_inputs_fn={"layers.0.self_attn.q_proj": fn},
                               show_progress_bar=False)
    assert called and set(called) == {"base_model.model.layers.0.self_attn.q_proj"}
