"""topk_eigh (torch backend) against torch.linalg.eigh in float64."""
from __future__ import annotations

import pytest
import torch

from eva_kernels import component_cosines, fix_signs, subspace_overlap, topk_eigh


def psd_with_spectrum(eigs, seed=0, dtype=torch.float64):
    d = len(eigs)
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    a = (q * torch.as_tensor(eigs, dtype=torch.float64)) @ q.T
    return (0.5 * (a + a.T)).to(dtype), q


def exact_top(a, k):
    vals, vecs = torch.linalg.eigh(a.double())
    return vals.flip(0)[:k], vecs.flip(1)[:, :k].T


SPECTRA = {
    "decaying": lambda d: [1.0 / (i + 1) ** 1.5 for i in range(d)],
    "clustered": lambda d: [10.0 + 1e-3 * (i % 3) if i < 6 else 1.0 / (i + 1) for i in range(d)],
    "repeated": lambda d: [5.0] * 4 + [2.0] * 4 + [1.0 / (i + 1) ** 2 for i in range(d - 8)],
}


@pytest.mark.parametrize("spectrum", list(SPECTRA))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("d", [40, 130])
def test_topk_matches_eigh(spectrum, dtype, d):
    eigs = SPECTRA[spectrum](d)
    a, _ = psd_with_spectrum(eigs, dtype=dtype)
    k = 8  # a gap follows the 8th eigenvalue in every spectrum
    res = topk_eigh(torch.triu(a), k, tol=1e-7 if dtype == torch.float64 else 1e-5, max_iters=200)
    vals, vecs = exact_top(a, k)
    assert res.eigenvectors.shape == (k, d) and res.eigenvalues.shape == (k,)
    assert float(subspace_overlap(res.eigenvectors, vecs)) >= 0.99999
    torch.testing.assert_close(res.eigenvalues.double(), vals, rtol=1e-4, atol=1e-6)
    assert (res.eigenvalues[:-1] >= res.eigenvalues[1:]).all()


def test_reads_only_upper_triangle():
    a, _ = psd_with_spectrum(SPECTRA["decaying"](60))
    poisoned = a.clone()
    poisoned.tril_(-1).fill_(0)
    poisoned = torch.triu(a) + torch.tril(torch.full_like(a, float("nan")), -1)
    res = topk_eigh(poisoned, 5, tol=1e-8)
    assert torch.isfinite(res.eigenvectors).all()
    assert float(subspace_overlap(res.eigenvectors, exact_top(a, 5)[1])) > 0.99999


def test_centering_equals_centered_matrix():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(500, 30, generator=g, dtype=torch.float64) * torch.linspace(0.2, 4, 30, dtype=torch.float64) + 100
    s = torch.full((30,), 99.0, dtype=torch.float64)  # accumulate about a shift near the mean
    y = x - s
    raw, colsum, n = y.T @ y, y.sum(0), torch.tensor(500)
    centred = (x - x.mean(0)).T @ (x - x.mean(0))
    res = topk_eigh(raw, 4, colsum=colsum, count=n, tol=1e-9)
    vals, vecs = exact_top(centred, 4)
    torch.testing.assert_close(res.eigenvalues, vals, rtol=1e-8, atol=1e-8)
    assert float(subspace_overlap(res.eigenvectors, vecs)) > 1 - 1e-10


def test_warm_start_beats_cold_start():
    a, _ = psd_with_spectrum([1.0 / (i + 1) ** 0.5 for i in range(200)], dtype=torch.float32)
    exact = exact_top(a, 10)[1]
    cold = topk_eigh(a, 10, iters=2, return_basis=True)
    warm = topk_eigh(a, 10, iters=2, init=cold.basis)
    assert float(subspace_overlap(warm.eigenvectors, exact)) > float(subspace_overlap(cold.eigenvectors, exact))


def test_exact_when_block_covers_space_and_rank_deficient():
    x = torch.randn(3, 10, dtype=torch.float64)  # rank 3
    a = x.T @ x
    res = topk_eigh(a, 5, oversample=8)  # b = min(10, 13) = 10: dense path
    vals, vecs = exact_top(a, 3)
    torch.testing.assert_close(res.eigenvalues[:3], vals)
    assert float(subspace_overlap(res.eigenvectors[:3], vecs)) > 1 - 1e-12
    assert (res.eigenvalues[3:] >= 0).all()


def test_deterministic_signs_and_seed():
    a, _ = psd_with_spectrum(SPECTRA["decaying"](50))
    r1 = topk_eigh(a, 6, seed=1, iters=3)
    r2 = topk_eigh(a, 6, seed=1, iters=3)
    assert torch.equal(r1.eigenvectors, r2.eigenvectors)
    v = r1.eigenvectors
    top = v.gather(1, v.abs().argmax(1, keepdim=True))
    assert (top > 0).all()
    assert torch.equal(fix_signs(-v), v)
    torch.testing.assert_close(component_cosines(v, -v), torch.ones(6, dtype=torch.float32))


@pytest.mark.parametrize("kwargs,match", [
    (dict(k=0), "k must be"), (dict(k=11), "k must be"),
    (dict(colsum=torch.zeros(10, dtype=torch.float64)), "together"),
    (dict(init=torch.zeros(3, 9, dtype=torch.float64)), "init must be"),
])
def test_bad_arguments(kwargs, match):
    a = torch.eye(10, dtype=torch.float64)
    k = kwargs.pop("k", 3)
    with pytest.raises(ValueError, match=match):
        topk_eigh(a, k, **kwargs)
    with pytest.raises(TypeError, match="float32 or float64"):
        topk_eigh(a.half(), 3)
