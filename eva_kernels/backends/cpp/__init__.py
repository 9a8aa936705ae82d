"""The ``cpp`` backend: compiled C++ (CPU) and CUDA kernels of ``cov_update`` (sources in csrc/).

The extension ``eva_kernels._C`` adds its kernels to the one op ``eva_kernels::cov_update``
(``TORCH_LIBRARY_IMPL(eva_kernels, CPU|CUDA)``; schema and fake in
:mod:`eva_kernels.ops.cov_update`), so this backend calls ``torch.ops.eva_kernels.cov_update``:
with the extension loaded, the dispatcher's CPU (and, when built with nvcc, CUDA) kernel is the
compiled one. It implements ``cov_update`` only; :func:`eva_kernels.topk_eigh` resolves its own
backend (``backend="cpp"`` there raises, naming the backends that implement it).

Importing this package never raises when the extension is missing or broken: the load error
is kept and reported (with the command that fixes it) when ``cpp`` is requested.

Build switches (read by setup.py): ``EVA_SKIP_EXT=1`` (no extension), ``EVA_REQUIRE_EXT=1``
(a failed build fails the install), ``EVA_NATIVE=1`` (``-march=native``: this machine only; the
default build is portable, its AVX2 kernels chosen at run time), ``EVA_CUDA_ARCHS`` (default
``80;90a``). Runtime: ``EVA_CPP_KC`` (rows per packed panel of the CPU kernel, default 256),
``EVA_CPU_ISA=generic`` (the portable micro-kernels even where AVX2 runs). An extension built
against another torch (major.minor, ``eva_kernels/_build_info.py``) is not loaded: ``cpp`` is
then unavailable with the reason (:func:`torch_mismatch`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..._registry import Backend, register_backend
from ...ops import cov_update as _op  # noqa: F401  (the schema must exist before the kernels run)

BUILD_HINT = ("build it with `pip install --no-build-isolation -e .` (needs torch, ninja and a "
              "C++ compiler; EVA_SKIP_EXT must be unset)")

def torch_mismatch(built: Optional[str], running: str) -> Optional[str]:
    """Why an extension built against torch ``built`` (major.minor, None: unknown) must not be
    loaded under torch ``running``; None when it may."""
    if built is None:
        return None
    now = ".".join(running.split("+")[0].split(".")[:2])
    if now == built:
        return None
    return (f"eva_kernels._C was built against torch {built} but torch {now} is running (a compiled extension "
            f"needs the torch it was built with); rebuild it with `pip install --no-build-isolation -e .` or "
            f"install torch {built}.*; the 'torch' and 'triton' backends work meanwhile")


try:
    from ..._build_info import BUILT_TORCH
except ImportError:  # built by an older setup.py, or no extension: nothing to compare
    BUILT_TORCH = None

LOAD_ERROR: Optional[str] = torch_mismatch(BUILT_TORCH, torch.__version__)
_C = None
if LOAD_ERROR is None:
    try:
        from ... import _C  # noqa: F401  (import registers the compiled kernels of eva_kernels::cov_update)
    except Exception as exc:  # noqa: BLE001 - keep the reason for the error message
        _C = None
        LOAD_ERROR = f"{type(exc).__name__}: {exc}"

HAS_EXTENSION: bool = _C is not None
HAS_CUDA: bool = bool(HAS_EXTENSION and _C.has_cuda())
CPU_ISA: Optional[str] = _C.cpu_isa() if HAS_EXTENSION else None


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
    """The compiled kernel of ``eva_kernels::cov_update`` for x's device (validated inputs).

    Updates the upper triangle of ``cov`` (d, d) fp32 and ``colsum`` (d,) in place with the
    kept rows of ``x`` (n, d) fp32/fp16/bf16 (any strides) minus ``shift``; returns the
    0-d int64 count on ``x.device``.
    """
    return torch.ops.eva_kernels.cov_update(cov, colsum, x, mask, shift)


CPP = Backend(
    name="cpp",
    priority={"cpu": 20, "cuda": 20},
    why_not=why_not,
    cov_update=cov_update_cpp,
    info={"cpu_isa": CPU_ISA or "", "cuda": str(HAS_CUDA)},
)
register_backend(CPP)

__all__ = ["CPP", "cov_update_cpp", "why_not", "HAS_EXTENSION", "HAS_CUDA", "LOAD_ERROR", "CPU_ISA", "BUILD_HINT"]
