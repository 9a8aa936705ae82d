"""eva_kernels: the compute layer of EVA, model-agnostic ops on plain tensors.

* :func:`cov_update` — fused masked, shifted activation-covariance update (fp32 accumulation);
  also the dispatcher op ``torch.ops.eva_kernels.cov_update``. ``precision="fast"``: shifted
  16-bit rows at one tensor-core product each; :func:`moment_ratio` and
  :data:`FAST_RATIO_LIMIT` say when its error stays under 1e-4.
* :func:`topk_eigh` — randomized, warm-startable top-k eigensolver for PSD matrices, to a
  residual tolerance by default; :func:`topk_eigh_step` — its cheap fixed-iteration tracking
  step (warm-started, no tolerance, no host sync).
* :func:`topk_eigh_batched` — the same for many matrices of one size in batched calls.
* :class:`SubspaceBatch`, :func:`solve_batches` — many matrices of several sizes iterated
  together, every round's small eigenproblems in one place (``rayleigh_ritz="host"``: one host
  synchronisation per round), streaming (``iters``) or polishing to a tolerance (``tol``); on
  CUDA their products read each statistic's upper triangle in place (no d x d copy,
  :mod:`eva_kernels.ops.batch_operand`).
* :func:`available_backends`, :func:`resolve_backend` — which of ``torch`` / ``triton`` /
  ``cpp`` can run an op here, and which one a call will use (:class:`Backend`).
* :mod:`eva_kernels.block_krylov` — the restarted block Krylov cycles of a polish (``tol``).
* :mod:`eva_kernels.linalg` — orthonormalisation and dense helpers shared by every backend.
* :mod:`eva_kernels.testing` — the float64 specifications.

Backends are chosen per call (``backend=``), by the ``EVA_BACKEND`` environment variable, or by
``auto`` (highest priority available for the tensor's device); a named backend that cannot
run raises :class:`BackendUnavailableError` with the fix.
"""
from ._version import __version__
from ._registry import (BACKEND_NAMES, Backend, BackendUnavailableError, EigenProducts,
                        available_backends, get_backend, register_backend, resolve as resolve_backend)
from .ops.cov_update import FAST_RATIO_LIMIT, cov_update, moment_ratio, symmetric_from_upper, symmetrize_
from .ops.topk_eigh import EighBasis, EighResult, topk_eigh, topk_eigh_step
from .ops.topk_eigh_batched import topk_eigh_batched
from .ops.batch_operand import PRODUCTS, resolve_products
from .ops.subspace_batch import RAYLEIGH_RITZ, SubspaceBatch, solve_batches
from .block_krylov import krylov_depth_for
from .linalg import ORTHONORMALIZATIONS, orthonormalization_for, orthonormalize
from .subspace import component_cosines, fix_signs, subspace_overlap
from . import backends  # noqa: F401  (registers torch, and triton / cpp when importable)

__all__ = [
    "cov_update", "moment_ratio", "FAST_RATIO_LIMIT", "topk_eigh", "topk_eigh_step", "topk_eigh_batched", "SubspaceBatch", "solve_batches", "RAYLEIGH_RITZ", "PRODUCTS", "resolve_products", "available_backends", "resolve_backend", "get_backend", "register_backend", "Backend",
    "EigenProducts", "BackendUnavailableError", "BACKEND_NAMES", "symmetrize_", "symmetric_from_upper", "component_cosines",
    "subspace_overlap", "fix_signs", "orthonormalize", "orthonormalization_for", "ORTHONORMALIZATIONS",
    "EighResult", "EighBasis", "krylov_depth_for", "__version__",
]
