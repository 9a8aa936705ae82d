"""The check phase of ``eva init`` / ``eva demo``: every input, before anything heavy loads.

:func:`check_inputs` runs the checks in the order ``eva init --help`` lists them and returns a
:class:`Plan`; each failure is an :class:`eva.errors.EvaError` with one line naming the argument
and the fix.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple, Union

from ..errors import EvaError
from .arguments import one_line
from .tasks import resolve_task

@dataclass
class Plan:
    """Everything ``_run`` needs, produced by the check phase (nothing heavy loaded yet)."""

    model_path: str
    data_path: str
    lines: List[str]
    device: str
    lora_config: Any
    options: Dict[str, Any]
    gguf_file: Optional[str] = None  # --model was a GGUF file: its name inside model_folder
    task: str = "base"  # --task resolved (eva.cli.tasks): which auto class loads the model

    @property
    def model_folder(self) -> str:
        """What ``from_pretrained`` takes: the folder, or the GGUF file's folder."""
        return os.path.dirname(os.path.abspath(self.model_path)) if self.gguf_file else self.model_path

    def pretrained_kwargs(self) -> Dict[str, Any]:
        """Extra ``from_pretrained`` arguments (``gguf_file=`` for a GGUF model)."""
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def _targets_text(target_modules: Union[str, List[str]]) -> str:
    """``--target-modules`` as the user would type it."""
    return target_modules if isinstance(target_modules, str) else ",".join(target_modules)


def _check_outputs(out: str, plot: Optional[str], data_path: str) -> None:
    """--out and --plot can be created, --plot has a writable format, and no two of --out,
    --plot and --data are the same file (nothing is created)."""
    from ..fileio import check_output_path
    from .plot import check_plot_path
    files = {"--out": check_output_path(out, "--out")}
    if plot is not None:
        try:
            files["--plot"] = check_plot_path(plot)
        except EvaError as exc:
            raise EvaError(re.sub(r"^plot path ", "--plot ", str(exc))) from exc
    files["--data"] = os.path.abspath(data_path)
    seen: Dict[str, str] = {}
    for arg, path in files.items():
        real = os.path.realpath(path)
        if real in seen:
            raise EvaError(f"{arg} and {seen[real]} are the same file {path!r}; give them different paths")
        seen[real] = arg


def _check_gguf_file(path: str) -> str:
    """``path`` is a readable GGUF file and the ``gguf`` package (transformers' GGUF reader) is
    installed; returns the file's name (``from_pretrained(folder, gguf_file=name)``)."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise EvaError(f"--model {path!r}: ends in .gguf but is not a GGUF file (it does not start with the "
                       "GGUF magic); give a GGUF model file or a transformers model folder")
    try:
        import gguf  # noqa: F401  (transformers reads GGUF files with it)
    except ImportError as exc:
        raise EvaError(f"--model {path!r}: a GGUF file needs the gguf package to be read "
                       "(pip install gguf); or give a transformers model folder") from exc
    return os.path.basename(path)


def _check_model_source(path: str) -> Optional[str]:
    """--model is a transformers model folder, or a GGUF file (transformers dequantises it).
    Returns the GGUF file name, or None for a folder."""
    if os.path.isfile(path) and path.lower().endswith(".gguf"):
        return _check_gguf_file(path)
    _check_model_folder(path)
    return None


def _check_model_folder(path: str) -> None:
    """``path`` is an existing folder holding config.json and a weights file (what a transformers
    model folder needs; the tokenizer files are checked when the tokenizer loads)."""
    needs = ("a model folder holds config.json, the weights (model.safetensors) and the tokenizer files "
             "(or give a .gguf model file)")
    if not os.path.exists(path):
        raise EvaError(f"--model {path!r}: no such folder; {needs} (eva reads local folders only: save one with "
                       "save_pretrained(folder), or download it with `hf download REPO --local-dir FOLDER`)")
    if not os.path.isdir(path):
        raise EvaError(f"--model {path!r}: is a file, not a folder; give the folder that holds it "
                       f"({os.path.dirname(os.path.abspath(path))!r}?); {needs}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise EvaError(f"--model {path!r}: has no config.json, so it is not a transformers model folder; {needs}, "
                       "as written by model.save_pretrained(folder) and tokenizer.save_pretrained(folder)")
    weights = _weight_file_names()
    if not any(os.path.isfile(os.path.join(path, name)) for name in weights):
        raise EvaError(f"--model {path!r}: has no weights file (none of {', '.join(weights)}); {needs}, "
                       "as written by model.save_pretrained(folder)")


def _weight_file_names() -> List[str]:
    """The weight file names ``AutoModel.from_pretrained(folder)`` looks for."""
    try:
        from transformers.utils import (SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME,
                                        WEIGHTS_NAME)
        return [SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME]
    except ImportError:
        return ["model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json"]


def _read_model_config(path: str, gguf_file: Optional[str] = None):
    """The model's ``transformers`` config (config.json, or a GGUF file's metadata; no weights)."""
    from transformers import AutoConfig
    try:
        if gguf_file:
            return AutoConfig.from_pretrained(os.path.dirname(os.path.abspath(path)), gguf_file=gguf_file)
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        what = "the GGUF file's metadata" if gguf_file else "its config.json"
        fix = ("give a GGUF file of an architecture transformers can load" if gguf_file
               else "write it again with model.save_pretrained(folder)")
        raise EvaError(f"--model {path!r}: {what} cannot be read by transformers ({one_line(exc)}); {fix}") from exc


def _max_positions(config) -> Optional[Tuple[int, str]]:
    """(number of positions, its config field) of a model config, or None when it has none."""
    configs = [config]
    get_text = getattr(config, "get_text_config", None)
    if callable(get_text):
        try:
            configs.append(get_text())
        except (AttributeError, ValueError):
            pass
    for cfg in configs:
        for field in ("max_position_embeddings", "n_positions"):
            value = getattr(cfg, field, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value, field
    return None


def _check_max_length(max_length: int, config, path: str) -> None:
    """``--max-length`` is at most the model's number of positions."""
    limit = _max_positions(config)
    if limit is not None and max_length > limit[0]:
        raise EvaError(f"--max-length {max_length} is beyond the {limit[0]} positions of --model {path!r} "
                       f"({limit[1]} in config.json); use --max-length {limit[0]} or less")


def _device_support(kind: str) -> Tuple[Optional[bool], Optional[int], str]:
    """(available?, device count, why not) for a torch device type; None when torch cannot tell."""
    import torch
    if kind == "cuda":
        why = (f"this torch build, {torch.__version__}, has no CUDA support"
               if torch.version.cuda is None and getattr(torch.version, "hip", None) is None
               else "no CUDA GPU is visible")
        available = torch.cuda.is_available()
        return available, (torch.cuda.device_count() if available else 0), why
    if kind == "mps":
        built = torch.backends.mps.is_built()
        return (torch.backends.mps.is_available(), None,
                "MPS needs an Apple-silicon Mac" if built else "this torch build has no MPS support")
    module = getattr(torch, kind, None)
    probe = getattr(module, "is_available", None)
    if not callable(probe):
        return None, None, ""
    count = getattr(module, "device_count", None)
    available = bool(probe())
    return available, (count() if available and callable(count) else None), f"no {kind} device is visible"


def _check_device(name: Optional[str]) -> str:
    """The device to run on: ``name`` checked against this machine, or cuda/cpu by default."""
    import torch
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name.strip())
    except (RuntimeError, ValueError, TypeError):
        raise EvaError(f"--device {name!r}: not a device; use cpu, cuda, cuda:N or mps") from None
    if device.type == "meta":
        raise EvaError(f"--device {name!r}: the meta device holds no data, so nothing can be computed; "
                       "use --device cpu or cuda")
    available, count, why = _device_support(device.type)
    if available is False:
        raise EvaError(f"--device {name!r}: {device.type} is not available on this machine ({why}); "
                       "use --device cpu")
    if device.index is not None and count is not None and device.index >= count:
        raise EvaError(f"--device {name!r}: this machine has {count} {device.type} device(s) "
                       f"({device.type}:0 to {device.type}:{count - 1}); pick one of those")
    return str(device)


def _lora_settings(args, task: str):
    """(LoraConfig, engine options, resolved settings), validated as the engine will (this also
    checks the EVA_BACKEND environment variable). ``task`` sets PEFT's ``task_type``."""
    from .tasks import peft_task_type
    from ..config import resolve_settings
    try:
        from peft import LoraConfig
        from peft.tuners.lora.config import EvaConfig
    except ImportError as exc:
        raise EvaError("this command needs peft: pip install peft") from exc
    try:
        config = LoraConfig(r=args.rank, target_modules=args.target_modules, init_lora_weights="eva",
                            task_type=peft_task_type(task),
                            eva_config=EvaConfig(rho=args.rho, tau=args.tau, whiten=args.whiten))
    except ValueError as exc:  # PEFT's own checks (plain ValueError)
        raise EvaError(f"invalid LoRA/EVA settings: {one_line(exc)}; fix --rank/--rho/--tau") from exc
    options = {"centered": not args.uncentered, "max_steps": args.max_steps, "backend": args.backend,
               "memory_budget": args.memory_budget, "blocks": args.blocks, "offload_device": args.offload_device}
    return config, options, resolve_settings(config, options)


def _layer_kinds(names: List[str], limit: int = 12) -> str:
    """Distinct layer names without their ``....<index>.`` prefix, e.g. ``attention.self.query``."""
    kinds: List[str] = []
    for name in names:
        kind = re.sub(r"^.*\.\d+\.", "", name)
        if kind not in kinds:
            kinds.append(kind)
    return ", ".join(kinds[:limit]) + (", ..." if len(kinds) > limit else "")


def _check_targets(model_config, settings, targets: Union[str, List[str]], path: str, task: str) -> None:
    """Every --target-modules name matches a layer, and together they match at least one linear
    layer of the model; checked on a weightless copy of the ``--task`` class built from the config
    on the meta device (skipped when that copy cannot be built)."""
    import torch

    from ..peft.suggest import closest, name_suffixes
    from ..peft.targets import find_targets, in_features_of, unmatched_target_entries, unmatched_target_message
    from .tasks import auto_class
    try:
        with torch.device("meta"):
            skeleton = auto_class(task).from_config(model_config)
    except Exception:  # an architecture that cannot be built without weights: the engine checks later
        return
    unmatched = unmatched_target_entries(skeleton, targets, False)
    if unmatched and len(unmatched) < len(set(targets)):  # others match: these would be dropped silently
        raise EvaError(unmatched_target_message(skeleton, unmatched, "--target-modules").replace(
            "no layer of the model", f"no layer of --model {path!r}").replace(
            "see model.named_modules()", "see eva init --help"))
    if find_targets(skeleton, settings, False):
        return
    linear = [n for n, m in skeleton.named_modules() if in_features_of(m) is not None]
    near = closest(targets[0], name_suffixes(linear)) if isinstance(targets, list) and linear else []
    raise EvaError(f"--target-modules {_targets_text(targets)!r} matches no linear layer of --model "
                   f"{path!r}; its linear layers are {_layer_kinds(linear) or 'none'}"
                   f"{f' (closest to {targets[0]!r}: ' + ', '.join(near) + ')' if near else ''}; give some of those "
                   "(comma-separated) or all-linear")


def check_inputs(args, model_path: str, data_path: str) -> Plan:
    """The check phase: every input, in the order of ``eva init --help``, before any loading."""
    _check_outputs(args.out, args.plot, data_path)
    from .text_data import read_lines
    lines = read_lines(data_path, "--data")
    gguf_file = _check_model_source(model_path)
    model_config = _read_model_config(model_path, gguf_file)
    _check_max_length(args.max_length, model_config, model_path)
    task = resolve_task(args.task, model_config, gguf_file, model_path)
    device = _check_device(args.device)
    lora_config, options, settings = _lora_settings(args, task)
    _check_targets(model_config, settings, args.target_modules, model_path, task)
    return Plan(model_path, data_path, lines, device, lora_config, options, gguf_file, task)
