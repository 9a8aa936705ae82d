"""Registers the optional backends (Triton, C++/CUDA) when they can be imported.

Import failures are kept (not raised): asking for such a backend later raises
:class:`eva_kernels.BackendUnavailableError` with the reason and the fix.
"""
from __future__ import annotations

import importlib

LOAD_ERRORS = {}

for _mod, _name in (("eva_kernels.triton_backend", "triton"), ("eva_kernels.cpp_backend", "cpp")):
    try:
        importlib.import_module(_mod)
    except ModuleNotFoundError as exc:  # backend package not present in this build
        if exc.name != _mod:
            LOAD_ERRORS[_name] = f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # noqa: BLE001 - keep the reason for the error message
        LOAD_ERRORS[_name] = f"{type(exc).__name__}: {exc}"
