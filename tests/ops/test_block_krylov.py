"""The restarted block Krylov polish (``krylov_depth``): its pieces and its answers.

* ``extend_basis``: the new block is orthonormal and orthogonal to the basis, also when the
  Krylov space has reached an invariant subspace (a block inside ``span(K)``, zero columns);
* ``residual_norms``: the float64 formula from ``(T, G, M)`` equals the direct residual of the
  stored fp32 vectors, and the ``M`` term is what lets fp32 polishes pass a 1e-5 tolerance;
* ``topk_eigh`` / ``SubspaceBatch`` with ``tol``: every wanted residual within ``tol * theta_1``
  against the float64 eigenpairs, on a flat spectrum, with far fewer products than plain
  subspace iteration (``krylov_depth=1``), on both Rayleigh-Ritz routes; each result reports
  its worst wanted residual (``EighBasis.residual``), converged or stopped at the cap.
"""
from __future__ import annotations

import pytest
import torch

from eva_kernels import SubspaceBatch, solve_batches, subspace_overlap, topk_eigh
from eva_kernels.block_krylov import (extend_basis, krylov_depth_for, residual_norms, ritz_terms,
                                      usable_depth)
from helpers import DEVICE


def _orthonormal(g, d, n, dtype):
    q, _ = torch.linalg.qr(torch.randn(d, n, generator=g, dtype=torch.float64))
    return q.to(dtype)


def _check_extension(basis, q, dtype):
    eps = 5e-6 if dtype == torch.float32 else 1e-9  # cholesky_qr3 tilts by its 1e-10 Gaussian
    k = torch.cat([basis, q], -1).double()
    err = (k.mT @ k - torch.eye(k.shape[-1], dtype=torch.float64)).abs().max()
    assert float(err) <= eps, float(err)


@pytest.mark.parametrize("method", ["householder", "cholesky_qr3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extension_is_orthonormal_and_orthogonal_to_the_basis(method, dtype):
    g = torch.Generator().manual_seed(0)
    basis = _orthonormal(g, 90, 30, dtype)
    y = torch.randn(90, 10, generator=g, dtype=torch.float64).to(dtype)
    _check_extension(basis, extend_basis(basis, y, method), dtype)


@pytest.mark.parametrize("method", ["householder", "cholesky_qr3"])
@pytest.mark.parametrize("case", ["inside_span", "some_inside", "zero_columns"])
def test_extension_survives_an_invariant_subspace(method, case):
    """A block (nearly) inside span(K): the fixed Gaussian fill supplies the missing directions
    (without it, Householder QR of zero columns returns coordinate vectors, inside a coordinate
    basis: orthogonality error 1)."""
    g = torch.Generator().manual_seed(1)
    dtype = torch.float32
    basis = _orthonormal(g, 72, 36, dtype)
    y = basis @ torch.randn(36, 12, generator=g).to(dtype)
    if case == "some_inside":
        y[:, :4] = torch.randn(72, 4, generator=g).to(dtype)
    elif case == "zero_columns":  # e.g. features with no variance: a coordinate basis
        basis = torch.eye(72, dtype=dtype)[:, :36]
        y = torch.zeros(72, 12, dtype=dtype)
        y[40:, :4] = torch.randn(32, 4, generator=g).to(dtype)
    _check_extension(basis, extend_basis(basis, y, method), dtype)


def test_batched_extension_is_per_matrix():
    g = torch.Generator().manual_seed(2)
    basis = torch.stack([_orthonormal(g, 50, 20, torch.float64) for _ in range(3)])
    y = torch.randn(3, 50, 8, generator=g, dtype=torch.float64)
    q = extend_basis(basis, y, "householder")
    for i in range(3):
        _check_extension(basis[i], q[i], torch.float64)


def test_residual_formula_equals_the_direct_residual_of_stored_vectors():
    g = torch.Generator().manual_seed(3)
    d, n, k = 60, 16, 5
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    a = a @ a.T
    # fp32 basis, orthonormal only to ~1e-4 (exaggerated), its fp32 products
    basis = (_orthonormal(g, d, n, torch.float64) + 1e-4 * torch.randn(d, n, generator=g, dtype=torch.float64)).float()
    images = (a @ basis.double()).float()
    t, gram, m = ritz_terms(basis, images)
    theta, w = torch.linalg.eigh(t)
    theta, w = theta.flip(-1), w.flip(-1)
    resid = residual_norms(theta, w, t, gram, m, k)
    direct = (images.double() @ w[:, :k] - (basis.double() @ w[:, :k]) * theta[:k]).norm(dim=0)
    torch.testing.assert_close(resid, direct, rtol=1e-6, atol=1e-9 * float(theta[0]))
    without_m = residual_norms(theta, w, t, gram, torch.eye(n, dtype=torch.float64), k)
    assert float((without_m - direct).abs().max()) > 100 * float((resid - direct).abs().max())


def test_depth_is_resolved_and_capped():
    assert krylov_depth_for("cpu", "auto") == 8 and krylov_depth_for("cuda", "auto") == 4
    assert krylov_depth_for("cpu", 3) == 3
    for bad in (0, -1, 2.5, "deep", True):
        with pytest.raises(ValueError, match="krylov_depth must be 'auto' or an int >= 1"):
            krylov_depth_for("cpu", bad)
    assert usable_depth(4096, 40, 8) == 8
    assert usable_depth(72, 12, 8) == 3       # 36 columns: half of the space
    assert usable_depth(40, 16, 8) == 1       # no room: plain subspace iteration


def _flat(g, d, dtype):
    """A spectrum as flat as random-weight activations': lambda_8 / lambda_17 ~ 1.03."""
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    lam = 1.0 / (1.0 + 0.004 * torch.arange(d, dtype=torch.float64)) ** 0.9
    a = (q * lam) @ q.T
    return a.to(dtype), lam, q.T


def _meets(vals, vecs, a64, lam, exact_vecs, tol, k):
    v, theta = vecs.double().cpu(), vals.double().cpu()
    resid = (v @ a64 - theta[:, None] * v).norm(dim=1)
    assert (resid <= tol * theta[0] * 1.05).all(), resid / theta[0]
    torch.testing.assert_close(theta, lam[:k], rtol=5 * tol, atol=0)
    return float(subspace_overlap(v, exact_vecs[:k]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_topk_eigh_polish_meets_the_tolerance_with_fewer_products(dtype):
    g = torch.Generator().manual_seed(4)
    d, k, tol = 400, 8, 1e-4
    a, lam, vecs = _flat(g, d, dtype)
    products = {}
    for depth in (1, 8):
        n = [0]

        def count(y):
            n[0] += 1
            return y
        res = topk_eigh(a.to(DEVICE), k, oversample=8, iters=1, seed=1, tol=tol, max_iters=2000, reduce=count,
                        krylov_depth=depth, backend="torch")
        _meets(res.eigenvalues, res.eigenvectors, a.double(), lam, vecs, tol, k)
        products[depth] = n[0]
    assert products[8] * 3 <= products[1], products


@pytest.mark.parametrize("rayleigh_ritz", ["device", "host"])
def test_batched_polish_meets_the_tolerance_with_fewer_rounds(rayleigh_ritz):
    g = torch.Generator().manual_seed(5)
    d, k, tol = 400, 8, 1e-4
    mats = [_flat(g, d, torch.float32) for _ in range(3)]
    rounds = {}
    for depth in (1, 8):
        batch = SubspaceBatch([m[0].to(DEVICE) for m in mats], k, oversample=8, iters=1, seed=1,
                              method="householder", tol=tol, max_iters=2000, krylov_depth=depth)
        rounds[depth] = solve_batches([batch], rayleigh_ritz)
        for (a, lam, vecs), res in zip(mats, batch.results):
            _meets(res.eigenvalues, res.eigenvectors, a.double(), lam, vecs, tol, k)
            assert res.basis.shape == (16, d) and res.ritz_values.shape == (16,)
    assert rounds[8] * 3 <= rounds[1], rounds


def test_fp32_host_polish_passes_a_tolerance_below_the_sqrt_eps_floor():
    """Without the ``M = K^T K`` term the host residual of fp32 vectors floors at ~3e-4 theta_1:
    a 2e-5 tolerance would never pass and every matrix would run to the cap."""
    g = torch.Generator().manual_seed(6)
    d, k, tol = 200, 6, 2e-5
    mats = [_flat(g, d, torch.float32) for _ in range(2)]
    batch = SubspaceBatch([m[0].to(DEVICE) for m in mats], k, oversample=8, iters=1, seed=2,
                          method="householder", tol=tol, max_iters=400)
    rounds = solve_batches([batch], "host")
    assert rounds < 400
    for (a, lam, vecs), res in zip(mats, batch.results):
        v, theta = res.eigenvectors.double().cpu(), res.eigenvalues.double().cpu()
        resid = (v @ a.double() - theta[:, None] * v).norm(dim=1)
        assert (resid <= 2 * tol * theta[0]).all(), resid / theta[0]


def _direct_residual(res, a64, k):
    v, theta = res.eigenvectors[:k].double().cpu(), res.eigenvalues[:k].double().cpu()
    return float(((v @ a64 - theta[:, None] * v).norm(dim=1) / theta[0]).max())


@pytest.mark.parametrize("route", ["topk_eigh", "device", "host"])
@pytest.mark.parametrize("max_iters", [400, 3], ids=["converged", "at_the_cap"])
def test_a_polish_reports_its_wanted_residual(route, max_iters):
    """``EighBasis.residual``: the worst wanted residual relative to theta_1 at the last test (the
    screened polish's margins), at most ``tol`` when converged, above it at the cap."""
    g = torch.Generator().manual_seed(7)
    d, k, tol = 300, 5, 1e-4
    mats = [_flat(g, d, torch.float32) for _ in range(2)]
    if route == "topk_eigh":
        results = [topk_eigh(m[0].to(DEVICE), k, oversample=8, iters=1, seed=1, tol=tol, max_iters=max_iters,
                             return_basis=True, backend="torch") for m in mats]
        assert topk_eigh(mats[0][0].to(DEVICE), k, tol=None, return_basis=True, backend="torch").residual is None
    else:
        batch = SubspaceBatch([m[0].to(DEVICE) for m in mats], k, oversample=8, iters=1, seed=1,
                              method="householder", tol=tol, max_iters=max_iters)
        solve_batches([batch], route)
        results = batch.results
    for (a, _, _), res in zip(mats, results):
        direct = _direct_residual(res, a.double(), k)
        assert res.residual == pytest.approx(direct, rel=0.05, abs=2e-6)
        assert (res.residual <= tol) == (max_iters == 400), res.residual


@pytest.mark.parametrize("route", ["device", "host"])
def test_wanted_pairs_limit_the_residual_test(route):
    """``SubspaceBatch(wanted=...)``: the test covers only each matrix's first ``wanted`` pairs (a
    screened polish); those meet ``tol``, the results still hold ``k`` pairs, and fewer wanted
    pairs converge in fewer rounds."""
    g = torch.Generator().manual_seed(8)
    d, k, tol = 300, 8, 1e-4
    mats = [_flat(g, d, torch.float32) for _ in range(2)]
    rounds = {}
    for wanted in (None, [2, 0]):
        batch = SubspaceBatch([m[0].to(DEVICE) for m in mats], k, oversample=8, iters=1, seed=1,
                              method="householder", tol=tol, max_iters=400, wanted=wanted)
        rounds[str(wanted)] = solve_batches([batch], route)
        for j, ((a, lam, vecs), res) in enumerate(zip(mats, batch.results)):
            n = k if wanted is None else wanted[j]
            assert res.eigenvalues.shape == (k,) and res.residual <= tol
            if n:
                assert _direct_residual(res, a.double(), n) <= tol * 1.05
    assert rounds["[2, 0]"] < rounds["None"], rounds
