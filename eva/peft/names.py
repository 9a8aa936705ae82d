"""Layer names that survive re-wrapping: an EVA result computed on one module tree loads into another.

``eva init`` may calibrate ``AutoModel`` (names ``layers.0.self_attn.q_proj``) while the user
fine-tunes ``get_peft_model(AutoModelForCausalLM...)`` (names
``base_model.model.model.layers.0.self_attn.q_proj``). The layers are the same; only the path
from the root to transformers' *base model* differs.

A :class:`ModelFrame` records, for the root module a result was computed on:

* ``task_prefix``: the dotted path (with its trailing dot) of the task model inside the root:
  ``""`` for a plain model, ``"base_model.model."`` inside a ``PeftModel``;
* ``base_prefix``: the path of transformers' base model (``task.base_model``, found by object
  identity, never by name): ``""`` for ``AutoModel``, ``"model."`` for ``LlamaForCausalLM``,
  ``"bert."`` for ``BertForSequenceClassification``, ``"base_model.model.model."`` for a PEFT
  causal LM;
* the classes and ``config.model_type``, to name both models when they do not match.

A name then splits into a scope and a relative name (:meth:`ModelFrame.split`): ``"base"`` for
modules inside the base model (the transformer layers), ``"task"`` for the task model's own
modules outside it (heads), ``"root"`` otherwise; :meth:`ModelFrame.join` puts it back in
another frame. :func:`match_names` maps a state dict's keys onto a model's LoRA layers this way.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Iterable, List, Optional, Tuple

from torch import nn

from ..errors import EvaError
from .targets import PEFT_PREFIX

#: config entries that say how a model was loaded, not what it is (left out of the config hash).
_VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash",
                         "_attn_implementation", "_attn_implementation_autoset", "attn_implementation",
                         "use_cache", "output_hidden_states", "output_attentions", "return_dict")


@dataclass(frozen=True)
class ModelFrame:
    """Where the task model and transformers' base model sit inside a root module (see module doc)."""

    model_class: str
    base_class: str
    model_type: Optional[str]
    task_prefix: str
    base_prefix: str
    config_sha256: Optional[str] = None
    name_or_path: Optional[str] = None

    def split(self, name: str) -> Tuple[str, str]:
        """``(scope, relative name)`` of a module name of this root (scope: base, task or root)."""
        if name.startswith(self.base_prefix):
            return "base", name[len(self.base_prefix):]
        if name.startswith(self.task_prefix):
            return "task", name[len(self.task_prefix):]
        return "root", name

    def join(self, scope: str, relative: str) -> str:
        """The module name in this root of ``relative`` in ``scope`` (inverse of :meth:`split`)."""
        return {"base": self.base_prefix, "task": self.task_prefix}.get(scope, "") + relative

    def describe(self) -> str:
        """``"LlamaForCausalLM (model_type 'llama', from 'path')"`` for messages."""
        parts = [f"model_type {self.model_type!r}"] if self.model_type else []
        if self.name_or_path:
            parts.append(f"from {self.name_or_path!r}")
        return f"{self.model_class}" + (f" ({', '.join(parts)})" if parts else "")

    def to_metadata(self) -> Dict[str, Optional[str]]:
        """The frame as the metadata's ``"model"`` entry (JSON-ready)."""
        return asdict(self)

    @classmethod
    def from_metadata(cls, entry) -> Optional["ModelFrame"]:
        """The frame stored by :meth:`to_metadata`, or None when ``entry`` is not one (older files)."""
        if not isinstance(entry, dict):
            return None
        if not all(isinstance(entry.get(k), str) for k in ("model_class", "base_class", "task_prefix", "base_prefix")):
            return None
        fields = cls.__dataclass_fields__
        return cls(**{k: entry.get(k) for k in fields})


def config_sha256(config) -> Optional[str]:
    """SHA-256 of a transformers config as sorted JSON, without the entries that only say how the
    model was loaded (:data:`_VOLATILE_CONFIG_KEYS`); None when ``config`` has no ``to_dict``."""
    to_dict = getattr(config, "to_dict", None)
    if not callable(to_dict):
        return None
    entries = {k: v for k, v in to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(entries, sort_keys=True, default=str).encode()).hexdigest()


def _path_of(root: nn.Module, target: nn.Module) -> Optional[str]:
    """Dotted path (with a trailing dot, ``""`` for the root) of ``target`` inside ``root``, by identity."""
    for name, module in root.named_modules():
        if module is target:
            return f"{name}." if name else ""
    return None


def task_model(root: nn.Module) -> nn.Module:
    """The model a ``PeftModel`` wraps (``get_base_model()``), else ``root`` itself."""
    if hasattr(root, "peft_config") and callable(getattr(root, "get_base_model", None)):
        return root.get_base_model()
    return root


def transformers_base(task: nn.Module) -> nn.Module:
    """transformers' base model of ``task`` (the module named by ``base_model_prefix``), else ``task``."""
    prefix = getattr(task, "base_model_prefix", None)
    base = getattr(task, prefix, None) if isinstance(prefix, str) and prefix else None
    return base if isinstance(base, nn.Module) else task


def model_frame(root: nn.Module) -> ModelFrame:
    """The :class:`ModelFrame` of ``root`` (a plain model, a ``PeftModel``, or any ``nn.Module``)."""
    task = task_model(root)
    base = transformers_base(task)
    task_prefix = _path_of(root, task) or ""
    base_prefix = _path_of(root, base)
    config = getattr(task, "config", None)
    return ModelFrame(
        model_class=type(task).__name__, base_class=type(base).__name__,
        model_type=getattr(config, "model_type", None) or None,
        task_prefix=task_prefix, base_prefix=task_prefix if base_prefix is None else base_prefix,
        config_sha256=config_sha256(config) if config is not None else None,
        name_or_path=(getattr(config, "_name_or_path", None) or None) if config is not None else None)


def _guesses(key: str, target: ModelFrame) -> List[str]:
    """Names ``key`` may have in ``target`` when the state dict records no frame (PEFT's own
    results, hand-built dicts): as written, with or without PEFT's prefix, or base-relative."""
    bare = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
    return [key, PEFT_PREFIX + key, bare, target.base_prefix + bare, target.task_prefix + bare]


def match_names(keys: Iterable[str], saved: Optional[ModelFrame], target: ModelFrame,
                is_layer: Callable[[str], bool]) -> Dict[str, Optional[str]]:
    """``{state dict key: module name in the target (None: no such layer)}``.

    With a recorded frame, a key maps by scope (:meth:`ModelFrame.split` then ``join``); without
    one, the first of :func:`_guesses` that ``is_layer``. Raises :class:`EvaError` when the
    recorded model type differs from the target's, or when two keys land on the same layer.
    """
    if saved is not None and saved.model_type and target.model_type and saved.model_type != target.model_type:
        raise EvaError(f"the eva state dict was computed on {saved.describe()}, but this model is "
                       f"{target.describe()}; compute it on this model (eva init --model <its folder>, or "
                       "get_eva_state_dict(model, ...)) or load the file computed for it")
    out: Dict[str, Optional[str]] = {}
    owner: Dict[str, str] = {}
    for key in keys:
        candidates = [target.join(*saved.split(key)), key] if saved is not None else _guesses(key, target)
        name = next((c for c in candidates if is_layer(c)), None)
        if name is not None and name in owner:
            raise EvaError(f"eva_state_dict entries {owner[name]!r} and {key!r} both name layer {name}; keep one")
        if name is not None:
            owner[name] = key
        out[key] = name
    return out
