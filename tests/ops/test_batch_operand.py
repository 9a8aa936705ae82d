"""Batched products of statistics known by their upper triangle (:mod:`eva_kernels.ops.batch_operand`):
the Triton ``upper_bmm`` kernel (run by the interpreter on CPU) against the float64 reference on
odd sizes, strides, centring and poisoned lower triangles; ``SubspaceBatch`` with ``products="upper"``
against ``"mirror"`` (streaming, polish with compaction, a distributed-style ``reduce``); no
``d x d`` tensor made by the upper path; the fallback when the kernel cannot run; option checks.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from eva_kernels import SubspaceBatch, resolve_products, solve_batches, subspace_overlap
from eva_kernels.ops import batch_operand
from helpers import DEVICE, UPPER_BMM_MARKS

pytestmark = UPPER_BMM_MARKS


def _stored(g, d, decay=0.9):
    """(fp64 symmetric truth, fp32 stored upper triangle whose lower triangle is garbage)."""
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    truth = (q * decay ** torch.arange(d, dtype=torch.float64)) @ q.T
    junk = torch.tril(torch.randn(d, d, generator=g, dtype=torch.float64), -1) * 1e6  # must never be read
    return truth, (torch.triu(truth) + junk).float().to(DEVICE).contiguous()


def _ref(truths, q, c=None, n=None):
    out = []
    for i, a in enumerate(truths):
        if c is not None:
            a = a - torch.outer(c[i].double().cpu(), c[i].double().cpu()) / max(float(n[i]), 1.0)
        out.append(a @ q[i].double().cpu())
    return torch.stack(out)


@pytest.mark.parametrize("d,b,groups", [(1, 1, 1), (17, 5, 3), (37, 40, 2), (64, 16, 1), (100, 17, 4), (130, 70, 2)])
@pytest.mark.parametrize("centred", [False, True], ids=["raw", "centred"])
def test_upper_bmm_matches_the_float64_reference(d, b, groups, centred):
    from eva_kernels.backends.triton.upper_bmm import addresses, upper_bmm
    g = torch.Generator().manual_seed(d * 7 + b)
    pairs = [_stored(g, d) for _ in range(groups)]
    covs = [s for _, s in pairs]
    q = torch.randn(groups, d, b, generator=g).to(DEVICE)
    c = torch.randn(groups, d, generator=g).to(DEVICE) if centred else None
    n = torch.tensor([3, 0, 7, 5][:groups] * 2, dtype=torch.int64)[:groups].to(DEVICE) if centred else None
    y = upper_bmm(addresses(covs), d, q, c, n)
    ref = _ref([t for t, _ in pairs], q, c, n)
    err = (y.double().cpu() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)
    assert y.shape == (groups, d, b) and y.dtype == torch.float32
    assert err < 2e-6, err


def test_upper_bmm_takes_strided_q_and_checks_shapes():
    from eva_kernels.backends.triton.upper_bmm import addresses, upper_bmm
    g = torch.Generator().manual_seed(0)
    pairs = [_stored(g, 33) for _ in range(3)]
    q = torch.randn(3, 9, 33, generator=g).to(DEVICE).mT  # (3, 33, 9), not contiguous
    y = upper_bmm(addresses([s for _, s in pairs]), 33, q)
    ref = _ref([t for t, _ in pairs], q)
    assert (y.double().cpu() - ref).abs().max() / ref.abs().max() < 2e-6
    with pytest.raises(ValueError, match=r"q must be \(G=3, d=33, b\) fp32"):
        upper_bmm(addresses([s for _, s in pairs]), 33, q.double())


def _batch_case(seed, centred):
    g = torch.Generator().manual_seed(seed)
    pairs = [_stored(g, 45, decay) for decay in (0.6, 0.8, 0.9, 0.95)]  # converge at different rounds
    c = [torch.randn(45, generator=g).to(DEVICE) for _ in pairs] if centred else None
    n = [torch.tensor(30.0 + i, device=DEVICE) for i in range(len(pairs))] if centred else None
    return pairs, c, n


@pytest.mark.parametrize("centred", [False, True], ids=["raw", "centred"])
@pytest.mark.parametrize("tol", [None, 1e-5], ids=["streaming", "polish"])
def test_upper_and_mirror_products_give_the_same_solves(centred, tol):
    pairs, c, n = _batch_case(1, centred)
    covs = [s for _, s in pairs]
    out = {}
    for products in ("mirror", "upper"):
        batch = SubspaceBatch(covs, 4, colsums=c, counts=n, oversample=4, iters=2, seed=5, tol=tol, max_iters=300,
                              krylov_depth=1, products=products)
        assert batch.operand.kind == products
        rounds = solve_batches([batch], "host")
        out[products] = (batch.results, rounds)
    (mirror, r_m), (upper, r_u) = out["mirror"], out["upper"]
    if tol is not None:
        assert r_m == r_u > 2  # the matrices finish at different rounds: the operand was compacted
    for a, b in zip(mirror, upper):
        assert torch.allclose(a.eigenvalues, b.eigenvalues, rtol=1e-4)
        assert subspace_overlap(a.eigenvectors, b.eigenvectors) > 0.9999
    if tol is not None:  # and both are the exact eigenpairs
        for (truth, _), i, res in zip(pairs, range(len(pairs)), upper):
            a = truth - (torch.outer(c[i].double().cpu(), c[i].double().cpu()) / float(n[i]) if centred else 0)
            vals, vecs = torch.linalg.eigh(a)
            assert torch.allclose(res.eigenvalues.double().cpu(), vals.flip(0)[:4], rtol=1e-4)
            assert subspace_overlap(res.eigenvectors.double().cpu(), vecs.flip(1).T[:4]) > 0.9999


def test_reduce_is_applied_before_the_centring():
    """A distributed run sums the products of each rank's part, then centres once with the summed
    column sums: the fused centring of the kernel must not run per part."""
    pairs, c, n = _batch_case(2, centred=True)
    halves = [(s / 2).contiguous() for _, s in pairs]  # each "rank" holds half of every statistic
    full = SubspaceBatch([s for _, s in pairs], 4, colsums=c, counts=n, oversample=4, iters=3, seed=1,
                         products="upper")
    split = SubspaceBatch(halves, 4, colsums=c, counts=n, oversample=4, iters=3, seed=1, products="upper",
                          reduce=lambda y: 2 * y)
    solve_batches([full, split], "host")
    for a, b in zip(full.results, split.results):
        assert torch.allclose(a.eigenvalues, b.eigenvalues, rtol=1e-5)


class _LargestTensor(TorchDispatchMode):
    """The largest tensor any out-of-place dispatched op returned (in-place ops allocate nothing;
    the interpreter's own copy-back of a kernel's arguments is one)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func._schema.is_mutable:
            return out
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_upper_products_make_no_d_by_d_copy():
    """Item 3 of issue 21: a streaming solve of G statistics with "upper" allocates nothing of
    ``d x d`` size (the largest tensors are the (G, d, b) blocks); "mirror" stacks G copies."""
    g = torch.Generator().manual_seed(3)
    d, groups = 96, 3
    covs = [_stored(g, d)[1] for _ in range(groups)]
    seen = {}
    for products in ("mirror", "upper"):
        with _LargestTensor() as spy:
            batch = SubspaceBatch(covs, 4, oversample=4, iters=2, seed=0, products=products)
            solve_batches([batch], "host")
        seen[products] = spy.largest
    assert seen["mirror"] >= groups * d * d
    assert seen["upper"] <= groups * d * 8


def test_a_kernel_that_cannot_run_falls_back_to_mirror_and_says_why(monkeypatch):
    from eva_kernels.backends.triton import upper_bmm as kernel_module

    def broken(*args, **kwargs):
        raise RuntimeError("PTX .version 9.9 does not support .target sm_120")
    pairs, c, n = _batch_case(4, centred=True)
    covs = [s for _, s in pairs]
    good = SubspaceBatch(covs, 4, colsums=c, counts=n, oversample=4, iters=2, seed=5, products="mirror")
    solve_batches([good], "host")
    monkeypatch.setattr(kernel_module, "upper_bmm", broken)
    batch = SubspaceBatch(covs, 4, colsums=c, counts=n, oversample=4, iters=2, seed=5, products="upper")
    with pytest.warns(UserWarning, match=r"products='upper'\) cannot run here \(RuntimeError: PTX"):
        solve_batches([batch], "host")
    assert batch.operand_used.kind == "mirror" and "sm_120" in batch.operand_used.fallback
    for a, b in zip(good.results, batch.results):
        assert torch.equal(a.eigenvalues, b.eigenvalues)


def test_products_option_is_resolved_and_checked():
    cov32 = torch.zeros(8, 8, device=DEVICE)
    expected_auto = "upper" if DEVICE == "cuda" else "mirror"  # CPU results unchanged
    assert resolve_products("auto", [cov32]) == expected_auto
    assert resolve_products("auto", [cov32.double()]) == "mirror"
    with pytest.raises(ValueError, match="products must be one of"):
        resolve_products("fast", [cov32])
    cov64 = torch.eye(8, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match="use products='mirror'"):
        SubspaceBatch([cov64], 2, oversample=1, products="upper")
    batch = SubspaceBatch([cov64], 2, oversample=1, products="mirror")  # the fix the message names
    solve_batches([batch])
    assert torch.allclose(batch.results[0].eigenvalues, torch.ones(2, dtype=torch.float64, device=DEVICE))


def test_symmetric_stack_is_still_importable_from_its_old_place():
    from eva_kernels.ops.subspace_batch import symmetric_stack
    assert symmetric_stack is batch_operand.symmetric_stack


@pytest.mark.skipif(not torch.cuda.is_available(), reason="counts CUDA stream synchronisations")
def test_a_streaming_solve_synchronises_once_on_cuda():
    """On CUDA a streaming solve of several statistics (in-place products, CholeskyQR3, the small
    eigenproblems on the host) synchronises the host once: the transfer of the round's small
    matrices. The address table and the Ritz coefficients travel host-to-device through pinned
    memory (:mod:`eva_kernels.transfer`), which ``torch.cuda.set_sync_debug_mode`` would flag
    otherwise."""
    import warnings
    g = torch.Generator().manual_seed(9)
    covs = [_stored(g, 96)[1].cuda() for _ in range(3)]
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            batch = SubspaceBatch(covs, 4, oversample=4, iters=2, seed=0, method="cholesky_qr3", products="upper")
            solve_batches([batch], "host")
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message).lower()]
    assert len(syncs) == 1, syncs
