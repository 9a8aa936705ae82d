"""Model-state helpers of the error tests (importable as ``model_state``: tests/ is on sys.path).

Every EVA run, failed or not, must leave the model as it was: no forward hook / pre-hook of the
engine left on any module, and every module's own train/eval flag restored (also a mixed state
in which some submodules are in eval mode while the rest of the model trains). Errors in the
arguments must be raised before the model is touched at all: no forward, no train()/eval().

* ``snapshot`` / ``assert_restored``: record and compare train flags and hooks of every module;
* ``set_mode``: put the tiny GPT-2 in train or mixed train/eval mode;
* ``Spy`` / ``untouched``: count forwards and train()/eval() calls, assert there were none;
* ``lora_config`` / ``batches`` / ``run``: run ``eva.get_eva_state_dict`` on the tiny GPT-2;
* ``peft_state`` / ``assert_peft_unchanged``: a PeftModel's weights, config and modules, unchanged.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
from peft import LoraConfig
from peft.tuners.lora.config import EvaConfig
from torch import nn

import eva
from helpers import random_token_batches

VOCAB_GPT2 = 101  # tiny_gpt2 in conftest.py
D = 48            # its n_embd


def snapshot(model: nn.Module):
    """Train flag and hook ids of every module (+ the global module hooks)."""
    per_module = {
        name: (m.training, tuple(m._forward_pre_hooks), tuple(m._forward_hooks),
               tuple(m._forward_pre_hooks_with_kwargs), tuple(m._forward_hooks_with_kwargs))
        for name, m in model.named_modules()
    }
    glob = (tuple(nn.modules.module._global_forward_pre_hooks), tuple(nn.modules.module._global_forward_hooks))
    return per_module, glob


def assert_restored(model: nn.Module, before) -> None:
    after = snapshot(model)
    assert after[1] == before[1], "global module hooks changed"
    changed = {n: (before[0].get(n), v) for n, v in after[0].items() if before[0].get(n) != v}
    assert not changed, f"modules not restored (name: (before, after) of training, hooks): {changed}"


def set_mode(model: nn.Module, mode: str) -> nn.Module:
    model.train()
    if mode == "mixed":  # a frozen (eval) block and a frozen dropout inside a training model
        model.h[0].attn.eval()
        model.drop.eval()
    return model


class Spy:
    """Counts forward_fn calls and any train()/eval() call on the root module."""

    def __init__(self, model: nn.Module):
        self.forwards = 0
        self.mode_calls = []
        original = model.train

        def train(mode=True):
            self.mode_calls.append(mode)
            return original(mode)

        model.train = train  # instance attribute: model.eval() goes through it as well

    def forward_fn(self, model, batch):
        self.forwards += 1
        return model(**batch)

    def assert_untouched(self, mode_calls=True):
        assert self.forwards == 0, "the model ran a forward before the error"
        if mode_calls:
            assert self.mode_calls == [], "the model's train/eval mode was changed before the error"


@contextmanager
def untouched(model: nn.Module, mode_calls: bool = True):
    """Yields a ``Spy`` of ``model``; afterwards asserts ``spy.assert_untouched(mode_calls)`` and
    that the model is restored. Put ``pytest.raises`` inside: ``with untouched(m) as spy,
    pytest.raises(...):``."""
    spy, before = Spy(model), snapshot(model)
    yield spy
    spy.assert_untouched(mode_calls)
    assert_restored(model, before)


def lora_config(targets, r=3, **eva_kwargs):
    return LoraConfig(r=r, target_modules=targets, init_lora_weights="eva", eva_config=EvaConfig(**eva_kwargs))


def batches(n=4, **kw):
    """Random GPT-2 batches (3 x 17, the last 4 positions of the last sequence are padding)."""
    return random_token_batches(VOCAB_GPT2, n, **kw)


def run(model, loader, cfg=None, **kw):
    kw.setdefault("show_progress_bar", False)
    if cfg is None:
        cfg = lora_config(["c_attn", "c_proj"])
    return eva.get_eva_state_dict(model, loader, cfg, **kw)


def peft_state(model):
    """A PeftModel's weights, adapter config fields and module names (compare with assert_peft_unchanged)."""
    cfg = model.peft_config["default"]
    return ({k: v.clone() for k, v in model.state_dict().items()},
            copy.deepcopy((cfg.target_modules, cfg.rank_pattern, cfg.alpha_pattern, cfg.lora_alpha, cfg.r)),
            [n for n, _ in model.named_modules()])


def assert_peft_unchanged(model, before):
    """Nothing of ``peft_state`` changed: no module replaced, config and weights equal."""
    sd, cfg, names = peft_state(model)
    assert names == before[2], "modules were replaced"
    assert cfg == before[1], "peft_config was modified"
    assert sd.keys() == before[0].keys()
    changed = [k for k in sd if not torch.equal(sd[k], before[0][k])]
    assert not changed, f"weights changed: {changed[:5]}"
