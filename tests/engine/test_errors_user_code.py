"""Errors in the user's own code: the user's callables, loader and hooks.

A ``prepare_layer_inputs_fn`` returning the wrong shape or type (or a mapping naming unknown
layers) is an ``EvaError`` naming the layer. An exception raised by ``forward_fn``, by the
loader or inside the forward (a user hook) propagates unchanged, the very same object, even a
KeyboardInterrupt. After each, the model is left exactly as it was (see ``model_state``).
"""
from __future__ import annotations

import pytest

from eva import EvaError
from model_state import D, assert_restored, batches, lora_config, run, snapshot, untouched

pytestmark = pytest.mark.filterwarnings("ignore:EVA stopped:UserWarning", "ignore:lora with eva initialization")


# ------------------------------------------------------------- prepare_layer_inputs_fn -----
@pytest.mark.parametrize("fn, message", [
    (lambda x, mi, name: x[0].reshape(-1, D)[:, :10], r"layer h\.0\.attn\.c_attn: prepared input has width 10 "
                                                      r"but the layer's in_features is 48"),
    (lambda x, mi, name: x[0].reshape(-1), r"layer h\.0\.attn\.c_attn: prepare_layer_inputs_fn must return a "
                                           r"2-D \(tokens, d\) tensor, got \(\d+,\)"),
    (lambda x, mi, name: x[0].reshape(-1, D).tolist(), r"layer h\.0\.attn\.c_attn: .*2-D .*got list"),
    ({"h.1.attn.c_attn": lambda x, mi, name: x[0].reshape(-1, D)[:, :7]},
     r"layer h\.1\.attn\.c_attn: prepared input has width 7"),
], ids=["width", "1-D", "not-a-tensor", "dict-width"])
def test_prepare_layer_inputs_fn_bad_output(gpt2, fn, message):
    before = snapshot(gpt2)
    with pytest.raises(EvaError, match=message):
        run(gpt2, batches(2), lora_config(["c_attn"]), prepare_layer_inputs_fn=fn)
    assert_restored(gpt2, before)


def test_prepare_layer_inputs_fn_dict_with_unknown_layer(gpt2):
    fns = {"h.0.attn.c_attn": lambda x, mi, n: x[0].reshape(-1, D), "h.0.attn.c_atn": lambda x, mi, n: x[0]}
    with untouched(gpt2) as spy, \
            pytest.raises(EvaError, match=r"^prepare_layer_inputs_fn is a mapping but the following module names were not found in the "
                          r"model: \['h\.0\.attn\.c_atn'\].*h\.0\.attn\.c_attn"):
        run(gpt2, batches(2), lora_config(["c_attn"]), prepare_layer_inputs_fn=fns, forward_fn=spy.forward_fn)


# --------------------------------------------------------- exceptions from the user's code --
class _Boom(RuntimeError):
    pass


@pytest.mark.parametrize("exc_type", [_Boom, KeyboardInterrupt])
@pytest.mark.parametrize("at", [0, 1])
def test_exception_from_forward_fn_propagates_unchanged(gpt2, exc_type, at):
    raised = exc_type("stop here")
    calls = []

    def forward_fn(model, batch):
        calls.append(len(calls))
        if len(calls) - 1 == at:
            raise raised  # batch 0: every target hooked (discovery); batch 1: group leaders hooked
        return model(**batch)

    before = snapshot(gpt2)
    with pytest.raises(exc_type) as info:
        run(gpt2, batches(3), forward_fn=forward_fn)
    assert info.value is raised
    assert calls == list(range(at + 1))
    assert_restored(gpt2, before)


def test_exception_from_loader_propagates_unchanged(gpt2):
    raised = _Boom("loader broke")

    def loader():
        yield from batches(1)
        raise raised

    before = snapshot(gpt2)
    with pytest.raises(_Boom) as info:
        run(gpt2, loader())
    assert info.value is raised
    assert_restored(gpt2, before)


def test_exception_from_layer_hook_of_user_propagates(gpt2):
    """An error raised inside the forward (here: a user pre-hook on a target) during discovery."""
    raised = _Boom("inside the forward")
    handle = gpt2.h[1].attn.c_attn.register_forward_pre_hook(lambda m, a: (_ for _ in ()).throw(raised))
    before = snapshot(gpt2)
    with pytest.raises(_Boom) as info:
        run(gpt2, batches(2))
    assert info.value is raised
    assert_restored(gpt2, before)
    handle.remove()
