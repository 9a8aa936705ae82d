"""A result computed on one module tree loads into any model built on the same weights.

``eva init`` calibrates ``AutoModel`` or a task model; users fine-tune a PEFT-wrapped
``AutoModelForCausalLM`` / ``...ForSequenceClassification``. Every direction is checked: each
LoRA layer's ``lora_A`` ends up equal to the entry of *its own* layer (found by walking the base
model, never by the loader's name mapping), through a saved file and in memory, for Llama
(``model.``), GPT-2 (``transformer.``) and BERT (``bert.``). A result of another model or other
widths is refused naming both models, before anything changes.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.config import EvaConfig

import eva
from eva.peft.names import ModelFrame, model_frame, transformers_base
from helpers import random_token_batches
from model_state import assert_peft_unchanged, peft_state


def _llama_config(hidden=40):
    from transformers import LlamaConfig
    return LlamaConfig(hidden_size=hidden, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=97, max_position_embeddings=64, pad_token_id=0)


def _gpt2_config(hidden=48):
    from transformers import GPT2Config
    return GPT2Config(n_embd=hidden, n_layer=2, n_head=4, n_positions=64, vocab_size=101, pad_token_id=0)


def _bert_config(hidden=32):
    from transformers import BertConfig
    return BertConfig(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                      vocab_size=103, max_position_embeddings=64)


FAMILIES = {  # config, base class, task classes, targets, vocabulary
    "llama": (_llama_config, "LlamaModel", ("LlamaForCausalLM", "LlamaForSequenceClassification"),
              ["q_proj", "v_proj", "down_proj"], 97),
    "gpt2": (_gpt2_config, "GPT2Model", ("GPT2LMHeadModel", "GPT2ForSequenceClassification"),
             ["c_attn", "c_fc"], 101),
    "bert": (_bert_config, "BertModel", ("BertForSequenceClassification", "BertForMaskedLM"),
             ["query", "value", "intermediate.dense"], 103),
}


def _build(cls_name: str, config, seed: int = 0):
    import transformers
    torch.manual_seed(seed)
    return getattr(transformers, cls_name)(copy.deepcopy(config)).eval()


def _same_weights(dst, src) -> None:
    """Copy ``src``'s base model weights into ``dst``'s (a model built on the calibrated one; BERT's
    masked-LM head model has no pooler, hence not strict)."""
    missing, _ = transformers_base(dst).load_state_dict(transformers_base(src).state_dict(), strict=False)
    assert not missing


def _compute(model, targets, vocab):
    cfg = LoraConfig(r=2, target_modules=targets, init_lora_weights="eva", eva_config=EvaConfig(tau=1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return eva.get_eva_state_dict(model, random_token_batches(vocab, 3, batch=2, seq=9), cfg,
                                       show_progress_bar=False)


def _wrap(model, targets, task_type=None):
    cfg = LoraConfig(r=2, target_modules=targets, init_lora_weights="eva", task_type=task_type)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(model, cfg)


def _by_module(model, sd) -> dict:
    """``{module: entry}`` of a result, found by walking ``model`` (the calibrated one) by identity."""
    return {id(module): sd[name] for name, module in model.named_modules() if name in sd}


def _assert_loaded(peft_model, calibrated, sd) -> int:
    """Every LoRA layer holds the entry of the calibrated layer at the same place in the base model."""
    entries = {}
    base_src, base_dst = transformers_base(calibrated), transformers_base(peft_model.get_base_model())
    src = {n: m for n, m in base_src.named_modules()}
    by_module = _by_module(calibrated, sd)
    for name, module in base_dst.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            entries[name] = by_module[id(src[name])]
    assert entries, "no LoRA layer"
    for name, w in entries.items():
        module = dict(base_dst.named_modules())[name]
        torch.testing.assert_close(module.lora_A["default"].weight.detach(), w, msg=name)
        assert not module.lora_B["default"].weight.any()
    return len(entries)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("through_file", [False, True])
def test_base_model_result_loads_into_task_models(family, through_file, tmp_path):
    make_config, base_cls, task_classes, targets, vocab = FAMILIES[family]
    config = make_config()
    base = _build(base_cls, config)
    sd = _compute(base, targets, vocab)
    assert all(not k.startswith(("model.", "transformer.", "bert.")) for k in sd)  # base-relative names
    if through_file:
        sd = eva.load_eva_state_dict(sd.save(str(tmp_path / "eva.safetensors")))
    for task_cls in task_classes:
        task = _build(task_cls, config, seed=1)
        _same_weights(task, base)
        peft_model = _wrap(task, targets)
        eva.initialize_lora_eva_weights(peft_model, eva_state_dict=sd)
        assert _assert_loaded(peft_model, base, sd) == len([k for k, v in sd.items() if v.shape[0]])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_task_model_result_loads_into_base_and_other_task_model(family, tmp_path):
    make_config, base_cls, task_classes, targets, vocab = FAMILIES[family]
    config = make_config()
    task = _build(task_classes[0], config)
    sd = eva.load_eva_state_dict(_compute(task, targets, vocab).save(str(tmp_path / "eva.safetensors")))
    frame = ModelFrame.from_metadata(sd.metadata["model"])
    assert frame == model_frame(task) and frame.base_prefix in ("model.", "transformer.", "bert.")
    for cls in (base_cls, task_classes[1]):
        other = _build(cls, config, seed=2)
        _same_weights(other, task)
        peft_model = _wrap(other, targets)
        eva.initialize_lora_eva_weights(peft_model, eva_state_dict=sd)
        _assert_loaded(peft_model, task, sd)


def test_result_of_a_peft_model_loads_into_a_peft_model_of_another_task():
    make_config, base_cls, task_classes, targets, vocab = FAMILIES["llama"]
    config = make_config()
    plain = _build("LlamaModel", config)
    causal = _build("LlamaForCausalLM", config, seed=3)
    _same_weights(causal, plain)
    first = _wrap(plain, targets)
    sd = _compute(first, targets, vocab)
    assert all(k.startswith("base_model.model.layers.") for k in sd)
    peft_model = _wrap(causal, targets, task_type="CAUSAL_LM")
    eva.initialize_lora_eva_weights(peft_model, eva_state_dict=sd)
    _assert_loaded(peft_model, first, sd)


def test_plain_dict_without_metadata_is_placed_by_its_names():
    """PEFT's own results and hand-built dicts carry no frame: base-relative names still land."""
    make_config, _, _, targets, vocab = FAMILIES["llama"]
    config = make_config()
    base = _build("LlamaModel", config)
    plain = dict(_compute(base, targets, vocab))
    task = _build("LlamaForCausalLM", config, seed=1)
    _same_weights(task, base)
    peft_model = _wrap(task, targets)
    eva.initialize_lora_eva_weights(peft_model, eva_state_dict=plain)
    _assert_loaded(peft_model, base, plain)


def test_other_model_type_is_refused_naming_both_and_nothing_changes():
    llama_sd = _compute(_build("LlamaModel", _llama_config()), ["q_proj"], 97)
    peft_model = _wrap(_build("GPT2LMHeadModel", _gpt2_config()), ["c_attn"])
    before = peft_state(peft_model)
    with pytest.raises(eva.EvaError, match=r"computed on LlamaModel \(model_type 'llama'.*this model is "
                                           r"GPT2LMHeadModel \(model_type 'gpt2'"):
        eva.initialize_lora_eva_weights(peft_model, eva_state_dict=llama_sd)
    assert_peft_unchanged(peft_model, before)


def test_other_widths_are_refused_naming_both_models():
    sd = _compute(_build("LlamaModel", _llama_config(hidden=40)), ["q_proj"], 97)
    peft_model = _wrap(_build("LlamaForCausalLM", _llama_config(hidden=48)), ["q_proj"])
    before = peft_state(peft_model)
    with pytest.raises(eva.EvaError, match=r"has shape \(\d+, 40\) but layer .*q_proj needs \(rank, 48\); it was "
                                           r"computed on LlamaModel .* and this model is LlamaForCausalLM"):
        eva.initialize_lora_eva_weights(peft_model, eva_state_dict=sd)
    assert_peft_unchanged(peft_model, before)


def test_entries_beyond_the_lora_layers_name_both_models_and_the_closest_layers():
    config = _llama_config()
    sd = _compute(_build("LlamaModel", config), ["q_proj", "v_proj"], 97)
    peft_model = _wrap(_build("LlamaForCausalLM", config), ["q_proj"])  # v_proj has no adapter
    with pytest.raises(eva.EvaError, match=r"without a LoRA adapter 'default': \['layers\.0\.self_attn\.v_proj'.*"
                                           r"computed on LlamaModel.*this model is LlamaForCausalLM.*closest LoRA "
                                           r"layers are \['base_model\.model\.model\.layers\.0\.self_attn\.q_proj'"):
        eva.initialize_lora_eva_weights(peft_model, eva_state_dict=sd)
    # the fix the message gives: the target_modules the file was computed for
    fixed = _wrap(_build("LlamaForCausalLM", config), sd.metadata["settings"]["target_modules"])
    eva.initialize_lora_eva_weights(fixed, eva_state_dict=sd)


# ------------------------------------------------------------------ target_modules typos ---
def test_a_mistyped_entry_among_good_ones_is_an_error_with_the_closest_names():
    base = _build("LlamaModel", _llama_config())
    with pytest.raises(eva.EvaError, match=r"LoraConfig.target_modules entry 'v_prj' \(closest: v_proj.*\) matches no "
                                           r"layer of the model; fix or remove it \(otherwise it is skipped silently"):
        _compute(base, ["q_proj", "v_prj"], 97)
    assert set(_compute(base, ["q_proj", "v_proj"], 97).ranks) >= {"layers.0.self_attn.v_proj"}  # the fix


def test_a_peft_model_whose_config_has_a_mistyped_entry_is_refused():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = _wrap(_build("LlamaModel", _llama_config()), ["q_proj", "v_prj"])  # PEFT accepts it
    with pytest.raises(eva.EvaError, match=r"entry 'v_prj' \(closest: v_proj"):
        eva.get_eva_state_dict(peft_model, random_token_batches(97, 2), show_progress_bar=False)


def test_seq_cls_all_linear_leaves_out_the_head_as_peft_does():
    model = _build("LlamaForSequenceClassification", _llama_config())
    cfg = LoraConfig(r=2, target_modules="all-linear", init_lora_weights="eva", task_type="SEQ_CLS",
                     eva_config=EvaConfig(tau=1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sd = eva.get_eva_state_dict(model, random_token_batches(97, 2, batch=2, seq=9), cfg, show_progress_bar=False)
        peft_model = get_peft_model(copy.deepcopy(model), copy.deepcopy(cfg))
    assert "score" not in sd and len(sd) == 14
    eva.initialize_lora_eva_weights(peft_model, eva_state_dict=sd)  # every entry has its LoRA layer
