"""Fixtures of the engine tests: private copies of the session's tiny GPT-2 (conftest.py at the
tests root) in train mode or in a mixed train/eval state (see ``model_state.set_mode``), and
the torch backend given the fast path's arithmetic (``torch_with_fast_path``)."""
from __future__ import annotations

import copy
import dataclasses

import pytest

from model_state import set_mode


@pytest.fixture(params=["train", "mixed"])
def gpt2(request, tiny_gpt2):
    """A private copy of the tiny GPT-2 in train mode (or a mixed train/eval state)."""
    return set_mode(copy.deepcopy(tiny_gpt2), request.param)


@pytest.fixture
def gpt2_train(tiny_gpt2):
    return set_mode(copy.deepcopy(tiny_gpt2), "train")


@pytest.fixture
def torch_with_fast_path(monkeypatch):
    """The torch backend with :func:`eva_kernels.testing.cov_update_fast_reference` (the Triton
    fast path's arithmetic in plain PyTorch) as its ``precision="fast"``: the engine's
    ``statistics_precision`` routing then runs for real on CPU models."""
    from eva_kernels import _registry
    from eva_kernels.testing import cov_update_fast_reference
    backend = _registry.get_backend("torch")
    monkeypatch.setitem(_registry._BACKENDS, "torch",
                        dataclasses.replace(backend, cov_update_fast=cov_update_fast_reference))
