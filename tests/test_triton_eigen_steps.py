"""Triton ``eigen_steps`` (symmetrize, operator_matmul, orthonormalize) and ``topk_eigh``.

Runs on CUDA when available, else on CPU tensors under ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations


import pytest
import torch

import eva_kernels
from eva_kernels import _backends
from eva_kernels.reference import centered_operator_matmul, sym_from_upper

from _triton_marks import DEVICE, TRITON_MARKS

pytestmark = TRITON_MARKS


@pytest.fixture(scope="module")
def steps():
    reason = _backends.why_unavailable("eigen_steps", "triton", torch.device(DEVICE).type)
    if reason is not None:
        pytest.skip(reason)
    return _backends.get("eigen_steps", "triton")


def _rand(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("d", [1, 37, 70], ids=lambda v: f"d{v}")
def test_symmetrize_matches_sym_from_upper(steps, d, dtype):
    cov = _rand(d, d, dtype=dtype)
    lower = torch.tril(torch.ones(d, d, dtype=torch.bool, device=DEVICE), -1)
    poisoned = cov.masked_fill(lower, float("nan"))  # the lower triangle must never be read
    out = steps.symmetrize(poisoned)
    assert out.dtype == dtype and out.shape == (d, d)
    torch.testing.assert_close(out, sym_from_upper(cov), rtol=0, atol=0)


@pytest.mark.parametrize("centred", [False, True], ids=["plain", "centred"])
@pytest.mark.parametrize("d,b", [(1, 1), (45, 7), (70, 24)], ids=lambda v: str(v))
def test_operator_matmul_matches_reference(steps, d, b, centred):
    a = _rand(d, d, seed=1)
    a = a + a.mT
    q = _rand(d, b, seed=2)
    colsum = _rand(d, seed=3) * 5 if centred else None
    count = torch.tensor(13, device=DEVICE) if centred else None
    got = steps.operator_matmul(a, q, colsum, count)
    ref = centered_operator_matmul(a.double(), q.double(),
                                   None if colsum is None else colsum.double(),
                                   None if count is None else count.double())
    assert got.dtype == torch.float32 and got.shape == (d, b)
    err = (got.double() - ref).abs().max() / ref.abs().max()
    assert err < 1e-5


def test_operator_matmul_strided_q_and_fp64(steps):
    d, b = 50, 9
    a = _rand(d, d, seed=4)
    q = _rand(b, d, seed=5).mT  # non-contiguous
    ref = centered_operator_matmul(a.double(), q.double(), None, None)
    got = steps.operator_matmul(a, q, None, None)
    assert ((got.double() - ref).abs().max() / ref.abs().max()) < 1e-5
    got64 = steps.operator_matmul(a.double(), q.double(), None, None)
    assert got64.dtype == torch.float64
    torch.testing.assert_close(got64, ref)


def _check_orthonormal_span(q, y, tol_orth, tol_span):
    b = y.shape[1]
    qd = q.double()
    eye = torch.eye(b, dtype=torch.float64, device=q.device)
    assert (qd.mT @ qd - eye).abs().max() < tol_orth
    # span(Y) inside span(Q): the projection residual of each (normalised) column is tiny
    yn = y.double() / y.double().norm(dim=0)
    resid = yn - qd @ (qd.mT @ yn)
    assert resid.norm(dim=0).max() < tol_span


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("kind", ["gaussian", "scaled_1_to_1e4", "nearly_dependent"])
def test_orthonormalize(steps, kind, dtype):
    d, b = 200, 24
    y = _rand(d, b, seed=6, dtype=torch.float64)
    if kind == "scaled_1_to_1e4":
        y = y * torch.logspace(0, 4, b, dtype=torch.float64, device=DEVICE)
    elif kind == "nearly_dependent":  # subspace-iteration-like: decaying columns of a PSD power
        u, _ = torch.linalg.qr(_rand(d, d, seed=7, dtype=torch.float64))
        lam = torch.logspace(0, -6, d, dtype=torch.float64, device=DEVICE)
        a = (u * lam) @ u.mT
        y = a @ (a @ y)
    y = y.to(dtype)
    q = steps.orthonormalize(y)
    assert q.dtype == dtype and q.shape == (d, b) and q.device == y.device
    eps = 1e-5 if dtype == torch.float32 else 1e-12
    span_tol = 1e-4 if dtype == torch.float32 else 1e-8
    _check_orthonormal_span(q, y, eps, span_tol)


def test_orthonormalize_rank_deficient_and_zero(steps):
    d, b = 120, 16
    base = _rand(d, 3, seed=8)
    y = base @ _rand(3, b, seed=9)  # rank 3
    q = steps.orthonormalize(y)
    eye = torch.eye(b, dtype=torch.float64, device=DEVICE)
    assert (q.double().mT @ q.double() - eye).abs().max() < 1e-5
    resid = y.double() - q.double() @ (q.double().mT @ y.double())
    assert resid.abs().max() / y.abs().max() < 1e-5
    qz = steps.orthonormalize(torch.zeros(d, b, device=DEVICE))
    assert (qz.double().mT @ qz.double() - eye).abs().max() < 1e-5


def _psd(d, seed=10, decay=0.7):
    u, _ = torch.linalg.qr(_rand(d, d, seed=seed, dtype=torch.float64))
    lam = 100.0 * decay ** torch.arange(d, dtype=torch.float64, device=DEVICE)
    return (u * lam) @ u.mT


@pytest.mark.parametrize("centred", [False, True], ids=["plain", "centred"])
def test_topk_eigh_matches_eigh(centred):
    if _backends.why_unavailable("eigen_steps", "triton", torch.device(DEVICE).type) is not None:
        pytest.skip("triton eigen_steps unavailable")
    d, k = 90, 6
    a = _psd(d)
    if centred:
        c = _rand(d, seed=11, dtype=torch.float64) * 3
        n = torch.tensor(7.0, dtype=torch.float64, device=DEVICE)
        stored = a + torch.outer(c, c) / n  # operator = stored - c c^T / n = a
        kw = dict(colsum=c.float(), count=n)
    else:
        stored, kw = a, {}
    cov = stored.float().triu()  # only the upper triangle is stored
    cov = cov + torch.tril(torch.full_like(cov, float("nan")), -1)
    res = eva_kernels.topk_eigh(cov, k, oversample=8, iters=4, backend="triton", **kw)
    vals, vecs = torch.linalg.eigh(a)
    top = vecs[:, -k:].flip(1)
    assert torch.isfinite(res.eigenvectors).all()
    overlap = torch.linalg.svdvals(res.eigenvectors.double() @ top).min()
    assert overlap >= 0.999
    torch.testing.assert_close(res.eigenvalues.double(), vals[-k:].flip(0), rtol=1e-3, atol=1e-3)


def test_topk_eigh_warm_start_and_full_block():
    if _backends.why_unavailable("eigen_steps", "triton", torch.device(DEVICE).type) is not None:
        pytest.skip("triton eigen_steps unavailable")
    d, k = 60, 4
    a = _psd(d, seed=12, decay=0.6)
    first = eva_kernels.topk_eigh(a.float(), k, iters=1, return_basis=True, backend="triton")
    second = eva_kernels.topk_eigh(a.float(), k, iters=2, init=first.basis, backend="triton")
    _, vecs = torch.linalg.eigh(a)
    top = vecs[:, -k:].flip(1)
    assert torch.linalg.svdvals(second.eigenvectors.double() @ top).min() >= 0.999
    small = _psd(10, seed=13)  # b = min(d, k + p) = d: exact dense path
    full = eva_kernels.topk_eigh(small.float(), 3, backend="triton")
    _, v = torch.linalg.eigh(small)
    assert torch.linalg.svdvals(full.eigenvectors.double() @ v[:, -3:]).min() >= 0.999
