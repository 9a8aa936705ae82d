"""``eva.patch_peft()``: code written against PEFT's EVA runs ours, unchanged (issue 23).

PEFT's wheel does not ship its tests, so these are our own versions of the cases PEFT's EVA
test suite checks (consistency across data orders, a mapping of layer-input functions,
``adjust_scaling_factors``, loading a state dict with a rank-0 layer and saving / reloading the
model, the warning for layers missing from the state dict, label masks, an empty loader), written
against PEFT's public API. Each runs twice: on PEFT itself and patched; both must pass. PEFT's
functions are looked up at call time (``peft.get_eva_state_dict`` or a ``from peft import``
inside the test), as user code written after the patch does.
"""
from __future__ import annotations

import copy
import inspect
import itertools
import warnings

import pytest
import torch

import eva
from eva.peft import patch as patch_module
from helpers import random_token_batches

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from peft.tuners.lora.config import EvaConfig  # noqa: E402

NAMES = tuple(patch_module.OURS)


@pytest.fixture(params=["peft", "patched"])
def mode(request):
    """Run the test on PEFT's own EVA, then with PEFT patched (restored afterwards)."""
    if request.param == "patched":
        with eva.patched_peft() as ok:
            assert ok and patch_module.is_patched()
            yield request.param
        assert not patch_module.is_patched()
    else:
        yield request.param


@pytest.fixture(scope="module")
def gpt2_lm():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=48, n_layer=2, n_head=4, n_positions=64, vocab_size=101)
    return GPT2LMHeadModel(cfg).eval()


def _config(**eva_kwargs):
    return LoraConfig(r=4, lora_alpha=1, target_modules=["c_attn"], init_lora_weights="eva",
                      eva_config=EvaConfig(**{"rho": 2.0, "tau": 0.9, **eva_kwargs}))


def _batches(n=6, seed=0):
    return random_token_batches(101, n, batch=4, seq=16, seed=seed)


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def test_patch_replaces_every_name_and_unpatch_restores_the_very_objects():
    import peft.tuners as tuners
    import peft.tuners.lora as lora
    import peft.tuners.lora.eva as peft_eva
    before = {(m.__name__, n): vars(m)[n] for m in (peft, tuners, lora, peft_eva) for n in NAMES if n in vars(m)}
    assert {n for _, n in before} == set(NAMES) and len(before) >= 2 * len(NAMES)
    try:
        assert eva.patch_peft() and eva.patch_peft()  # twice: harmless
        from peft import get_eva_state_dict, initialize_lora_eva_weights
        assert get_eva_state_dict is eva.get_eva_state_dict and peft_eva.initialize_lora_eva_weights is \
            initialize_lora_eva_weights is eva.initialize_lora_eva_weights
        assert peft_eva.prepare_layer_inputs_fn_language_modeling is eva.prepare_layer_inputs_fn_language_modeling
        assert patch_module.original("get_eva_state_dict") is before[("peft.tuners.lora.eva", "get_eva_state_dict")]
    finally:
        eva.unpatch_peft()
    eva.unpatch_peft()  # twice: harmless
    after = {(m.__name__, n): vars(m)[n] for m in (peft, tuners, lora, peft_eva) for n in NAMES if n in vars(m)}
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)


def test_unknown_peft_api_warns_and_leaves_peft_unpatched(monkeypatch):
    import peft.tuners.lora.eva as peft_eva

    def changed(model, dataloader, peft_config=None, *, new_option=1):  # a signature we do not know
        return {}
    monkeypatch.setattr(peft_eva, "get_eva_state_dict", changed)
    with pytest.warns(UserWarning, match=rf"PEFT {peft.__version__}'s EVA functions are not the ones"):
        assert eva.patch_peft() is False
    assert not patch_module.is_patched() and peft_eva.get_eva_state_dict is changed
    with pytest.warns(UserWarning), eva.patched_peft() as ok:
        assert ok is False


def test_the_context_manager_restores_on_error():
    original = peft.get_eva_state_dict
    with pytest.raises(RuntimeError, match="boom"):
        with eva.patched_peft():
            assert peft.get_eva_state_dict is eva.get_eva_state_dict
            raise RuntimeError("boom")
    assert peft.get_eva_state_dict is original


def test_signatures_match_ours():
    """Our functions accept every parameter of PEFT's, by the same names."""
    for name, params in patch_module.KNOWN_PARAMETERS.items():
        ours = inspect.signature(getattr(eva, name)).parameters
        assert all(p in ours for p in params), name


# ------------------------------------------------- PEFT's EVA cases, on PEFT and patched ------------
def test_components_agree_across_data_orders(mode, gpt2_lm):
    from peft import get_eva_state_dict
    data = _batches(8)
    sds = [_quiet(get_eva_state_dict, copy.deepcopy(gpt2_lm), order, _config(), show_progress_bar=False)
           for order in (data, data[::-1])]
    for name in sds[0]:
        a, b = sds[0][name], sds[1][name]
        k = min(a.shape[0], b.shape[0])
        cos = torch.nn.functional.cosine_similarity(a[:k].abs(), b[:k].abs(), dim=1).abs().mean()
        assert cos > 0.75, (mode, name, float(cos))


@pytest.mark.parametrize("keys,ok", [(None, True), (["transformer.h.0.attn.c_attn"], True),
                                     (["transformer.h.0.attn.c_attn", "transformer.h.9.attn.c_attn"], False)],
                         ids=["function", "subset", "unknown-name"])
def test_layer_input_functions_as_a_mapping(mode, gpt2_lm, keys, ok):
    def rows(layer_input, *args):
        return layer_input[0].reshape(-1, layer_input[0].shape[-1])
    fn = rows if keys is None else {k: rows for k in keys}
    cfg = _config(tau=0.0)  # converge at once
    model = copy.deepcopy(gpt2_lm)  # PEFT leaves its hooks on a model when it raises: never the shared one
    call = lambda: peft.get_eva_state_dict(model, _batches(3), cfg, prepare_model_inputs_fn=None,  # noqa: E731
                                           prepare_layer_inputs_fn=fn, show_progress_bar=False)
    if ok:
        sd = _quiet(call)
        assert set(sd) == {"transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"}
    else:
        with pytest.raises(ValueError, match="prepare_layer_inputs_fn is a mapping but the following module names"):
            call()


def test_adjust_scaling_factors_keeps_the_scales(mode, gpt2_lm):
    model = get_peft_model(copy.deepcopy(gpt2_lm), _config(adjust_scaling_factors=True))
    before = {n: m.scaling["default"] for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    _quiet(peft.initialize_lora_eva_weights, model, _batches(4), show_progress_bar=False)
    after = {n: m.scaling["default"] for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert after == before


@pytest.mark.parametrize("rank_zero", [True, False], ids=["rank0-layer", "all-ranks"])
def test_state_dict_with_a_rank_zero_layer_loads_saves_and_reloads(mode, gpt2_lm, tmp_path, rank_zero):
    from peft import get_eva_state_dict, initialize_lora_eva_weights
    model = get_peft_model(copy.deepcopy(gpt2_lm), _config())
    sd = _quiet(get_eva_state_dict, model, _batches(4), show_progress_bar=False)
    key = next(k for k in sd if "h.0." in k)
    if rank_zero:
        sd[key] = sd[key][:0]
    _quiet(initialize_lora_eva_weights, model, eva_state_dict=sd, show_progress_bar=False)
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    assert isinstance(layer, LoraLayer) is (not rank_zero)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(gpt2_lm), tmp_path, low_cpu_mem_usage=True)
    batch = _batches(1)[0]
    model.eval(), reloaded.eval()  # get_peft_model returns a model in train mode (dropout)
    torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits)


def test_layers_missing_from_the_state_dict_warn(mode, gpt2_lm):
    cfg = _config()
    cfg.target_modules = ["wte"]  # an embedding: EVA leaves it to the default init
    model = get_peft_model(copy.deepcopy(gpt2_lm), cfg)
    with pytest.warns(UserWarning, match="initialized with init_lora_weights=True because they were not found"):
        peft.initialize_lora_eva_weights(model, _batches(3), show_progress_bar=False)


@pytest.mark.parametrize("use_label_mask", [True, False])
def test_label_mask(mode, gpt2_lm, use_label_mask):
    data = _batches(5)
    for b in data:
        b["labels"] = torch.where(b["attention_mask"].bool(), torch.ones_like(b["input_ids"]), -100)
    sd = _quiet(peft.get_eva_state_dict, copy.deepcopy(gpt2_lm), data, _config(use_label_mask=use_label_mask),
                show_progress_bar=False)
    assert len(sd) > 0


def test_a_failed_run_leaves_no_hook_behind(gpt2_lm):
    """Where the two differ: PEFT 0.21 leaves its hooks on the model when a run raises (the next
    run on that model then fails with "Found active hooks added by EVA"); ours removes them."""
    def rows(layer_input, *args):
        return layer_input[0].reshape(-1, layer_input[0].shape[-1])
    bad = {"transformer.h.9.attn.c_attn": rows}
    for patched in (False, True):
        model = copy.deepcopy(gpt2_lm)
        with eva.patched_peft() if patched else warnings.catch_warnings():
            with pytest.raises(ValueError):
                peft.get_eva_state_dict(model, _batches(2), _config(), prepare_layer_inputs_fn=bad,
                                        show_progress_bar=False)
        hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
        assert (hooks == 0) is patched, (patched, hooks)


def test_module_modes_are_kept(gpt2_lm):
    """Where the two differ: PEFT 0.21's initialize_lora_eva_weights restores the train mode with a
    recursive ``model.train()``, switching the base model's eval-mode modules (dropout) to train;
    patched, every module keeps its own mode."""
    changed = {}
    for patched in (False, True):
        model = get_peft_model(copy.deepcopy(gpt2_lm), _config())
        before = [m.training for m in model.modules()]
        with eva.patched_peft() if patched else warnings.catch_warnings():
            _quiet(peft.initialize_lora_eva_weights, model, _batches(4), show_progress_bar=False)
        changed[patched] = sum(a != m.training for a, m in zip(before, model.modules()))
    assert changed[True] == 0 and changed[False] > 0, changed


def test_empty_loader_is_refused(mode, gpt2_lm):
    with pytest.raises(ValueError, match="dataloader is empty"):
        peft.get_eva_state_dict(copy.deepcopy(gpt2_lm), [], _config(), show_progress_bar=False)


def test_patched_runs_are_ours(gpt2_lm):
    """Patched, PEFT's names return our result type (with metadata); unpatched, PEFT's dict."""
    data = _batches(4)
    plain = _quiet(peft.get_eva_state_dict, copy.deepcopy(gpt2_lm), data, _config(), show_progress_bar=False)
    with eva.patched_peft():
        ours = _quiet(peft.get_eva_state_dict, copy.deepcopy(gpt2_lm), data, _config(), show_progress_bar=False)
    assert not hasattr(plain, "metadata") and hasattr(ours, "metadata")
    assert set(plain) == set(ours)
    for a, b in itertools.product([plain], [ours]):
        assert all(a[k].shape[1] == b[k].shape[1] for k in a)
