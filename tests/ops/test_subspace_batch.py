"""``SubspaceBatch`` / ``solve_batches``: several widths iterated together, the small
eigenproblems on the device or on the host (one transfer per round), streaming or polishing.

The polish is checked against the float64 exact eigenpairs (every wanted residual within
``tol * theta_1``, eigenvalues and subspaces), against per-matrix ``topk_eigh(tol=...)``, and the
host Rayleigh-Ritz against the device one; the host residual (from the Gram matrix) against the
direct one; and the syncs: one per round for every width together.
"""
from __future__ import annotations

import pytest
import torch

from eva_kernels import SubspaceBatch, solve_batches, subspace_overlap, topk_eigh, topk_eigh_step
from eva_kernels.launches import LaunchCounter
from helpers import DEVICE


def _psd(g, d, decay):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    lam = decay ** torch.arange(d, dtype=torch.float64)
    a = (q * lam) @ q.T
    return a + torch.tril(torch.randn(d, d, generator=g, dtype=torch.float64), -1) * 100  # never read


def _case(seed=0, dtype=torch.float32, centred=False):
    """Two widths: 5 matrices of d=48 and 3 of d=30, slowly decaying spectra, warm starts for some."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for d, n in ((48, 5), (30, 3)):
        covs = [_psd(g, d, 0.9 - 0.02 * i).to(dtype).to(DEVICE) for i in range(n)]
        colsums = [torch.randn(d, generator=g, dtype=torch.float64).to(dtype).to(DEVICE) for _ in range(n)] \
            if centred else None
        counts = [torch.tensor(40.0 + i, device=DEVICE) for i in range(n)] if centred else None
        inits = [torch.randn(4, d, generator=g).to(dtype).to(DEVICE) if i % 2 else None for i in range(n)]
        out.append((covs, colsums, counts, inits))
    return out


def _exact(cov, colsum, count):
    a = torch.triu(cov.double()) + torch.triu(cov.double(), 1).T
    if colsum is not None:
        a = a - torch.outer(colsum.double(), colsum.double()) / max(float(count), 1.0)
    vals, vecs = torch.linalg.eigh(a)
    return a, vals.flip(0), vecs.flip(1).T


def _batches(case, k=4, tol=1e-4, iters=1, max_iters=200, seed=3):
    return [SubspaceBatch(covs, k, colsums=cs, counts=ns, inits=inits, oversample=6, iters=iters, seed=seed,
                          method="householder", tol=tol, max_iters=max_iters)
            for covs, cs, ns, inits in case]


@pytest.mark.parametrize("rayleigh_ritz", ["device", "host"])
@pytest.mark.parametrize("centred", [False, True], ids=["raw", "centred"])
def test_polish_meets_the_tolerance_against_the_exact_eigenpairs(rayleigh_ritz, centred):
    case = _case(1, torch.float64, centred)
    batches = _batches(case, tol=1e-6)
    rounds = solve_batches(batches, rayleigh_ritz)
    assert rounds > 1
    for batch, (covs, colsums, counts, _) in zip(batches, case):
        for i, res in enumerate(batch.results):
            a, vals, vecs = _exact(covs[i].cpu(), None if colsums is None else colsums[i].cpu(),
                                   None if counts is None else counts[i].cpu())
            v = res.eigenvectors.double().cpu()
            theta = res.eigenvalues.double().cpu()
            resid = (v @ a - theta[:, None] * v).norm(dim=1)
            assert (resid <= 1e-6 * theta[0] * 1.01).all(), resid
            torch.testing.assert_close(theta, vals[:4].clamp_min(0), rtol=1e-6, atol=1e-9)
            assert float(subspace_overlap(v, vecs[:4])) > 1 - 1e-6


def test_host_and_device_rayleigh_ritz_agree_and_match_per_matrix_polish():
    case = _case(2)
    host, device = _batches(case), _batches(case)
    solve_batches(host, "host")
    solve_batches(device, "device")
    for hb, db, (covs, _, _, inits) in zip(host, device, case):
        for i, (h, dv) in enumerate(zip(hb.results, db.results)):
            ref = topk_eigh(covs[i], 4, init=inits[i], oversample=6, iters=1, seed=3, tol=1e-4, max_iters=200,
                            backend="torch", orthonormalization="householder")
            for res in (h, dv):
                torch.testing.assert_close(res.eigenvalues, ref.eigenvalues, rtol=2e-4, atol=1e-6)
                assert float(subspace_overlap(res.eigenvectors.double(), ref.eigenvectors.double())) > 1 - 1e-5


def test_streaming_batches_equal_topk_eigh_with_fixed_iterations():
    case = _case(3)
    for mode in ("device", "host"):
        batches = _batches(case, tol=None, iters=3)
        assert solve_batches(batches, mode) == 3
        for batch, (covs, _, _, inits) in zip(batches, case):
            for i, res in enumerate(batch.results):
                ref = topk_eigh_step(covs[i], 4, init=inits[i], oversample=6, iters=3, seed=3, return_basis=True,
                                     backend="torch", orthonormalization="householder")
                torch.testing.assert_close(res.eigenvalues, ref.eigenvalues, rtol=1e-4, atol=1e-6)
                assert res.basis.shape == ref.basis.shape == (10, covs[i].shape[0])


def test_the_cap_finishes_every_matrix():
    batches = _batches(_case(4), tol=1e-12, max_iters=3)  # unreachable in fp32
    assert solve_batches(batches, "host") == 3
    assert all(r is not None for b in batches for r in b.results) and not any(b.running for b in batches)


@pytest.mark.parametrize("rayleigh_ritz", ["device", "host"])
def test_one_sync_per_round_for_every_width(rayleigh_ritz):
    batches = _batches(_case(5))
    with LaunchCounter() as count:
        rounds = solve_batches(batches, rayleigh_ritz)
    widths = len(batches)
    transfers = count.sync_ops["_to_copy"]
    # a Rayleigh-Ritz is due in the first round, then every krylov_depth rounds
    if rayleigh_ritz == "host":
        assert 1 <= count.syncs == transfers <= rounds  # the eigh run on the host copies: not device work
    else:  # one eigh per width and due round, and the verdicts' transfer while some still run
        assert 1 <= count.sync_ops["_linalg_eigh"] <= widths * rounds  # widths finish at different rounds
        assert transfers <= rounds


def test_rayleigh_ritz_is_checked():
    with pytest.raises(ValueError, match="rayleigh_ritz must be one of"):
        solve_batches(_batches(_case(6)), "gpu")


def test_device_eigh_that_fails_falls_back_to_the_host(monkeypatch):
    """A CUDA / cuSOLVER that cannot run the batched ``eigh``: the round goes to the host route,
    with a warning and the reason on every batch, and the answers equal the host route's."""
    case = _case(2)
    reference = _batches(case)
    solve_batches(reference, "host")
    real_eigh = torch.linalg.eigh

    def failing(a, *args, **kwargs):
        if a.dtype == torch.float32:  # the device route (fp32 statistics); the host route is float64
            raise RuntimeError("cusolver error: CUSOLVER_STATUS_NOT_SUPPORTED, when calling `syevjBatched`")
        return real_eigh(a, *args, **kwargs)
    monkeypatch.setattr(torch.linalg, "eigh", failing)
    batches = _batches(case)
    with pytest.warns(UserWarning, match=r"failed on the device \(RuntimeError: cusolver error"):
        solve_batches(batches, "device")
    for ref, got in zip(reference, batches):
        assert got.ritz_fallback.startswith("RuntimeError: cusolver error")
        for a, b in zip(ref.results, got.results):
            assert torch.equal(a.eigenvalues, b.eigenvalues) and torch.equal(a.eigenvectors, b.eigenvectors)


def test_device_eigh_failing_on_non_finite_matrices_is_not_a_fallback(monkeypatch):
    case = _case(3)
    case[0][0][1][0, 0] = float("nan")

    def failing(a, *args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
    monkeypatch.setattr(torch.linalg, "eigh", failing)
    with pytest.raises(torch.linalg.LinAlgError, match="failed to converge"):
        solve_batches(_batches(case), "device")
