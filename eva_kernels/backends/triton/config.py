"""Triton backend configuration: interpreter detection, availability, launch heuristics.

``@triton.jit`` decides at *decoration* time (i.e. when this package is imported) whether a
kernel is compiled for the GPU or run by the CPU interpreter (``TRITON_INTERPRET=1``).
:data:`INTERPRET` records what was actually decided, by decorating a probe function the same
way the kernels are decorated, so the availability check always matches what will run.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl

try:  # present in triton 2.x .. 3.9
    from triton.runtime.interpreter import InterpretedFunction as _InterpretedFunction
except Exception:  # pragma: no cover - layout changed; fall back to the environment
    _InterpretedFunction = None


@triton.jit
def _probe(x_ptr):
    tl.store(x_ptr, 0)


if _InterpretedFunction is not None:
    #: True when the kernels of this package run in Triton's CPU interpreter.
    INTERPRET: bool = isinstance(_probe, _InterpretedFunction)
else:  # pragma: no cover
    INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

#: Precision of fp32 x fp32 ``tl.dot``. ``"tf32x3"`` (three TF32 tensor-core products with
#: error compensation) is as accurate as fp32 FMA to ~1e-6 relative and several times faster
#: on Ampere/Hopper; the interpreter computes in plain fp32 (``"ieee"``).
#: Override with ``EVA_TRITON_FP32_DOT=ieee`` (or ``tf32``, ``tf32x3``).
#: The GPU default, which the compile check (:mod:`.compile_check`) compiles.
GPU_FP32_DOT_PRECISION = "tf32x3"
FP32_DOT_PRECISION: str = os.environ.get("EVA_TRITON_FP32_DOT", "ieee" if INTERPRET else GPU_FP32_DOT_PRECISION)
if FP32_DOT_PRECISION not in ("ieee", "tf32", "tf32x3"):
    raise ValueError(f"EVA_TRITON_FP32_DOT={FP32_DOT_PRECISION!r}: choose ieee, tf32 or tf32x3")

#: Shifted 16-bit input is multiplied as a bf16 hi/lo split (see ``cov_update_kernel``): on the
#: GPU the parts go to bf16 tensor cores; the interpreter multiplies the same parts as fp32
#: (exact products too), because its bf16 ``tl.dot`` is wrong.
SPLIT_NATIVE: bool = not INTERPRET


#: The oldest Triton the kernels are tested with (``make test-torch-matrix``: 3.6 with torch 2.11,
#: 3.9 with torch 2.13). Triton 3.0 (torch 2.4) cannot build them (``tl.arange`` bounds).
MIN_TRITON = (3, 6)
TRITON_VERSION = tuple(int(p) for p in triton.__version__.split(".")[:2])


def why_not(device_type: str) -> Optional[str]:
    """``None`` when the Triton kernels can run on tensors of ``device_type``, else why not."""
    if TRITON_VERSION < MIN_TRITON:
        return (f"Triton {triton.__version__} is older than {MIN_TRITON[0]}.{MIN_TRITON[1]}, the oldest these "
                f"kernels are tested with; upgrade it (pip install 'triton>={MIN_TRITON[0]}.{MIN_TRITON[1]}', "
                "which needs a torch that accepts it) or use backend='cpp' or 'torch'")
    if device_type == "cuda":
        if INTERPRET or torch.cuda.is_available():
            return None
        return "Triton kernels need a CUDA GPU, and torch.cuda.is_available() is False"
    if device_type == "cpu":
        if INTERPRET:
            return None
        return ("Triton kernels need a CUDA GPU; to run them on CPU tensors set TRITON_INTERPRET=1 "
                "before importing eva_kernels (Triton's CPU interpreter, slow, for tests)")
    return f"Triton kernels run on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), not {device_type!r}"


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; a small stand-in under the interpreter.

    The interpreter value (4) makes small test problems take the split-n path too.
    """
    if INTERPRET or device.type != "cuda":
        return 4
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def pow2_bucket(n: int) -> int:
    """Autotuning key for a token count: next power of two (tuning is not redone per n)."""
    return 1 << max(0, int(n) - 1).bit_length()


def centred_variant_pruner(kernel: str, q_arg: str = "q_ptr"):
    """An autotuner ``early_config_prune`` for a product kernel with fp32 / fp32-centred variants
    (``HAS_C``): drops the configs the compile check found spilling for ``kernel`` on this GPU
    (:func:`.launches.prune_configs`); nothing is pruned under the interpreter or off CUDA."""
    def prune(configs, named_args, **kwargs):
        from .launches import prune_configs  # launches imports the kernel modules
        q = named_args[q_arg]
        if INTERPRET or q.device.type != "cuda":
            return configs
        variant = "fp32-centred" if kwargs.get("HAS_C", named_args.get("HAS_C")) else "fp32"
        return prune_configs(kernel, configs, variant, torch.cuda.get_device_capability(q.device)[0])
    return prune
