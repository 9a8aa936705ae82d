"""Typed backend registry: which implementation of an op runs for a tensor's device.

A :class:`Backend` is one implementation family (``torch``, ``triton``, ``cpp``). It says on
which device types it can run right now (``why_not``), how eager ``auto`` should be to pick it
per device type (``priority``), and which ops it implements. The leaves under
:mod:`eva_kernels.backends` build one ``Backend`` each and :func:`register_backend` it; none of
them imports another.

Selection for one call site (:func:`resolve`): the ``backend=`` argument (a name or a
``Backend``), else the ``EVA_BACKEND`` environment variable, else ``"auto"``.

* ``"auto"`` is the only mode that chooses: the available backend implementing the op with
  the highest priority for the device type.
* A named backend that cannot run the op on the device raises
  :class:`BackendUnavailableError` with the reason and the command that fixes it. Nothing ever
  falls back silently; callers record ``Backend.name`` of what they resolved.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, NamedTuple, Optional, Union

import torch

#: Every backend name eva_kernels knows (registered or not in this build).
BACKEND_NAMES = ("torch", "triton", "cpp")
#: The ops a backend may implement.
OPS = ("cov_update", "topk_eigh")


class BackendUnavailableError(RuntimeError):
    """A named backend cannot run the requested op on the given device (message: reason + fix)."""


class EigenProducts(NamedTuple):
    """What a backend contributes to :func:`eva_kernels.topk_eigh`: the products with the matrix.

    ``prepare(cov) -> operand``: built once per solve from ``cov`` (d, d) whose upper triangle is
    valid (a full symmetric copy, or a view that reads the upper triangle only).
    ``matmul(operand, q, colsum, count) -> (d, b)``: ``(sym(cov) - c c^T / n) q`` for ``q`` (d, b)
    (no correction when ``colsum`` is None). The small eigenproblem and the orthonormalisation
    (:mod:`eva_kernels.linalg`) do not depend on the backend.
    """

    prepare: Callable
    matmul: Callable


@dataclass(frozen=True)
class Backend:
    """One implementation family of the eva_kernels ops.

    Attributes:
        name: ``"torch"``, ``"triton"`` or ``"cpp"``.
        priority: per device type, how ``auto`` ranks it (higher first); a device type that is
            absent is never chosen by ``auto`` (it may still run there when named).
        why_not: ``why_not(device_type)`` is None when the backend can run there now, else the
            reason and the fix.
        cov_update: ``fn(cov, colsum, x, mask, shift) -> count`` on validated arguments, or None.
        cov_update_fast: the same signature for ``cov_update(..., precision="fast")``, or None
            when the backend has no faster, less exact path (then ``cov_update`` serves both).
        topk_eigh: the :class:`EigenProducts` of the eigensolver, or None.
        info: facts for reports (compiled ISA, dot precision, ...).
    """

    name: str
    priority: Mapping[str, int]
    why_not: Callable[[str], Optional[str]]
    cov_update: Optional[Callable] = None
    cov_update_fast: Optional[Callable] = None
    topk_eigh: Optional[EigenProducts] = None
    info: Mapping[str, str] = field(default_factory=dict)

    def implements(self, op: str) -> bool:
        """True when this backend has an implementation of ``op``."""
        return getattr(self, op) is not None

    def is_available(self, device_type: str) -> bool:
        """True when this backend can run on tensors of ``device_type`` now."""
        return self.why_not(device_type) is None


_BACKENDS: Dict[str, Backend] = {}
#: why a known backend is absent from this build (its leaf failed to import), by name.
_LOAD_ERRORS: Dict[str, str] = {}

_MISSING_HINTS = {
    "triton": "the Triton backend is not installed in this build (pip install triton)",
    "cpp": ("the C++/CUDA extension is not built; build it with "
            "`pip install --no-build-isolation -e .` (needs torch, ninja and a C++ compiler)"),
}


def register_backend(backend: Backend) -> None:
    """Make ``backend`` selectable (called once by each leaf under :mod:`eva_kernels.backends`)."""
    if backend.name not in BACKEND_NAMES:
        raise ValueError(f"unknown backend name {backend.name!r}; expected one of {BACKEND_NAMES}")
    _BACKENDS[backend.name] = backend


def record_load_error(name: str, error: str) -> None:
    """Keep why the leaf of backend ``name`` could not be imported (shown when it is requested)."""
    _LOAD_ERRORS[name] = error


def requested_name(backend: Union[str, Backend, None]) -> str:
    """The backend asked for: the argument, else ``EVA_BACKEND``, else ``"auto"`` (validated)."""
    if isinstance(backend, Backend):
        return backend.name
    name = backend if backend is not None else os.environ.get("EVA_BACKEND", "auto")
    if not isinstance(name, str):
        raise TypeError(f"backend must be a name or an eva_kernels.Backend, got {type(name).__name__}")
    name = name.strip().lower() or "auto"
    if name != "auto" and name not in BACKEND_NAMES:
        src = "backend=" if backend is not None else "EVA_BACKEND="
        raise ValueError(f"{src}{name!r} is not a backend; choose one of auto, {', '.join(BACKEND_NAMES)}")
    return name


def why_unavailable(op: str, name: str, device_type: str) -> Optional[str]:
    """None when backend ``name`` can run ``op`` on ``device_type``, else the reason and fix."""
    backend = _BACKENDS.get(name)
    if backend is None:
        hint = _MISSING_HINTS.get(name, f"backend {name!r} is not registered")
        return hint + (f" ({_LOAD_ERRORS[name]})" if name in _LOAD_ERRORS else "")
    if not backend.implements(op):
        offering = [b.name for b in _BACKENDS.values() if b.implements(op)]
        return f"backend {name!r} has no implementation of {op} (backends that do: {', '.join(offering)})"
    return backend.why_not(device_type)


def resolve(op: str, device: Union[torch.device, str], backend: Union[str, Backend, None] = None) -> Backend:
    """The backend that runs ``op`` for tensors on ``device`` (see the module docstring)."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    name = requested_name(backend)
    dev = torch.device(device).type
    if name == "auto":
        ranked = sorted((b for b in _BACKENDS.values() if dev in b.priority),
                        key=lambda b: -b.priority[dev])
        for cand in ranked:
            if why_unavailable(op, cand.name, dev) is None:
                return cand
        return _BACKENDS["torch"]
    reason = why_unavailable(op, name, dev)
    if reason is not None:
        raise BackendUnavailableError(f"backend {name!r} cannot run eva_kernels.{op} on {dev} tensors: {reason}; "
                                      f"backends that can: {', '.join(available_backends(dev, op)) or 'none'}")
    return _BACKENDS[name]


def available_backends(device: Union[torch.device, str, None] = None, op: str = "cov_update") -> List[str]:
    """Names of the backends that can run ``op`` on ``device`` (default: CUDA if present, else CPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device).type
    return [n for n in BACKEND_NAMES if why_unavailable(op, n, dev) is None]


def get_backend(name: str) -> Backend:
    """The registered backend called ``name`` (raises :class:`BackendUnavailableError` if absent)."""
    if name not in _BACKENDS:
        raise BackendUnavailableError(f"backend {name!r} is not registered: {why_unavailable('cov_update', name, 'cpu')}")
    return _BACKENDS[name]
