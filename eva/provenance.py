"""Where a result came from: the software, the device and the date of a run (``metadata["provenance"]``).

:func:`run_provenance` is recorded by every :func:`eva.get_eva_state_dict` call; ``eva init``
adds the model file and the data file (:func:`file_facts`) under ``"source"``. The model's own
facts (class, ``model_type``, config hash, the base model's path) are ``metadata["model"]``,
written by :func:`eva.peft.names.model_frame`.
"""
from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import os
import platform
from typing import Any, Dict, Optional

import torch

#: Packages whose versions a result records (absent ones are left out).
_PACKAGES = ("eva-kernels", "torch", "triton", "transformers", "peft", "accelerate")


def _version(package: str) -> Optional[str]:
    """Installed version of ``package``, or None."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def software_versions() -> Dict[str, str]:
    """``{package: version}`` of :data:`_PACKAGES` that are installed, and ``python``."""
    out = {p: v for p in _PACKAGES if (v := _version(p)) is not None}
    out["python"] = platform.python_version()
    return out


def describe_device(device: Optional[torch.device]) -> str:
    """``"cpu"``, ``"cuda:0 (NVIDIA H100 80GB HBM3)"``, or ``"several devices"`` for None."""
    if device is None:
        return "several devices"
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return str(device)


def run_provenance(device: Optional[torch.device]) -> Dict[str, Any]:
    """``{"date": UTC ISO 8601, "software": versions, "device": text}`` of the run happening now."""
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    return {"date": now.isoformat().replace("+00:00", "Z"), "software": software_versions(),
            "device": describe_device(device)}


def file_facts(path: str, count_lines: bool = False, content_hash: bool = True) -> Dict[str, Any]:
    """``{"path": absolute, "bytes": size, "sha256": content hash}`` of a file (and ``"lines"``:
    its non-empty lines, when ``count_lines``). The hash (read in 1 MiB chunks) is left out when
    not ``content_hash``: model weights are identified by their config hash instead."""
    out: Dict[str, Any] = {"path": os.path.abspath(path), "bytes": os.path.getsize(path)}
    if content_hash:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        out["sha256"] = digest.hexdigest()
    if count_lines:
        with open(path, "rb") as f:
            out["lines"] = sum(1 for line in f if line.strip())
    return out


def _size(n: Any) -> str:
    """``"98.4 MB"`` for a byte count (decimal units, as file managers show them)."""
    if not isinstance(n, int):
        return "? bytes"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _settings_line(settings: Dict[str, Any]) -> str:
    """The settings a reader compares first, then every other one, ``key=value``."""
    first = ("r", "rho", "tau", "target_modules", "whiten", "centered", "convergence", "backend", "memory_budget")
    keys = [k for k in first if k in settings] + sorted(k for k in settings if k not in first)
    return " ".join(f"{k}={settings[k]}" for k in keys)


def format_provenance(metadata: Dict[str, Any]) -> str:
    """The lines ``eva inspect`` prints above the table: model, source files, settings, run,
    software, device, date (entries a file does not hold are left out; files written before
    eva-kernels recorded provenance get one line saying so)."""
    model = metadata.get("model") if isinstance(metadata.get("model"), dict) else {}
    prov = metadata.get("provenance") if isinstance(metadata.get("provenance"), dict) else {}
    source = prov.get("source") if isinstance(prov.get("source"), dict) else {}
    run = metadata.get("run") if isinstance(metadata.get("run"), dict) else {}
    lines = []
    if model:
        base = model.get("base_prefix") or ""
        lines.append(f"model     {model.get('model_class')} (model_type {model.get('model_type')!r}); base "
                     f"{model.get('base_class')} at {base[:-1] if base else 'the root'!r}; config sha256 "
                     f"{str(model.get('config_sha256'))[:16]}")
    if isinstance(source.get("model"), dict):
        m = source["model"]
        size = f" ({_size(m['bytes'])})" if "bytes" in m else ""
        lines.append(f"from      {m.get('path')}{size}, --task {source.get('task')}")
    if isinstance(source.get("data"), dict):
        d = source["data"]
        lines.append(f"data      {d.get('path')}: {d.get('lines')} lines, {_size(d.get('bytes'))}, sha256 "
                     f"{str(d.get('sha256'))[:16]}; batch {source.get('batch_size')} x <= {source.get('max_length')} "
                     f"tokens, {source.get('dtype')}")
    if isinstance(metadata.get("settings"), dict):
        lines.append(f"settings  {_settings_line(metadata['settings'])}")
    if run:
        parts = [f"mode {run['mode']}" if "mode" in run else None,
                 f"{run['steps']} batches used" + (f" of {run['batches_read']} read" if "batches_read" in run else "")
                 if "steps" in run else None,
                 f"stop: {run['stop_reason']}" if "stop_reason" in run else None,
                 f"convergence rule {run['convergence']}" if "convergence" in run else None]
        lines.append("run       " + ", ".join(p for p in parts if p))
    if isinstance(prov.get("software"), dict):
        lines.append("software  " + ", ".join(f"{k} {v}" for k, v in prov["software"].items()))
    if prov:
        lines.append(f"device    {prov.get('device')}; date {prov.get('date')}")
    if source.get("command"):
        lines.append(f"command   {source['command']}")
    if not prov:
        lines.append("provenance: not recorded (the file was written before eva-kernels recorded where results "
                     "come from)")
    return "\n".join(lines)
