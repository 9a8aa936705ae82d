"""``topk_eigh_batched`` equals per-matrix ``topk_eigh`` (same seed, same warm starts) and the
exact eigenpairs, in chunks of any size, with and without centring; bad arguments raise."""
from __future__ import annotations

import pytest
import torch

import eva_kernels
from eva_kernels import subspace_overlap, topk_eigh_batched, topk_eigh_step
from helpers import DEVICE


def _psd(g, d, decay, dtype):
    """A PSD matrix with eigenvalues decaying like decay^i, stored with garbage below the diagonal."""
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    lam = decay ** torch.arange(d, dtype=torch.float64)
    a = (q * lam) @ q.T
    a = a + torch.tril(torch.randn(d, d, generator=g, dtype=torch.float64), -1) * 100  # never read
    return a.to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("centred", [False, True], ids=["raw", "centred"])
@pytest.mark.parametrize("method", ["householder", "cholesky_qr3"])
@pytest.mark.parametrize("chunk_bytes", [1, 1 << 30], ids=["chunk1", "one-chunk"])
def test_equals_per_matrix_solves(dtype, centred, method, chunk_bytes):
    g = torch.Generator().manual_seed(1)
    d, k, G = 60, 5, 4
    covs = [_psd(g, d, 0.7 + 0.05 * i, dtype) for i in range(G)]
    colsums = [torch.randn(d, generator=g, dtype=torch.float64).to(dtype).to(DEVICE) for _ in range(G)] if centred else None
    counts = [torch.tensor(50.0 + i, device=DEVICE) for i in range(G)] if centred else None
    inits = [None, torch.randn(3, d, generator=g).to(dtype).to(DEVICE), None, None]
    out = topk_eigh_batched(covs, k, colsums=colsums, counts=counts, inits=inits, oversample=6, iters=3, seed=7,
                            orthonormalization=method, max_batch_bytes=chunk_bytes)
    assert len(out) == G
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    for i in range(G):
        ref = topk_eigh_step(covs[i], k, colsum=None if colsums is None else colsums[i],
                             count=None if counts is None else counts[i], init=inits[i], oversample=6, iters=3, seed=7,
                             return_basis=True, orthonormalization=method, backend="torch")
        r = out[i]
        assert r.eigenvalues.shape == (k,) and r.eigenvectors.shape == (k, d) and r.basis.shape == (k + 6, d)
        assert r.eigenvalues.dtype == dtype
        torch.testing.assert_close(r.eigenvalues, ref.eigenvalues, rtol=tol, atol=tol)
        torch.testing.assert_close(r.eigenvectors, ref.eigenvectors, rtol=tol * 10, atol=tol * 10)


def test_matches_exact_eigenpairs_and_warm_start_helps():
    g = torch.Generator().manual_seed(2)
    d, k = 80, 4
    covs = [_psd(g, d, 0.5, torch.float64) for _ in range(3)]
    cold = topk_eigh_batched(covs, k, oversample=8, iters=2, seed=0)
    warm = cold
    for step in range(6):  # warm-started rounds: the subspace iteration goes on across calls
        warm = topk_eigh_batched(covs, k, oversample=8, iters=2, seed=step + 1, inits=[r.basis for r in warm])
    for cov, c, w in zip(covs, cold, warm):
        lam, vec = torch.linalg.eigh(torch.triu(cov) + torch.triu(cov, 1).T)
        exact = vec.flip(1)[:, :k].T
        assert float(subspace_overlap(w.eigenvectors, exact)) >= float(subspace_overlap(c.eigenvectors, exact)) - 1e-12
        assert float(subspace_overlap(w.eigenvectors, exact)) > 1 - 1e-8
        torch.testing.assert_close(w.eigenvalues, lam.flip(0)[:k], rtol=1e-8, atol=1e-10)


def test_whole_space_block_is_exact():
    g = torch.Generator().manual_seed(3)
    covs = [_psd(g, 6, 0.5, torch.float64) for _ in range(2)]
    out = topk_eigh_batched(covs, 3, oversample=8)
    for cov, r in zip(covs, out):
        lam = torch.linalg.eigvalsh(torch.triu(cov) + torch.triu(cov, 1).T).flip(0)
        torch.testing.assert_close(r.eigenvalues, lam[:3])
        assert r.basis.shape == (6, 6)


def test_bad_arguments_raise_with_the_index():
    a = torch.eye(8, device=DEVICE)
    with pytest.raises(ValueError, match="empty"):
        topk_eigh_batched([], 2)
    with pytest.raises(ValueError, match=r"covs\[1\]"):
        topk_eigh_batched([a, 2 * a, torch.eye(9, device=DEVICE)][::2], 2)  # the 9 x 9 one is covs[1]
    with pytest.raises(ValueError, match=r"covs\[1\].*float64"):
        topk_eigh_batched([a, a.double()], 2)
    with pytest.raises(ValueError, match="k must be"):
        topk_eigh_batched([a], 9)
    with pytest.raises(ValueError, match="together"):
        topk_eigh_batched([a], 2, colsums=[torch.zeros(8, device=DEVICE)])
    with pytest.raises(ValueError, match=r"inits\[0\]"):
        topk_eigh_batched([a], 2, inits=[torch.zeros(2, 7, device=DEVICE)])
    assert eva_kernels.topk_eigh_batched is topk_eigh_batched
