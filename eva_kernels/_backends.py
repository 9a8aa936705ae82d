"""Backend registry: which implementation of an op runs for a given tensor.

Each op (``"cov_update"``, ``"eigen_steps"``) has implementations registered by name
(``"torch"``, ``"triton"``, ``"cpp"``) together with a predicate saying whether that
implementation can run on a device type *right now* (e.g. Triton needs CUDA or the
interpreter; the C++ backend needs its compiled extension).

Selection order for a call: the ``backend=`` argument, else the ``EVA_BACKEND``
environment variable, else ``"auto"``. ``"auto"`` walks the op's preference list for
the device type and takes the first available one. Naming a backend that cannot run
raises :class:`BackendUnavailableError` carrying the reason and the command that fixes it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

BACKEND_NAMES = ("torch", "triton", "cpp")

# "auto" preference, fastest first, per device type.
_AUTO_ORDER = {
    "cuda": ("triton", "cpp", "torch"),
    "cpu": ("cpp", "torch"),
}


class BackendUnavailableError(RuntimeError):
    """Raised when a named backend cannot run the requested op on the given device."""


@dataclass
class _Impl:
    fn: Callable
    # (device_type) -> None if usable, else a human-readable reason + fix
    why_not: Callable[[str], Optional[str]]


@dataclass
class _Op:
    name: str
    impls: Dict[str, _Impl] = field(default_factory=dict)


_OPS: Dict[str, _Op] = {}


def register(op: str, backend: str, fn: Callable, why_not: Callable[[str], Optional[str]]) -> None:
    """Register ``fn`` as the ``backend`` implementation of ``op``.

    ``why_not(device_type)`` returns ``None`` when the implementation can run on that
    device type, else a message explaining why not and how to fix it.
    """
    if backend not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKEND_NAMES}")
    _OPS.setdefault(op, _Op(op)).impls[backend] = _Impl(fn, why_not)


def _requested(backend: Optional[str]) -> str:
    name = backend if backend is not None else os.environ.get("EVA_BACKEND", "auto")
    name = name.strip().lower() or "auto"
    if name != "auto" and name not in BACKEND_NAMES:
        src = "backend=" if backend is not None else "EVA_BACKEND="
        raise ValueError(f"{src}{name!r} is not a backend; choose one of auto, {', '.join(BACKEND_NAMES)}")
    return name


def why_unavailable(op: str, backend: str, device_type: str) -> Optional[str]:
    """``None`` if ``backend`` can run ``op`` on ``device_type``, else the reason."""
    impl = _OPS.get(op, _Op(op)).impls.get(backend)
    if impl is None:
        return _MISSING_HINTS.get(backend, f"backend {backend!r} has no implementation of {op}")
    return impl.why_not(device_type)


def resolve(op: str, device: torch.device, backend: Optional[str] = None) -> str:
    """Name of the backend that will run ``op`` for tensors on ``device``."""
    name = _requested(backend)
    dev = torch.device(device).type
    if name == "auto":
        for cand in _AUTO_ORDER.get(dev, ("torch",)):
            if why_unavailable(op, cand, dev) is None:
                return cand
        return "torch"
    reason = why_unavailable(op, name, dev)
    if reason is not None:
        raise BackendUnavailableError(f"backend {name!r} cannot run eva_kernels.{op} on {dev} tensors: {reason}")
    return name


def get(op: str, backend: str) -> Callable:
    return _OPS[op].impls[backend].fn


def available_backends(device: Optional[torch.device | str] = None, op: str = "cov_update") -> List[str]:
    """Backends that can run ``op`` on ``device`` (default: CUDA if present, else CPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device).type
    return [b for b in BACKEND_NAMES if why_unavailable(op, b, dev) is None]


_MISSING_HINTS = {
    "triton": "the Triton backend is not installed in this build (pip install triton)",
    "cpp": ("the C++/CUDA extension is not built; build it with "
            "`pip install --no-build-isolation -e .` (needs torch, ninja and a C++ compiler)"),
}
