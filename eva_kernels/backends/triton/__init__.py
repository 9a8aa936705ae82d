"""The ``triton`` backend: the ``cov_update`` kernel and the eigensolver's products in Triton.

Importing this package registers the backend; when ``triton`` itself is not installed the
import fails with ``ModuleNotFoundError(name="triton")``, which :mod:`eva_kernels.backends`
records as the reason the backend is unavailable.

Availability: CUDA tensors when ``torch.cuda.is_available()``; CPU tensors only when the
kernels were decorated under ``TRITON_INTERPRET=1`` (set before ``eva_kernels`` is imported;
see :data:`.config.INTERPRET`). ``auto`` picks it first on CUDA and never on CPU.

The launchers are called directly (not through the ``eva_kernels::cov_update`` dispatcher op)
and are hidden from ``torch.compile`` (a graph break: autotuning restores its outputs between
trials, which tracing cannot express).
"""
from __future__ import annotations

from functools import partial

import torch
import triton  # noqa: F401  (ModuleNotFoundError(name='triton') when absent: recorded upstream)

from ..._registry import Backend, EigenProducts, register_backend
from .config import FP32_DOT_PRECISION, INTERPRET, why_not
from .cov_update_kernel import cov_update_triton
from .eigen_steps import operator_matmul, symmetrize
from .upper_bmm import in_place_operator_matmul, prepare_in_place

TRITON = Backend(
    name="triton",
    priority={"cuda": 30},
    why_not=why_not,
    cov_update=torch.compiler.disable(cov_update_triton),
    cov_update_fast=torch.compiler.disable(partial(cov_update_triton, precision="fast")),
    topk_eigh=EigenProducts(prepare=prepare_in_place, matmul=torch.compiler.disable(in_place_operator_matmul)),
    info={"fp32_dot": FP32_DOT_PRECISION, "interpreter": str(INTERPRET)},
)
register_backend(TRITON)

__all__ = ["TRITON", "cov_update_triton", "symmetrize", "operator_matmul", "INTERPRET", "FP32_DOT_PRECISION"]
