"""eva_kernels: compute layer of EVA, model-agnostic ops on plain tensors.

* :func:`cov_update` — fused masked, shifted activation-covariance update (fp32 accumulation).
* :func:`topk_eigh` — randomized, warm-startable top-k eigensolver for PSD matrices.
* :func:`available_backends` — which of ``torch`` / ``triton`` / ``cpp`` can run here.

Backends are chosen per call (``backend=``), by the ``EVA_BACKEND`` environment variable,
or automatically (fastest available for the tensor's device).
"""
from ._backends import BackendUnavailableError
from .eigensolver import EighBasis, EighResult, topk_eigh
from .ops import available_backends, cov_update, symmetrize_
from .subspace import component_cosines, fix_signs, subspace_overlap
from . import _optional_backends  # noqa: F401  (registers triton / cpp when importable)

__all__ = [
    "cov_update", "topk_eigh", "available_backends", "symmetrize_", "component_cosines",
    "subspace_overlap", "fix_signs", "EighResult", "EighBasis", "BackendUnavailableError",
]
__version__ = "0.1.0"
