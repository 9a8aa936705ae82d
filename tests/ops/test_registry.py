"""Backend selection: explicit and observable, ``auto`` the only mode that chooses, no silent
fallback, and errors that name the fix."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import eva_kernels
from eva_kernels import Backend, BackendUnavailableError, cov_update


def test_every_known_backend_is_typed_and_torch_runs_everywhere():
    torch_backend = eva_kernels.get_backend("torch")
    assert isinstance(torch_backend, Backend)
    assert torch_backend.implements("cov_update") and torch_backend.implements("topk_eigh")
    assert torch_backend.is_available("cpu")
    assert "torch" in eva_kernels.available_backends("cpu") and "torch" in eva_kernels.available_backends("cpu", "topk_eigh")
    assert set(eva_kernels.available_backends("cpu")) <= set(eva_kernels.BACKEND_NAMES)


def test_names_env_and_backend_objects(monkeypatch):
    with pytest.raises(ValueError, match="not a backend"):
        cov_update(torch.zeros(2, 2), torch.zeros(2), torch.ones(1, 2), backend="cuda-magic")
    monkeypatch.setenv("EVA_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="EVA_BACKEND"):
        cov_update(torch.zeros(2, 2), torch.zeros(2), torch.ones(1, 2))
    monkeypatch.setenv("EVA_BACKEND", "torch")
    assert int(cov_update(torch.zeros(2, 2), torch.zeros(2), torch.ones(3, 2))) == 3
    assert eva_kernels.resolve_backend("cov_update", "cpu").name == "torch"  # the variable decides
    resolved = eva_kernels.get_backend("torch")
    assert eva_kernels.resolve_backend("cov_update", "cpu", resolved) is resolved
    assert int(cov_update(torch.zeros(2, 2), torch.zeros(2), torch.ones(2, 2), backend=resolved)) == 2


def test_auto_takes_the_highest_priority_available():
    auto = eva_kernels.resolve_backend("cov_update", "cpu", "auto")
    ranked = sorted((eva_kernels.get_backend(n) for n in eva_kernels.available_backends("cpu")),
                    key=lambda b: -b.priority.get("cpu", -1))
    assert auto is ranked[0]
    # Triton on CPU is the interpreter: runnable when named, never chosen by auto
    assert eva_kernels.resolve_backend("topk_eigh", "cpu", "auto").name == "torch"


@pytest.fixture
def unavailable_triton():
    """The triton backend re-registered as one that cannot run (restored afterwards)."""
    original = eva_kernels.get_backend("triton")
    eva_kernels.register_backend(dataclasses.replace(
        original, why_not=lambda device_type: "needs a CUDA GPU; set TRITON_INTERPRET=1 for CPU tensors"))
    yield
    eva_kernels.register_backend(original)


def test_unavailable_backend_raises_with_the_fix(unavailable_triton):
    cov = torch.zeros(2, 2)
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1.*backends that can: torch"):
        cov_update(cov, torch.zeros(2), torch.ones(1, 2), backend="triton")
    assert torch.equal(cov, torch.zeros(2, 2))  # raised before anything was written
    assert "triton" not in eva_kernels.available_backends("cpu")


def test_unknown_op():
    with pytest.raises(ValueError, match="unknown op"):
        eva_kernels.resolve_backend("svd", "cpu")
