"""The backend leaves: ``torch`` (always), ``triton`` and ``cpp`` (when importable).

Each leaf builds one :class:`eva_kernels.Backend` and registers it; no leaf imports another.
An import failure of an optional leaf is kept, not raised: asking for that backend later raises
:class:`eva_kernels.BackendUnavailableError` with the reason and the fix.
"""
from __future__ import annotations

import importlib

from .._registry import record_load_error
from . import torch as _torch_leaf  # noqa: F401  (always available)

for _name in ("triton", "cpp"):
    _module = f"{__name__}.{_name}"
    try:
        importlib.import_module(_module)
    except ModuleNotFoundError as exc:  # the leaf's dependency is not installed
        if exc.name != _module:
            record_load_error(_name, f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # noqa: BLE001 - keep the reason for the error message
        record_load_error(_name, f"{type(exc).__name__}: {exc}")
