"""C++/CUDA backend of eva_kernels (the compiled extension ``eva_kernels._C``, sources in csrc/).

Importing this package never raises when the extension is missing or broken: it keeps the
load error and registers the ``"cpp"`` implementation of ``"cov_update"`` with a ``why_not``
that reports the reason and the command that fixes it.

The extension registers ``torch.ops.eva_kernels.cov_update_cpp(cov, colsum, x, mask, shift)``
(schema ``Tensor(a!) cov, Tensor(b!) colsum, Tensor x, Tensor? mask, Tensor? shift -> Tensor``)
with a CPU kernel, and a CUDA kernel when it was built against a CUDA torch with nvcc. This
module adds the fake (meta) implementation so the op traces under ``torch.compile``.

Build switches (read by setup.py): ``EVA_SKIP_EXT=1`` (no extension), ``EVA_REQUIRE_EXT=1``
(a failed build fails the install), ``EVA_PORTABLE=1`` (no ``-march=native``),
``EVA_CUDA_ARCHS`` (default ``80;90a``). Runtime: ``EVA_CPP_KC`` (rows per packed panel of the
CPU kernel, default 256).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _backends

BUILD_HINT = ("build it with `pip install --no-build-isolation -e .` (needs torch, ninja and a "
              "C++ compiler; EVA_SKIP_EXT must be unset)")

LOAD_ERROR: Optional[str] = None
try:
    from .. import _C  # noqa: F401  (import registers torch.ops.eva_kernels.cov_update_cpp)
except Exception as exc:  # noqa: BLE001 - keep the reason for the error message
    _C = None
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"

HAS_EXTENSION: bool = _C is not None
HAS_CUDA: bool = bool(HAS_EXTENSION and _C.has_cuda())
CPU_ISA: Optional[str] = _C.cpu_isa() if HAS_EXTENSION else None

if HAS_EXTENSION:
    @torch.library.register_fake("eva_kernels::cov_update_cpp")
    def _cov_update_cpp_fake(cov, colsum, x, mask, shift):
        return x.new_empty((), dtype=torch.int64)


def why_not(device_type: str) -> Optional[str]:
    """``None`` if the C++/CUDA backend can run on ``device_type``, else the reason and fix."""
    if not HAS_EXTENSION:
        reason = "the C++/CUDA extension eva_kernels._C is not built or failed to load"
        if LOAD_ERROR:
            reason += f" ({LOAD_ERROR})"
        return f"{reason}; {BUILD_HINT}"
    if device_type == "cpu":
        return None
    if device_type == "cuda":
        if HAS_CUDA:
            return None
        return ("the C++ extension was built without its CUDA kernel (CPU-only torch or no nvcc "
                "at build time); with a CUDA build of torch and nvcc on PATH, rebuild it with "
                "`pip install --no-build-isolation -e .` (EVA_SKIP_EXT and EVA_FORCE_CPU_EXT unset)")
    return f"the C++/CUDA backend has no kernel for {device_type} tensors (only cpu and cuda)"


def cov_update_cpp(cov: Tensor, colsum: Tensor, x: Tensor, mask: Optional[Tensor],
                   shift: Optional[Tensor]) -> Tensor:
    """``cpp`` backend of :func:`eva_kernels.cov_update` (validated inputs).

    Updates the upper triangle of ``cov`` (d, d) fp32 and ``colsum`` (d,) in place with the
    kept rows of ``x`` (n, d) fp32/fp16/bf16 (any strides) minus ``shift``; returns the
    0-d int64 count on ``x.device``.
    """
    return torch.ops.eva_kernels.cov_update_cpp(cov, colsum, x, mask, shift)


_backends.register("cov_update", "cpp", cov_update_cpp, why_not)

__all__ = ["cov_update_cpp", "why_not", "HAS_EXTENSION", "HAS_CUDA", "LOAD_ERROR", "CPU_ISA", "BUILD_HINT"]
