"""eva: the model layer of eva-kernels — a drop-in for PEFT's EVA initialization.

    from eva import get_eva_state_dict, initialize_lora_eva_weights
    eva.patch_peft()   # or: PEFT's own names run this engine (``with eva.patched_peft(): ...``)

EVA (Explained Variance Adaptation) initializes LoRA's A matrices with the top right-singular
vectors of each layer's input activations and redistributes ranks across layers by explained
variance. This engine computes them exactly (PCA of every token consumed) from running
covariances updated by the fused kernels of :mod:`eva_kernels`.

The names below are imported on first use (PEP 562), so ``import eva`` and ``eva --help`` do not
load torch, and Ctrl-C while the command line starts is handled by :func:`eva.cli.main`.
"""
from __future__ import annotations

import importlib

#: public name -> the submodule that defines it
_EXPORTS = {
    "get_eva_state_dict": "api", "initialize_lora_eva_weights": "api",
    "EvaStateDict": "result", "load_eva_state_dict": "result",
    "EvaOptions": "config", "EvaObserver": "engine",
    "EvaError": "errors", "EvaNotConvergedError": "errors",
    "forward_fn_dict": "peft.inputs", "prepare_model_inputs_fn_language_modeling": "peft.inputs",
    "prepare_layer_inputs_fn_language_modeling": "peft.inputs", "layer_input_rules": "peft.inputs",
    "patch_peft": "peft.patch", "unpatch_peft": "peft.patch", "patched_peft": "peft.patch",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    """The public names of :data:`_EXPORTS`, ``__version__``, and submodules (``eva.engine``)."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    elif name == "__version__":
        from eva_kernels import __version__ as value
    else:
        try:
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
