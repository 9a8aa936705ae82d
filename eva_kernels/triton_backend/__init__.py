"""Triton backend of eva_kernels: ``cov_update`` kernel and the eigensolver's heavy steps.

Importing this package registers ``"triton"`` implementations of the ops ``"cov_update"`` and
``"eigen_steps"`` with :mod:`eva_kernels._backends`. If ``triton`` itself is not installed the
import fails with ``ModuleNotFoundError(name="triton")``, which
:mod:`eva_kernels._optional_backends` records as the reason the backend is unavailable.

Availability: CUDA tensors when ``torch.cuda.is_available()``; CPU tensors only when the
kernels were decorated under ``TRITON_INTERPRET=1`` (the variable must be set before
``eva_kernels`` is imported; see :data:`._config.INTERPRET`).
"""
from __future__ import annotations

import triton  # noqa: F401  (ModuleNotFoundError(name='triton') when absent: recorded upstream)

from .. import _backends
from ._config import FP32_DOT_PRECISION, INTERPRET, why_not
from .cov_update_kernel import cov_update_triton
from .eigen_steps import TRITON_EIGEN_STEPS

_backends.register("cov_update", "triton", cov_update_triton, why_not)
_backends.register("eigen_steps", "triton", TRITON_EIGEN_STEPS, why_not)

__all__ = ["cov_update_triton", "TRITON_EIGEN_STEPS", "INTERPRET", "FP32_DOT_PRECISION", "why_not"]
