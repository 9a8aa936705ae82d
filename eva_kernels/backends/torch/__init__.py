"""The ``torch`` backend: plain PyTorch, runs on every device, no host synchronisation.

It is also the op's default dispatcher kernel (:mod:`eva_kernels.ops.cov_update`) and the
baseline the Triton and C++ kernels are measured against. Math: :mod:`eva_kernels.ops.cov_update`
and :mod:`eva_kernels.ops.topk_eigh`.
"""
from __future__ import annotations

from ..._registry import Backend, EigenProducts, register_backend
from .cov_update import cov_update_torch
from .upper_products import upper_operand, upper_operator_matmul

TORCH = Backend(
    name="torch",
    priority={"cpu": 0, "cuda": 0},
    why_not=lambda device_type: None,
    cov_update=cov_update_torch,
    topk_eigh=EigenProducts(prepare=upper_operand, matmul=upper_operator_matmul),
    info={"cov_update": "fp32 addmm (BLAS)", "topk_eigh": "tiled products on the upper triangle"},
)
register_backend(TORCH)

__all__ = ["TORCH", "cov_update_torch", "upper_operand", "upper_operator_matmul"]
