"""How a run stops short of convergence, and a clean model after a successful run.

Data exhausted before every layer converged: ``EvaNotConvergedError`` with
``on_unconverged="error"``, else a warning and the (unconverged) result with its stop reason.
``max_steps`` stops the run without advancing the loader further. In every case, and after a
successful run, the model is left exactly as it was (hooks and train/eval flags, ``model_state``).
"""
from __future__ import annotations

import warnings

import pytest

from eva import EvaNotConvergedError
from model_state import assert_restored, batches, lora_config, run, snapshot

pytestmark = pytest.mark.filterwarnings("ignore:EVA stopped:UserWarning", "ignore:lora with eva initialization")


def test_unconverged_error(gpt2):
    before = snapshot(gpt2)
    with pytest.raises(EvaNotConvergedError, match=r"exhausted after 1 batches.*h\.0\.attn\.c_attn"):
        run(gpt2, batches(1), lora_config(["c_attn"]), on_unconverged="error")
    assert_restored(gpt2, before)


def test_unconverged_warns_and_returns(gpt2):
    before = snapshot(gpt2)
    with pytest.warns(UserWarning, match=r"EVA stopped \(exhausted after 1 batches\).*h\.0\.attn\.c_attn"):
        sd = run(gpt2, batches(1), lora_config(["c_attn"]))
    assert_restored(gpt2, before)
    assert set(sd) == {"h.0.attn.c_attn", "h.1.attn.c_attn"}
    assert sd.metadata["run"]["stop_reason"] == "exhausted"
    assert sd.metadata["run"]["steps"] == 1
    assert not any(info["converged"] for info in sd.metadata["layers"].values() if info["rank"] > 0)


def test_max_steps_one(gpt2):
    seen = []

    def loader():
        for i, b in enumerate(batches(5)):
            seen.append(i)
            yield b

    before = snapshot(gpt2)
    with pytest.warns(UserWarning, match=r"max_steps after 1 batches"):
        sd = run(gpt2, loader(), lora_config(["c_attn"]), max_steps=1)
    assert_restored(gpt2, before)
    assert seen == [0]  # the loader is not advanced past max_steps
    assert sd.metadata["run"]["steps"] == 1
    assert sd.metadata["run"]["stop_reason"] == "max_steps"
    assert all(info["steps"] == 1 for info in sd.metadata["layers"].values())


def test_success_leaves_model_clean(gpt2):
    before = snapshot(gpt2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        run(gpt2, batches(3))
    assert_restored(gpt2, before)
