"""``topk_eigh_batched``: :func:`eva_kernels.topk_eigh` for many matrices of one size at once.

The same algorithm and arguments as :mod:`eva_kernels.ops.topk_eigh` (randomized subspace
iteration, warm start, Rayleigh-Ritz; fixed ``iters``, no ``tol``), applied to ``G`` matrices of
the same ``d`` in one set of batched calls: per chunk of matrices, one symmetrisation of the
stacked upper triangles, then per iteration one batched product ``A Q`` (``torch.bmm``: cuBLAS /
BLAS batched GEMM), one batched centring, one batched orthonormalisation; one batched ``eigh``
of the ``(G, b, b)`` Rayleigh quotients. The number of kernel launches per call depends on the
number of chunks, not on ``G``: an engine step over the 128 shared-input groups of a 32-layer
Llama (two widths) is a few dozen launches instead of thousands.

Memory: a chunk holds the symmetric copies of its matrices, ``G_chunk * d^2 * 4`` bytes (fp32);
chunks are cut so that this stays within ``max_batch_bytes`` (at least one matrix per chunk).
Building the copies is one pass over each statistic (one large copy kernel per matrix); that
pass is the price of batching: on a CPU, where the solves are FLOP-bound rather than
launch-bound, it makes batched solves slower than per-matrix ones (see ``EvaOptions``).

Results equal per-matrix :func:`eva_kernels.topk_eigh` calls with the same ``seed`` (the same
Gaussian test columns for every matrix) up to floating-point summation order; they are not
bit-identical (the batched GEMM blocks differently). The products are computed by PyTorch on
the full symmetric copy, whatever backend the per-matrix solver would use.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor

from ..linalg import orthonormalization_for
from ..subspace import fix_signs
from .batch_operand import symmetric_stack
from .subspace_batch import SubspaceBatch, solve_batches
from .topk_eigh import EighBasis, _check_args

#: Default bound on the transient memory of one chunk (bytes).
DEFAULT_MAX_BATCH_BYTES = 1 << 30


def _check(covs, k, colsums, counts, inits, oversample, iters) -> None:
    """Each matrix's arguments as :func:`topk_eigh` checks them, and that they form one batch."""
    if len(covs) == 0:
        raise ValueError("topk_eigh_batched: covs is empty")
    if (colsums is None) != (counts is None):
        raise ValueError("topk_eigh_batched: pass colsums and counts together (centring) or neither")
    for name, seq in (("colsums", colsums), ("counts", counts), ("inits", inits)):
        if seq is not None and len(seq) != len(covs):
            raise ValueError(f"topk_eigh_batched: {name} has {len(seq)} entries for {len(covs)} matrices")
    first = covs[0]
    for i, c in enumerate(covs):
        try:
            _check_args(c, k, None if colsums is None else colsums[i], None if counts is None else counts[i],
                        None if inits is None else inits[i], oversample, iters)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"topk_eigh_batched: matrix {i} (covs[{i}], inits[{i}], ...): {exc}") from None
        if c.shape != first.shape or c.dtype != first.dtype or c.device != first.device:
            raise ValueError(f"topk_eigh_batched: covs[{i}] is {c.dtype} {tuple(c.shape)} on {c.device}, covs[0] "
                             f"{first.dtype} {tuple(first.shape)} on {first.device}: batch matrices of one "
                             "shape, dtype and device")


def topk_eigh_batched(covs: Sequence[Tensor], k: int, *, colsums: Optional[Sequence[Tensor]] = None,
                      counts: Optional[Sequence[Tensor]] = None, inits: Optional[Sequence[Optional[Tensor]]] = None,
                      oversample: int = 8, iters: int = 2, seed: int = 0, orthonormalization: str = "auto",
                      max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
                      reduce: Optional[Callable[[Tensor], Tensor]] = None,
                      rayleigh_ritz: str = "device") -> List[EighBasis]:
    """Top-``k`` eigenpairs of each of ``G`` symmetric PSD matrices given by their upper triangles.

    Args:
        covs: ``G`` tensors (d, d), all float32 or all float64 on one device; upper triangles read.
        k: eigenpairs per matrix, ``1 <= k <= d``.
        colsums, counts: optional centring per matrix: ``sym(cov_g) - c_g c_g^T / n_g``
            (``colsums[g]`` (d,), ``counts[g]`` 0-d, clamped to >= 1).
        inits: per matrix, ``None`` or (m, d) rows of a previous estimate (warm start).
        oversample, iters, seed, orthonormalization: as in :func:`eva_kernels.topk_eigh`.
        max_batch_bytes: bound on a chunk's transient memory (see the module docstring).
        reduce: as in :func:`eva_kernels.topk_eigh` (matrices held in parts, products summed):
            called once per iteration and chunk on the stacked products (G, d, b), so a
            distributed solve of G matrices is one all-reduce per iteration, not G.
        rayleigh_ritz: where the small ``(b, b)`` eigenproblems are solved: ``"device"``
            (``torch.linalg.eigh`` per chunk) or ``"host"`` (every chunk's in one transfer, in
            float64); see :mod:`eva_kernels.ops.subspace_batch`.

    Returns:
        one :class:`~eva_kernels.ops.topk_eigh.EighBasis` per matrix, in order: eigenvalues (k,)
        descending and clamped at 0, eigenvectors (k, d) with deterministic signs, the Ritz basis
        (b, d) and values (b,) for the next warm start.
    """
    _check(covs, k, colsums, counts, inits, oversample, iters)
    d, device = covs[0].shape[0], covs[0].device
    b = min(d, k + oversample)
    method = orthonormalization_for(device.type, orthonormalization)
    per = max(1, int(max_batch_bytes // max(1, d * d * covs[0].element_size())))
    if b == d:  # the block is the whole space: exact dense eigh of the centred matrices
        out: List[EighBasis] = []
        for lo in range(0, len(covs), per):
            hi = min(len(covs), lo + per)
            out.extend(_dense(covs[lo:hi], k, None if colsums is None else colsums[lo:hi],
                              None if counts is None else counts[lo:hi], reduce))
        return out
    batches = [SubspaceBatch(covs[lo:lo + per], k, colsums=None if colsums is None else colsums[lo:lo + per],
                             counts=None if counts is None else counts[lo:lo + per],
                             inits=None if inits is None else inits[lo:lo + per], oversample=oversample,
                             iters=iters, seed=seed, method=method, reduce=reduce)
               for lo in range(0, len(covs), per)]
    solve_batches(batches, rayleigh_ritz)
    return [r for batch in batches for r in batch.results]


def _dense(covs, k, colsums, counts, reduce) -> List[EighBasis]:
    """Exact eigenpairs when the block is the whole space (``b == d``): one batched ``eigh``."""
    a = symmetric_stack(covs)
    dtype, device = a.dtype, a.device
    if reduce is not None:
        a = reduce(a)
    if colsums is not None:
        c = torch.stack([x.to(dtype) for x in colsums])
        n = torch.stack([torch.as_tensor(x, device=device).to(dtype).reshape(()) for x in counts]).clamp_min(1)
        a = a - c.unsqueeze(2) * c.unsqueeze(1) / n.reshape(-1, 1, 1)
    vals, vecs = torch.linalg.eigh(0.5 * (a + a.mT))
    vals, vecs = vals.flip(-1).clamp_min(0), vecs.flip(-1)
    rows = fix_signs(vecs.mT.contiguous())
    return [EighBasis(vals[i, :k], rows[i, :k], rows[i], vals[i]) for i in range(vals.shape[0])]
