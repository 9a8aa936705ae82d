"""Public ops of ``eva_kernels``: argument checks, backend dispatch, ``torch.library`` schema.

``torch.ops.eva_kernels.cov_update(cov, colsum, x, mask, shift, backend)`` is declared once
here with ``torch.library.custom_op`` (mutating ``cov`` and ``colsum``) and a fake
implementation, so it traces under ``torch.compile`` and other libraries can call it.
:func:`cov_update` is the friendly Python entry that validates and then calls that op.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import torch
from torch import Tensor

from . import _backends
from .reference import (centered_operator_matmul, cov_update_torch, orthonormalize_torch,
                        sym_from_upper, upper_operand)

_X_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_cov_update(cov: Tensor, colsum: Tensor, x: Tensor, mask: Optional[Tensor],
                      shift: Optional[Tensor]) -> None:
    """Raise a clear error for bad arguments, before anything is written."""
    for name, t in (("cov", cov), ("colsum", colsum), ("x", x)):
        if not isinstance(t, Tensor):
            raise TypeError(f"cov_update: {name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 2:
        raise ValueError(f"cov_update: x must be 2-D (n, d), got shape {tuple(x.shape)}; "
                         "flatten leading dimensions with x.reshape(-1, d)")
    n, d = x.shape
    if x.dtype not in _X_DTYPES:
        raise TypeError(f"cov_update: x must be float32, float16 or bfloat16, got {x.dtype}")
    if cov.shape != (d, d) or cov.dtype != torch.float32:
        raise ValueError(f"cov_update: cov must be float32 ({d}, {d}) to match x's d={d}, "
                         f"got {cov.dtype} {tuple(cov.shape)}")
    if not cov.is_contiguous():
        raise ValueError("cov_update: cov must be contiguous (it is updated in place)")
    if colsum.shape != (d,) or colsum.dtype != torch.float32 or not colsum.is_contiguous():
        raise ValueError(f"cov_update: colsum must be a contiguous float32 ({d},) tensor, "
                         f"got {colsum.dtype} {tuple(colsum.shape)}")
    devs = {"cov": cov.device, "colsum": colsum.device}
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != (n,):
            raise ValueError(f"cov_update: mask must be a bool ({n},) tensor, got "
                             f"{getattr(mask, 'dtype', type(mask).__name__)} {tuple(getattr(mask, 'shape', ()))}")
        devs["mask"] = mask.device
    if shift is not None:
        if not isinstance(shift, Tensor) or shift.shape != (d,) or shift.dtype != torch.float32:
            raise ValueError(f"cov_update: shift must be a float32 ({d},) tensor, got "
                             f"{getattr(shift, 'dtype', type(shift).__name__)} {tuple(getattr(shift, 'shape', ()))}")
        devs["shift"] = shift.device
    for name, dev in devs.items():
        if dev != x.device:
            raise ValueError(f"cov_update: {name} is on {dev} but x is on {x.device}; move them to one device")


@torch.library.custom_op("eva_kernels::cov_update", mutates_args=("cov", "colsum"))
def _cov_update_op(cov: Tensor, colsum: Tensor, x: Tensor, mask: Optional[Tensor],
                   shift: Optional[Tensor], backend: str) -> Tensor:
    name = _backends.resolve("cov_update", x.device, backend)
    return _backends.get("cov_update", name)(cov, colsum, x, mask, shift)


@_cov_update_op.register_fake
def _(cov, colsum, x, mask, shift, backend):
    return x.new_empty((), dtype=torch.int64)


def cov_update(cov: Tensor, colsum: Tensor, x: Tensor, mask: Optional[Tensor] = None, *,
               shift: Optional[Tensor] = None, backend: Optional[str] = None) -> Tensor:
    """Fused activation-covariance update, in place.

    For the rows ``x_i`` of ``x`` kept by ``mask`` and ``y_i = float32(x_i) - shift``::

        cov    += sum_i y_i^T y_i     (upper triangle guaranteed, see below)
        colsum += sum_i y_i

    Args:
        cov: (d, d) float32, contiguous. Only the upper triangle (row <= col) is guaranteed
            to be updated; read it with :func:`eva_kernels.topk_eigh` or mirror it with
            :func:`eva_kernels.symmetrize_`.
        colsum: (d,) float32, contiguous.
        x: (n, d) float32 / float16 / bfloat16, any strides; read once, widened on the fly.
        mask: optional (n,) bool; rows with False are skipped (NaN/Inf in them is ignored).
        shift: optional (d,) float32 reference subtracted from every row before accumulation.
            Accumulating about a value near the data mean keeps fp32 accurate when a
            channel's mean dwarfs its spread (centring later then cancels no digits).
        backend: ``"auto"``/``"torch"``/``"triton"``/``"cpp"``; default ``EVA_BACKEND`` or auto.

    Returns:
        0-d int64 tensor on ``x.device``: the number of rows used (no host sync on GPU).
    """
    _check_cov_update(cov, colsum, x, mask, shift)
    name = _backends.resolve("cov_update", x.device, backend)  # raises early if unavailable
    return _cov_update_op(cov, colsum, x, mask, shift, name)


def symmetrize_(cov: Tensor) -> Tensor:
    """Mirror the upper triangle of square ``cov`` into its lower triangle, in place."""
    cov.copy_(sym_from_upper(cov))
    return cov


def available_backends(device=None):
    """Backends that can run ``cov_update`` on ``device`` (default: CUDA if present, else CPU)."""
    return _backends.available_backends(device)


# --- the torch backend: always available --------------------------------------------------
_backends.register("cov_update", "torch", cov_update_torch, lambda dev: None)
# eigen_steps interface: ``symmetrize(cov)`` prepares the operand that ``operator_matmul``
# multiplies by (a full symmetric matrix, or here an upper-triangle view with its diagonal
# tiles mirrored), ``orthonormalize(y)`` returns an orthonormal basis of y's columns.
TORCH_EIGEN_STEPS = SimpleNamespace(
    symmetrize=upper_operand,
    operator_matmul=centered_operator_matmul,
    orthonormalize=orthonormalize_torch,
)
_backends.register("eigen_steps", "torch", TORCH_EIGEN_STEPS, lambda dev: None)
