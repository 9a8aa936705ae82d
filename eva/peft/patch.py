"""``patch_peft()``: PEFT's EVA entry points replaced by ours, so that code written against PEFT
runs this engine without a change.

While patched, the five public names of ``peft.tuners.lora.eva`` (``get_eva_state_dict``,
``initialize_lora_eva_weights`` and the three default input functions) are ours in every PEFT
module that exports them (``peft``, ``peft.tuners``, ``peft.tuners.lora``,
``peft.tuners.lora.eva``): ``from peft import get_eva_state_dict`` executed after the patch,
``peft.tuners.lora.eva.get_eva_state_dict(...)`` and ``get_peft_model(model,
LoraConfig(init_lora_weights="eva"))`` followed by ``initialize_lora_eva_weights`` all run ours.
A name imported *before* the patch keeps PEFT's function (Python bound it already).

* Patching twice is harmless (the originals are kept once); :func:`unpatch_peft` puts PEFT's own
  function objects back (identity), and :func:`patched_peft` does both around a ``with`` block.
* A PEFT whose EVA functions take other parameters than the ones we know (PEFT 0.14 to 0.21)
  is left unpatched with a warning naming its version: our drop-in would not match its API.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import warnings
from typing import Dict, Iterator, Tuple

#: the modules of PEFT that export the EVA names (the last one defines them)
PEFT_MODULES = ("peft", "peft.tuners", "peft.tuners.lora", "peft.tuners.lora.eva")
#: name -> where ours lives (module, attribute)
OURS = {
    "get_eva_state_dict": ("eva.api", "get_eva_state_dict"),
    "initialize_lora_eva_weights": ("eva.api", "initialize_lora_eva_weights"),
    "forward_fn_dict": ("eva.peft.inputs", "forward_fn_dict"),
    "prepare_model_inputs_fn_language_modeling": ("eva.peft.inputs", "prepare_model_inputs_fn_language_modeling"),
    "prepare_layer_inputs_fn_language_modeling": ("eva.peft.inputs", "prepare_layer_inputs_fn_language_modeling"),
}
#: the parameters PEFT's functions must have for ours to stand in for them
KNOWN_PARAMETERS = {
    "get_eva_state_dict": ("model", "dataloader", "peft_config", "forward_fn", "prepare_model_inputs_fn",
                           "prepare_layer_inputs_fn", "adapter_name", "gather_distributed_inputs",
                           "show_progress_bar"),
    "initialize_lora_eva_weights": ("model", "dataloader", "eva_state_dict", "forward_fn",
                                    "prepare_model_inputs_fn", "prepare_layer_inputs_fn", "adapter_name",
                                    "gather_distributed_inputs", "show_progress_bar"),
    "forward_fn_dict": ("model", "inputs"),
    "prepare_model_inputs_fn_language_modeling": ("model_input", "peft_config"),
    "prepare_layer_inputs_fn_language_modeling": ("layer_input", "model_input", "layer_name"),
}

#: (module, name) -> PEFT's own object, while patched
_ORIGINALS: Dict[Tuple[str, str], object] = {}


def is_patched() -> bool:
    """Whether PEFT's EVA names are ours now."""
    return bool(_ORIGINALS)


def original(name: str):
    """PEFT's own ``peft.tuners.lora.eva.<name>`` (while patched, the one we replaced)."""
    return _ORIGINALS.get(("peft.tuners.lora.eva", name)) or getattr(
        importlib.import_module("peft.tuners.lora.eva"), name)


def _unknown_api(eva_module) -> Dict[str, str]:
    """name -> how PEFT's function differs from the parameters we know (empty: all match)."""
    out = {}
    for name, expected in KNOWN_PARAMETERS.items():
        fn = getattr(eva_module, name, None)
        if fn is None:
            out[name] = "missing"
            continue
        got = tuple(inspect.signature(fn).parameters)
        if got != expected:
            out[name] = f"parameters {got}, expected {expected}"
    return out


def patch_peft() -> bool:
    """Make PEFT's EVA names ours (see the module docstring). Returns True when patched (now or
    before); False, with a warning, when this PEFT's EVA API is not one we know."""
    if is_patched():
        return True
    import peft
    eva_module = importlib.import_module("peft.tuners.lora.eva")
    unknown = _unknown_api(eva_module)
    if unknown:
        warnings.warn(f"eva.patch_peft: PEFT {peft.__version__}'s EVA functions are not the ones eva-kernels "
                      f"stands in for ({unknown}); PEFT is left unpatched. Call eva.get_eva_state_dict / "
                      "eva.initialize_lora_eva_weights directly, or use a PEFT from 0.14 to 0.21")
        return False
    ours = {name: getattr(importlib.import_module(mod), attr) for name, (mod, attr) in OURS.items()}
    for mod_name in PEFT_MODULES:
        module = importlib.import_module(mod_name)
        for name, fn in ours.items():
            if name in vars(module):
                _ORIGINALS[(mod_name, name)] = vars(module)[name]
                setattr(module, name, fn)
    return True


def unpatch_peft() -> None:
    """Put PEFT's own function objects back (nothing to do when not patched)."""
    while _ORIGINALS:
        (mod_name, name), fn = _ORIGINALS.popitem()
        setattr(importlib.import_module(mod_name), name, fn)


@contextlib.contextmanager
def patched_peft() -> Iterator[bool]:
    """``with eva.patched_peft(): ...``: patched inside the block, restored after it (also on an
    error); a block entered while already patched leaves the patch in place. Yields
    :func:`patch_peft`'s result."""
    already = is_patched()
    ok = patch_peft()
    try:
        yield ok
    finally:
        if ok and not already:
            unpatch_peft()
