"""Fixtures of the engine tests: private copies of the session's tiny GPT-2 (conftest.py at the
tests root) in train mode or in a mixed train/eval state (see ``model_state.set_mode``)."""
from __future__ import annotations

import copy

import pytest

from model_state import set_mode


@pytest.fixture(params=["train", "mixed"])
def gpt2(request, tiny_gpt2):
    """A private copy of the tiny GPT-2 in train mode (or a mixed train/eval state)."""
    return set_mode(copy.deepcopy(tiny_gpt2), request.param)


@pytest.fixture
def gpt2_train(tiny_gpt2):
    return set_mode(copy.deepcopy(tiny_gpt2), "train")
