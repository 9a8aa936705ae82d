"""``eva.corda.preprocess_corda``: PEFT's CorDA on our statistics (issue 23).

The adapters a PEFT model gets from our preprocessing equal those from PEFT's own
``preprocess_corda`` on the same model and data (tiny Llama with all seven projections, and the
bundled MiniLM); q/k/v and gate/up share one statistic; a ``memory_budget`` runs windows with the
same result; NaN inputs raise once, naming the layer, before any layer gets eigens; any batch size
works (PEFT's hook takes batches of one).
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

pytest.importorskip("attr", reason="peft 0.21's CorDA module imports attrs (requirements-dev.txt installs it)")
from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.lora.config import CordaConfig  # noqa: E402
from peft.tuners.lora.corda import preprocess_corda as peft_preprocess  # noqa: E402

from eva.corda import preprocess_corda  # noqa: E402
from eva.corda.covariance import CovarianceHooks  # noqa: E402
from eva.errors import EvaError  # noqa: E402
from helpers import random_token_batches, tiny_llama_model  # noqa: E402

LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _config(targets, method="ipm", **corda):
    return LoraConfig(r=4, target_modules=targets, init_lora_weights="corda",
                      corda_config=CordaConfig(corda_method=method, **corda))


def _adapters(model, targets, fn, batches, **kw):
    """(lora parameters of a PEFT model built after ``fn``'s preprocessing, the model)."""
    model = copy.deepcopy(model)
    cfg = _config(targets)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fn(model, cfg, run_model=lambda: [model(**b) for b in batches], **kw)
        peft_model = get_peft_model(model, cfg)
    return {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" in n}, model


def _assert_same(ours, theirs):
    assert ours.keys() == theirs.keys() and ours
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-5 * float(theirs[name].abs().max()))


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    return tiny_llama_model(layers=2)


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_llama_adapters_equal_peft(llama, method):
    batches = random_token_batches(97, 6, batch=1, seq=16)

    def run(fn):
        model = copy.deepcopy(llama)
        cfg = _config(LLAMA, method)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fn(model, cfg, run_model=lambda: [model(**b) for b in batches])
            peft_model = get_peft_model(model, cfg)
        return {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" in n}
    _assert_same(run(preprocess_corda), run(peft_preprocess))


def test_minilm_adapters_equal_peft(minilm, calibration_lines):
    model, tok = minilm
    batches = [dict(tok(line, return_tensors="pt", truncation=True, max_length=32)) for line in calibration_lines[:12]]
    # not the pooler's dense: its input (1, 384) is squeezed by PEFT's hook to (384,), whose
    # "x^T x" is a scalar, and PEFT's decomposition then fails; ours handles it (next test)
    targets = ["query", "key", "value", "intermediate.dense", "output.dense"]
    ours, _ = _adapters(model, targets, preprocess_corda, batches)
    theirs, _ = _adapters(model, targets, peft_preprocess, batches)
    _assert_same(ours, theirs)


def test_a_layer_fed_one_token_per_call(minilm, calibration_lines):
    """MiniLM's pooler reads one token per sequence: (1, 384) with batches of one. PEFT's hook turns
    it into a vector and fails (a scalar "covariance"); ours gets the (384, 384) matrix."""
    model, tok = minilm
    model = copy.deepcopy(model)
    batches = [dict(tok(line, return_tensors="pt")) for line in calibration_lines[:3]]
    cfg = _config(["pooler.dense"])
    preprocess_corda(model, cfg, run_model=lambda: [model(**b) for b in batches])
    assert model.pooler.dense.eigens.V_WC.shape == (384, 4)
    other = copy.deepcopy(minilm[0])
    with pytest.raises(IndexError):
        peft_preprocess(other, _config(["pooler.dense"]), run_model=lambda: [other(**b) for b in batches])


def test_shared_inputs_get_one_statistic(llama):
    modules = {n: m for n, m in llama.named_modules() if n.endswith(tuple(LLAMA))}
    with CovarianceHooks(modules) as hooks:
        for b in random_token_batches(97, 2, batch=2, seq=8):
            llama(**b)
    assert len(hooks.stats) == 4 * 2  # per layer: q/k/v, o, gate/up, down
    assert hooks.leader["layers.0.self_attn.v_proj"] == "layers.0.self_attn.q_proj"
    assert hooks.leader["layers.1.mlp.up_proj"] == "layers.1.mlp.gate_proj"
    covs = hooks.covariances()
    assert torch.equal(covs["layers.0.self_attn.k_proj"], covs["layers.0.self_attn.q_proj"])


def test_memory_budget_runs_windows_with_the_same_result(llama):
    batches = random_token_batches(97, 4, batch=1, seq=16)
    calls = []
    d = 40
    budget = 3 * 4 * d * d + 4 * 72 * 72  # a few layers at a time (down_proj reads 72 features)
    whole, _ = _adapters(llama, LLAMA, preprocess_corda, batches)

    def counting(model, cfg, run_model, **kw):
        return preprocess_corda(model, cfg, run_model=lambda: (calls.append(1), run_model()), **kw)
    windowed, _ = _adapters(llama, LLAMA, counting, batches, memory_budget=budget)
    assert len(calls) > 2  # one run_model per window
    _assert_same(windowed, whole)
    with pytest.raises(EvaError, match="more than memory_budget"):
        _adapters(llama, LLAMA, preprocess_corda, batches, memory_budget=100)


def test_nan_inputs_raise_once_naming_the_layer_before_any_eigens(llama):
    model = copy.deepcopy(llama)
    with torch.no_grad():
        model.embed_tokens.weight[5] = float("nan")
    batches = random_token_batches(97, 3, batch=1, seq=8)
    batches[1]["input_ids"][0, 2] = 5
    cfg = _config(LLAMA)
    with pytest.raises(ValueError, match=r"NaN/Inf\) in the inputs of layer layers\.0\.self_attn\.q_proj"):
        preprocess_corda(model, cfg, run_model=lambda: [model(**b) for b in batches])
    assert not any(hasattr(m, f) for m in model.modules() for f in ("eigens", "corda_method", "rank"))


def test_any_batch_size_and_the_model_modes_are_kept(llama):
    model = copy.deepcopy(llama).train()
    model.layers[0].eval()
    modes = [m.training for m in model.modules()]
    batches = random_token_batches(97, 3, batch=4, seq=8)  # PEFT's hook needs batches of one
    cfg = _config(LLAMA)
    preprocess_corda(model, cfg, run_model=lambda: [model(**b) for b in batches])
    assert all(hasattr(m, "eigens") for n, m in model.named_modules() if n.endswith(tuple(LLAMA)))
    assert [m.training for m in model.modules()] == modes


def test_layers_run_model_never_reaches_are_named(llama):
    model = copy.deepcopy(llama)
    with pytest.raises(EvaError, match="was never called by run_model"):
        preprocess_corda(model, _config(LLAMA), run_model=lambda: None)


def test_missing_corda_method_and_run_model_raise_as_in_peft(llama):
    model = copy.deepcopy(llama)
    with pytest.raises(ValueError, match="corda_method is required"):
        preprocess_corda(model, _config(LLAMA, method=None))
    with pytest.raises(ValueError, match="run_model must be specified"):
        preprocess_corda(model, _config(LLAMA))
    assert not any(hasattr(m, "corda_method") for m in model.modules())


class _TwoReaders(torch.nn.Module):
    """Two linears reading the same tensor, until ``diverge`` makes the second read a copy."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
        self.diverge = False

    def forward(self, x):
        return self.a(x) + self.b(x.clone() if self.diverge else x)


def test_inputs_that_stop_being_shared_raise_and_the_suggested_fix_works():
    torch.manual_seed(1)
    model = _TwoReaders()
    xs = [torch.randn(5, 8) for _ in range(3)]

    def run_model():
        for i, x in enumerate(xs):
            model.diverge = i == 2
            model(x)
    cfg = LoraConfig(r=2, target_modules=["a", "b"], init_lora_weights="corda", corda_config=CordaConfig(corda_method="ipm"))
    with pytest.raises(EvaError, match="received the same input as a in its first call but not in call 3; pass "
                                       "share_inputs=False"):
        preprocess_corda(model, cfg, run_model=run_model)
    assert not any(hasattr(m, f) for m in (model.a, model.b) for f in ("eigens", "corda_method", "rank"))
    preprocess_corda(model, cfg, run_model=run_model, share_inputs=False)  # the fix the message names
    assert model.a.eigens.V_WC.shape == model.b.eigens.V_WC.shape == (8, 2)
