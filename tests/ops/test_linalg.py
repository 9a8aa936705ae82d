"""``eva_kernels.linalg``: both orthonormalisations on hard blocks, and what ``auto`` means.

The orthonormalisation is shared by every backend: choosing a backend never chooses it.
"""
from __future__ import annotations

import pytest
import torch

from eva_kernels import ORTHONORMALIZATIONS, orthonormalization_for, orthonormalize
from eva_kernels.linalg import subtract_centering, sym_from_upper
from helpers import DEVICE


def _rand(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)


def _check_orthonormal_span(q, y, tol_orth, tol_span):
    b = y.shape[1]
    qd = q.double()
    eye = torch.eye(b, dtype=torch.float64, device=q.device)
    assert (qd.mT @ qd - eye).abs().max() < tol_orth
    # span(Y) inside span(Q): the projection residual of each (normalised) column is tiny
    yn = y.double() / y.double().norm(dim=0)
    resid = yn - qd @ (qd.mT @ yn)
    assert resid.norm(dim=0).max() < tol_span


@pytest.mark.parametrize("method", ORTHONORMALIZATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("kind", ["gaussian", "scaled_1_to_1e4", "nearly_dependent"])
def test_orthonormalize(method, kind, dtype):
    d, b = 200, 24
    y = _rand(d, b, seed=6)
    if kind == "scaled_1_to_1e4":
        y = y * torch.logspace(0, 4, b, dtype=torch.float64, device=DEVICE)
    elif kind == "nearly_dependent":  # subspace-iteration-like: decaying columns of a PSD power
        u, _ = torch.linalg.qr(_rand(d, d, seed=7))
        lam = torch.logspace(0, -6, d, dtype=torch.float64, device=DEVICE)
        a = (u * lam) @ u.mT
        y = a @ (a @ y)
    y = y.to(dtype)
    q = orthonormalize(y, method)
    assert q.dtype == dtype and q.shape == (d, b) and q.device == y.device
    eps = 1e-5 if dtype == torch.float32 else 1e-12
    span_tol = 1e-4 if dtype == torch.float32 else 1e-8
    _check_orthonormal_span(q, y, eps, span_tol)


@pytest.mark.parametrize("method", ORTHONORMALIZATIONS)
def test_orthonormalize_rank_deficient_and_zero(method):
    d, b = 120, 16
    y = (_rand(d, 3, seed=8) @ _rand(3, b, seed=9)).float()  # rank 3
    q = orthonormalize(y, method)
    eye = torch.eye(b, dtype=torch.float64, device=DEVICE)
    assert (q.double().mT @ q.double() - eye).abs().max() < 1e-5
    resid = y.double() - q.double() @ (q.double().mT @ y.double())
    assert resid.abs().max() / y.abs().max() < 1e-5
    qz = orthonormalize(torch.zeros(d, b, device=DEVICE), method)
    assert (qz.double().mT @ qz.double() - eye).abs().max() < 1e-5


def test_auto_depends_on_the_device_only():
    assert orthonormalization_for("cpu") == "householder"
    assert orthonormalization_for("cuda") == "cholesky_qr3"
    assert orthonormalization_for("cpu", "cholesky_qr3") == "cholesky_qr3"
    with pytest.raises(ValueError, match="orthonormalization must be"):
        orthonormalization_for("cpu", "qr")


def test_dense_helpers():
    a = _rand(7, 7, seed=1)
    full = sym_from_upper(a)
    assert torch.equal(full, full.mT) and torch.equal(torch.triu(full), torch.triu(a))
    q, c, n = _rand(7, 3, seed=2), _rand(7, seed=3), torch.tensor(4.0, dtype=torch.float64)
    torch.testing.assert_close(subtract_centering(full @ q, q, c, n), (full - torch.outer(c, c) / 4) @ q)
    assert subtract_centering(full @ q, q, None, None) is not None
