"""Bad input around ``memory_budget``: clear errors, raised before any forward where the issue
is in the arguments, and the model always left as it was (hooks, block forwards, train flags,
``config.use_cache``)."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import eva
from eva.engine import block_inputs, memory_budget
from eva.engine.memory_budget import Window, plan_windows, statistic_bytes
from eva.errors import EvaError
from eva.sizes import format_bytes, parse_bytes
from model_state import assert_restored, batches, lora_config, run, snapshot, untouched

D = 16


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, D)

    def forward(self, x, scale=None):
        y = x + torch.tanh(self.fc(x))
        return y if scale is None else y * scale


class Chain(nn.Module):
    """inp -> 3 blocks -> head; ``between`` changes the hidden states between blocks (not a chain),
    ``scaled`` passes each block an argument computed from the previous block's output."""

    def __init__(self, between: bool = False, scaled: bool = False, listed: bool = True, per_block: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(8, D)
        blocks = [Block() for _ in range(3)]
        if listed:
            self.blocks = nn.ModuleList(blocks)
        else:  # the same layers, not in a list
            self.b0, self.b1, self.b2 = blocks
        self.head = nn.Linear(D, 4)
        self.between, self.scaled, self.listed, self.per_block = between, scaled, listed, per_block

    def forward(self, x):
        h = self.inp(x)
        # per-block anisotropic scales, computed before the loop (they change each block's PCA)
        per_block = [torch.linspace(0.2, 3.0, D, device=x.device).roll(5 * j) for j in range(3)]
        for j, b in enumerate(self.blocks if self.listed else (self.b0, self.b1, self.b2)):
            scale = per_block[j] if self.per_block else None
            h = b(h, scale=(1 + h.std()) if self.scaled else scale)
            if self.between:
                h = h * 0.5
        return self.head(h)


def chain_batches(n=4, nan_at=None):
    g = torch.Generator().manual_seed(0)
    out = [{"x": torch.randn(3, 11, 8, generator=g)} for _ in range(n)]
    if nan_at is not None:
        out[nan_at]["x"][0, 0, 0] = float("nan")
    return out


def run_chain(model, loader, targets=("fc",), **kw):
    kw.setdefault("show_progress_bar", False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "EVA stopped")
        return eva.get_eva_state_dict(model, loader, lora_config(list(targets), r=2), forward_fn=lambda m, b: m(b["x"]),
                                      prepare_model_inputs_fn=None, prepare_layer_inputs_fn=None, **kw)


ONE_BLOCK = statistic_bytes(D, True)


def assert_blocks_restored(model):
    assert all("forward" not in m.__dict__ for m in model.modules()), "a block's forward was left patched"


# ------------------------------------------------------------------ before any forward -------
def test_budget_below_one_statistic_raises_before_any_forward(gpt2):
    need = statistic_bytes(4 * 48, True)  # GPT-2's mlp.c_proj reads the 4*48-wide MLP activations
    with untouched(gpt2) as spy, pytest.raises(EvaError) as err:
        run(gpt2, batches(), lora_config(["c_attn", "c_proj"]), forward_fn=spy.forward_fn, memory_budget=need - 1)
    msg = str(err.value)
    assert "h.0.mlp.c_proj" in msg and f"{need} bytes" in msg and f"memory_budget={need}" in msg


@pytest.mark.parametrize("value", ["lots", "-1GB", 0, 1.5, True, "8 XB"])
def test_budget_that_is_not_a_size_raises_before_any_forward(gpt2, value):
    with untouched(gpt2) as spy, pytest.raises(EvaError, match="memory_budget must be a positive number of bytes"):
        run(gpt2, batches(), forward_fn=spy.forward_fn, memory_budget=value)


def test_named_block_list_that_is_not_one_raises_before_any_forward(gpt2):
    with untouched(gpt2) as spy, pytest.raises(EvaError, match=r"blocks='layers' is not an nn.ModuleList.*'h'"):
        run(gpt2, batches(), forward_fn=spy.forward_fn, memory_budget=statistic_bytes(192, True), blocks="layers")


@pytest.mark.parametrize("kw,match", [(dict(offload_device="meta"), "offload_device must name a device"),
                                      (dict(blocks=""), "blocks must be None or the dotted name")])
def test_bad_block_options_raise_before_any_forward(gpt2, kw, match):
    with untouched(gpt2) as spy, pytest.raises(EvaError, match=match):
        run(gpt2, batches(), forward_fn=spy.forward_fn, **kw)


# ------------------------------------------------------------------ models it cannot replay -----
def test_no_block_list_raises_with_the_blocks_fix():
    model = Chain(listed=False)
    before = snapshot(model)
    with pytest.raises(EvaError, match=r"no list of repeated blocks.*blocks='model.layers'"):
        run_chain(model, chain_batches(), memory_budget=2 * ONE_BLOCK)
    assert_restored(model, before)
    assert_blocks_restored(model)


def test_targets_outside_the_blocks_run_after_them_or_raise_naming_them():
    """inp and head sit outside the blocks: calibrated all at once after the windows when their
    statistics fit the budget together, else refused, naming them, with the budget that works."""
    model = Chain()
    targets = ("fc", "inp", "head")
    ref = run_chain(model, chain_batches(), targets=targets)
    sd = run_chain(model, chain_batches(), targets=targets, memory_budget=2 * ONE_BLOCK)
    assert sd.metadata["run"]["mode"] == "layer_sequential"
    assert sd.metadata["run"]["windows"][-1]["blocks"] is None  # inp and head, after the blocks
    for name in ref:
        assert sd.metadata["layers"][name]["tokens"] == ref.metadata["layers"][name]["tokens"]
        torch.testing.assert_close(sd[name], ref[name], rtol=1e-4, atol=1e-5)
    with pytest.raises(EvaError, match=r"the targets outside them \(\['inp', 'head'\]\) all at once afterwards, but "
                                       r"their statistics alone need.*at least (\d+) bytes") as err:
        run_chain(model, chain_batches(), targets=targets, memory_budget=ONE_BLOCK)
    assert_blocks_restored(model)
    least = int(str(err.value).split("at least ")[1].split(" bytes")[0])
    sd = run_chain(model, chain_batches(), targets=targets, memory_budget=least)  # the advice, followed
    assert sd.metadata["run"]["mode"] == "layer_sequential"
    torch.testing.assert_close(sd["head"], ref["head"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kw,match", [(dict(between=True), "changes the hidden states between its blocks"),
                                      (dict(scaled=True), "argument 'scale' depends on what the blocks before")])
def test_models_whose_blocks_are_not_a_plain_chain_raise(kw, match):
    model = Chain(**kw)
    before = snapshot(model)
    with pytest.raises(EvaError, match=match):
        run_chain(model, chain_batches(), memory_budget=ONE_BLOCK)
    assert_restored(model, before)
    assert_blocks_restored(model)


@pytest.mark.parametrize("per_block", [False, True])
def test_plain_chain_model_runs_layer_sequentially_and_equals_all_at_once(per_block):
    """Also when each block gets its own argument (like per-layer masks of sliding-window layers):
    every block's call is recorded per batch, not the first block's reused."""
    model = Chain(per_block=per_block)
    ref = run_chain(model, chain_batches())
    sd = run_chain(model, chain_batches(), memory_budget=ONE_BLOCK)
    assert sd.metadata["run"]["mode"] == "layer_sequential" and len(sd.metadata["run"]["windows"]) == 3
    for name in ref:
        torch.testing.assert_close(sd[name], ref[name], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ errors mid-run ---------------
def test_offload_device_out_of_memory_leaves_the_model_as_it_was(monkeypatch, tiny_llama):
    from helpers import random_token_batches
    calls = {"n": 0}
    real = block_inputs.offload

    def short_of_memory(obj, device, memo):
        calls["n"] += 1
        if calls["n"] > 4:
            raise torch.OutOfMemoryError("out of memory: tried to allocate 2.00 MiB")
        return real(obj, device, memo)

    monkeypatch.setattr(block_inputs, "offload", short_of_memory)
    model = copy.deepcopy(tiny_llama)
    model.train()
    before = snapshot(model)
    use_cache = model.config.use_cache
    cfg = lora_config(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], r=2)
    with pytest.raises(EvaError, match=r"offload_device cpu ran out of memory caching .*left as it was"):
        eva.get_eva_state_dict(model, random_token_batches(97, 4), cfg, show_progress_bar=False,
                               memory_budget=statistic_bytes(72, True) * 2)
    assert model.training and model.config.use_cache == use_cache
    assert_restored(model, before)
    assert_blocks_restored(model)


def test_nan_in_a_window_raises_and_restores_the_model():
    model = Chain()
    model.train()
    before = snapshot(model)
    with pytest.raises(EvaError, match="NaN or Inf"):
        run_chain(model, chain_batches(nan_at=2), memory_budget=ONE_BLOCK)
    assert model.training
    assert_restored(model, before)
    assert_blocks_restored(model)


# ------------------------------------------------------------------ sizes and plans --------------
@pytest.mark.parametrize("text,n", [("8GB", 8 * 10**9), ("512MiB", 512 * 2**20), ("2e9", 2 * 10**9),
                                    ("1.5 gb", 15 * 10**8), (" 3 KiB ", 3072), (12345, 12345), ("100", 100)])
def test_parse_bytes(text, n):
    assert parse_bytes(text) == n


def test_format_bytes():
    assert format_bytes(3_288_334_336) == "3.29 GB" and format_bytes(999) == "999 B"


def test_auto_budget_is_a_fraction_of_free_memory(monkeypatch):
    monkeypatch.setattr(memory_budget, "free_bytes", lambda device: 10**9)
    assert memory_budget.resolve_budget("auto", torch.device("cpu")) == int(memory_budget.AUTO_FRACTION * 10**9)
    assert memory_budget.resolve_budget(None, None) is None


def test_auto_budget_below_the_need_goes_layer_sequential(monkeypatch):
    monkeypatch.setattr(memory_budget, "free_bytes", lambda device: int(2.5 * ONE_BLOCK / memory_budget.AUTO_FRACTION))
    sd = run_chain(Chain(), chain_batches(), memory_budget="auto")
    assert sd.metadata["run"]["mode"] == "layer_sequential" and len(sd.metadata["run"]["windows"]) == 2


class _G:
    def __init__(self, d):
        self.d = d


def test_plan_packs_whole_blocks_and_splits_only_oversized_ones():
    s = lambda d: statistic_bytes(d, True)  # noqa: E731
    g = [_G(4), _G(4), _G(4), _G(8), _G(8), _G(4)]
    blocks = [0, 0, 1, 2, 2, 3]
    budget = s(8) + s(4)  # blocks 0 and 1 together; block 2 (two d=8 groups) alone does not fit
    plan = plan_windows(g, blocks, budget, True)
    assert [(w.first_block, w.last_block, len(w.groups)) for w in plan] == [(0, 1, 3), (2, 2, 1), (2, 2, 1), (3, 3, 1)]
    assert all(w.nbytes <= budget for w in plan)
    assert isinstance(plan[0], Window)
    whole = plan_windows(g, blocks, 10 * s(8), True)
    assert [(w.first_block, w.last_block) for w in whole] == [(0, 3)]
