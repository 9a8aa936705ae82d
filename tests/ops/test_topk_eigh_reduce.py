"""``topk_eigh(..., reduce=)``: solving for a matrix held in parts, ``A = sum_r sym(C_r) - c c^T / n``,
by summing products instead of matrices (how a distributed run solves).

Each part is solved in its own thread with a reduce that sums the parts' products through a
barrier, exactly as an all-reduce would; every part must return the same eigenpairs as one
solve on the summed matrix, and no reduced tensor may be ``d x d`` unless ``b == d``."""
from __future__ import annotations

import threading

import pytest
import torch

import eva_kernels
from eva_kernels import subspace_overlap, topk_eigh
from helpers import DEVICE, TRITON_MARKS


@pytest.fixture(params=[pytest.param("torch"), pytest.param("triton", marks=TRITON_MARKS)])
def backend(request):
    try:
        eva_kernels.resolve_backend("topk_eigh", DEVICE, request.param)
    except eva_kernels.BackendUnavailableError as exc:
        pytest.skip(str(exc))
    return request.param


class ThreadSum:
    """An all-reduce (sum) among ``n`` threads: each passes its tensor, each gets the sum.

    The threads compute one at a time (``lock``, released only while waiting for the others):
    Triton's CPU interpreter is not thread-safe."""

    def __init__(self, n: int):
        self.n = n
        self.slots = [None] * n
        self.barrier = threading.Barrier(n)
        self.lock = threading.Lock()
        self.shapes = []

    def _wait(self):
        self.lock.release()
        try:
            self.barrier.wait()
        finally:
            self.lock.acquire()

    def reducer(self, i: int):
        def reduce(t):
            self.slots[i] = t.clone()
            self._wait()
            total = sum(self.slots)
            self._wait()  # every thread has read the slots before the next round
            if i == 0:
                self.shapes.append(tuple(t.shape))
            t.copy_(total)
            return t
        return reduce


def parts_of_tokens(d, n_parts, seed=0):
    """Upper-triangle statistics of token blocks with a decaying spectrum and a mean offset:
    (covs, global colsum, global count, the summed cov)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) * torch.logspace(0, -2, d, dtype=torch.float64)
    covs, colsum, count = [], torch.zeros(d, dtype=torch.float64), 0
    for _ in range(n_parts):
        x = torch.randn(40, d, generator=g, dtype=torch.float64) @ mix.T + 3.0
        covs.append(torch.triu(x.T @ x).to(torch.float32).to(DEVICE))
        colsum += x.sum(0)
        count += x.shape[0]
    total = sum(c.double() for c in covs).to(torch.float32)
    return covs, colsum.to(torch.float32).to(DEVICE), torch.tensor(count, device=DEVICE), total


def solve_in_parts(covs, k, backend, **kw):
    comm = ThreadSum(len(covs))
    out = [None] * len(covs)
    errors = []

    def work(i):
        with comm.lock:
            try:
                out[i] = topk_eigh(covs[i], k, backend=backend, reduce=comm.reducer(i), return_basis=True, **kw)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
                comm.barrier.abort()
    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(covs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return out, comm.shapes


@pytest.mark.parametrize("centred", [False, True], ids=["plain", "centred"])
@pytest.mark.parametrize("polish", [False, True], ids=["streaming", "tol"])
def test_parts_equal_one_solve_on_the_sum(backend, centred, polish):
    d, k = 48, 5
    covs, colsum, count, total = parts_of_tokens(d, 3)
    kw = dict(oversample=6, iters=2, seed=7, orthonormalization="householder")
    if centred:
        kw.update(colsum=colsum, count=count)
    kw.update(tol=1e-5, max_iters=40) if polish else kw.update(tol=None)  # tol=None: the streaming step
    ref = topk_eigh(total, k, backend=backend, return_basis=True, **kw)
    parts, shapes = solve_in_parts(covs, k, backend, **kw)
    for res in parts:  # every participant holds the same answer
        torch.testing.assert_close(res.eigenvalues, ref.eigenvalues, rtol=1e-4, atol=1e-4 * float(ref.eigenvalues[0]))
        assert float(subspace_overlap(res.eigenvectors.double().cpu(), ref.eigenvectors.double().cpu())) > 1 - 1e-6
        torch.testing.assert_close(res.basis, parts[0].basis, rtol=0, atol=0)
    assert shapes and all(s == (d, k + 6) for s in shapes), shapes  # only d x b products travel


def test_block_covering_the_space_reduces_the_matrix_itself():
    covs, colsum, count, total = parts_of_tokens(10, 2, seed=1)
    ref = topk_eigh(total, 4, colsum=colsum, count=count, oversample=8)
    parts, shapes = solve_in_parts(covs, 4, "torch", colsum=colsum, count=count, oversample=8)
    assert shapes == [(10, 10)]  # b == d: the exact dense solve of the (small) summed matrix
    for res in parts:
        torch.testing.assert_close(res.eigenvalues, ref.eigenvalues, rtol=1e-5, atol=1e-3)
