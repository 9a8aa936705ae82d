"""The result of an EVA run: a PEFT-style state dict that also carries metadata.

:class:`EvaStateDict` is a plain ``dict`` (module name -> (rank, in_features) fp32 tensor, as
PEFT returns) with a ``metadata`` attribute: per-layer ranks, explained variance ratios,
tokens, steps, convergence, and the run's settings and timings. ``save``/``load_eva_state_dict``
write and read one ``.safetensors`` file whose header holds the metadata as JSON under the key
``"eva_metadata"``; the metadata's ``"format"`` entry (:data:`FORMAT`) marks the layout version.

The loader checks what it opens (empty, truncated, garbage, foreign or newer files, and
metadata that contradicts the tensors) and raises :class:`~eva.errors.EvaError` with one line
naming the file, what is wrong and what to do.
"""
from __future__ import annotations

import copy
import json
import os
import re
import stat
from typing import Any, Dict, List, Optional, Tuple

import torch

from .errors import EvaError
from .fileio import atomic_write

_META_KEY = "eva_metadata"

#: Format marker written into every file's metadata (``metadata["format"]``): name/version.
FORMAT = "eva-kernels/1"
_FORMAT_NAME, _FORMAT_VERSION = FORMAT.split("/")
_FORMAT_RE = re.compile(r"^eva-kernels/(\d+)$")

_HEADER_LEN_BYTES = 8
_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header
_REMEDY = "re-run `eva init` to write it again"


def _num(value: Any, default: float = float("nan")) -> float:
    """``value`` as a float for the summary table, ``default`` when it is not a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return default
    return float(value)


class EvaStateDict(dict):
    """``{module name: lora_A init (rank, in_features)}`` plus ``.metadata``."""

    def __init__(self, *args, metadata: Optional[Dict[str, Any]] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.metadata: Dict[str, Any] = metadata or {}

    @property
    def ranks(self) -> Dict[str, int]:
        """``{module name: rank}`` read from the tensors' first dimension."""
        return {k: int(v.shape[0]) for k, v in self.items()}

    def summary(self) -> str:
        """Human-readable table: layer, rank, top explained variance ratio, the tokens it used,
        the batches it used of those the run read (all of them unless it converged earlier)."""
        layers = self.metadata.get("layers", {})
        layers = layers if isinstance(layers, dict) else {}
        run = self.metadata.get("run", {})
        read = run.get("batches_read") if isinstance(run, dict) else None
        width = max([len(k) for k in self] + [5])
        lines = [f"{'layer':<{width}}  rank  evr[0]   tokens    batches  converged"]
        for name, w in self.items():
            info = layers.get(name, {})
            info = info if isinstance(info, dict) else {}
            evr = info.get("explained_variance_ratio")
            evr0 = _num(evr[0]) if isinstance(evr, list) and evr else float("nan")
            tokens, steps = info.get("tokens", 0), info.get("steps", 0)
            batches = f"{steps}/{read}" if isinstance(read, int) else f"{steps}"
            lines.append(f"{name:<{width}}  {w.shape[0]:>4}  {evr0:.4f}  {tokens!s:>7}  {batches:>9}  "
                         f"{info.get('converged', '?')}")
        if isinstance(run, dict) and run:
            lines.append(f"total rank {sum(self.ranks.values())} (budget {run.get('rank_budget')}), "
                         f"{run.get('steps')} batches, {_num(run.get('seconds'), 0.0):.2f} s")
        return "\n".join(lines)

    def describe(self) -> str:
        """Where the result came from (model, data, settings, run, software, device, date; see
        :func:`eva.provenance.format_provenance`), then :meth:`summary` -- what ``eva inspect`` prints."""
        from .provenance import format_provenance
        return f"{format_provenance(self.metadata)}\n\n{self.summary()}"

    @property
    def provenance(self) -> Dict[str, Any]:
        """``metadata["provenance"]``: date, software versions, device, and for ``eva init`` results
        the command, model and data files (``{}`` for files written before it was recorded)."""
        value = self.metadata.get("provenance")
        return value if isinstance(value, dict) else {}

    def save(self, path: str) -> str:
        """Write tensors + JSON metadata to one safetensors file, atomically; returns ``path``.

        Tensors are stored as contiguous fp32 on the CPU and must be 2-D ``(rank, in_features)``
        (rank 0 is fine). The file's metadata is a copy of ``.metadata`` brought in line with the
        tensors (``.metadata`` itself is left as it is): ``format`` is set to :data:`FORMAT`
        when absent, ``order`` is the dict's key order, and each existing ``layers[name]`` entry
        gets ``rank``/``in_features`` from its tensor's shape.
        The file is written through :func:`eva.fileio.atomic_write`: an existing file survives
        any failure, and disk errors come out as :class:`~eva.errors.EvaError`.
        """
        from safetensors.torch import save as serialize
        for name, v in self.items():
            if not isinstance(name, str) or not isinstance(v, torch.Tensor) or v.dim() != 2:
                shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise EvaError(f"cannot save {path!r}: entry {name!r} is {shape}, not a 2-D (rank, in_features) "
                               "tensor; store rank-0 layers as an empty (0, in_features) tensor")
        meta = copy.deepcopy(self.metadata)
        fmt = meta.setdefault("format", FORMAT)
        if fmt != FORMAT:
            raise EvaError(f"cannot save {path!r}: metadata['format'] is {fmt!r} but this version writes {FORMAT!r}; "
                           "remove or fix that entry")
        meta["order"] = list(self)
        layers = meta.get("layers")
        if isinstance(layers, dict):
            for name, v in self.items():
                if isinstance(layers.get(name), dict):
                    layers[name]["rank"], layers[name]["in_features"] = int(v.shape[0]), int(v.shape[1])
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.items()}
        blob = serialize(tensors, metadata={_META_KEY: json.dumps(meta, default=str)})

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                f.write(blob)

        return atomic_write(path, write)


def _fail(path: str, problem: str) -> EvaError:
    """An :class:`EvaError` whose one-line message names the file first."""
    return EvaError(f"cannot load {path!r}: {problem}".replace("\n", " "))


def _read_header(path: str) -> Tuple[Dict[str, Any], int]:
    """Open ``path`` and parse its safetensors header; returns (header dict, file size).

    Raises :class:`EvaError` for a missing/unreadable/non-regular file, an empty or truncated
    file, a header that is not safetensors, and tensor data shorter or longer than declared.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise _fail(path, "no such file; check the path (files are written by `eva init --out`)") from None
    except OSError as exc:
        raise _fail(path, f"it cannot be opened: {exc.strerror or exc}; check the path and its permissions") from exc
    if stat.S_ISDIR(st.st_mode):
        raise _fail(path, "it is a directory; give the .safetensors file written by `eva init --out`")
    if not stat.S_ISREG(st.st_mode):
        raise _fail(path, "it is not a regular file; give the .safetensors file written by `eva init --out`")
    size = st.st_size
    if size == 0:
        raise _fail(path, f"it is empty (0 bytes); the write was interrupted or the file was clobbered; {_REMEDY}")
    try:
        with open(path, "rb") as f:
            head = f.read(_HEADER_LEN_BYTES)
            if len(head) < _HEADER_LEN_BYTES:
                raise _fail(path, f"it is only {size} byte(s), too short for a safetensors file (truncated or not "
                                  f"safetensors); {_REMEDY}")
            n = int.from_bytes(head, "little")
            if n == 0 or n > _MAX_HEADER:
                raise _fail(path, "it is not a safetensors file (its first 8 bytes are not a plausible header "
                                  "length); give a file written by `eva init --out`")
            raw = f.read(min(n, size))
    except OSError as exc:
        raise _fail(path, f"it cannot be read: {exc.strerror or exc}; check the file and its permissions") from exc
    if len(raw) < n:
        if raw[:1] in (b"{", b""):  # plausible length, then the file ends (inside the header)
            raise _fail(path, f"it is truncated: {size} bytes, but its header alone needs {_HEADER_LEN_BYTES + n}; "
                              f"{_REMEDY}")
        raise _fail(path, "it is not a safetensors file (header length larger than the file); give a file "
                          "written by `eva init --out`")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise _fail(path, "it is not a safetensors file (its header is not JSON); give a file written by "
                          "`eva init --out`") from None
    if not isinstance(header, dict):
        raise _fail(path, "it is not a safetensors file (its header is not a JSON object); give a file written "
                          "by `eva init --out`")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise _fail(path, f"it has a corrupt safetensors header ('__metadata__' is not a string map); {_REMEDY}")
            continue
        ok = (isinstance(entry, dict) and isinstance(entry.get("dtype"), str)
              and isinstance(entry.get("shape"), list)
              and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in entry["shape"])
              and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2
              and all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in entry["data_offsets"])
              and entry["data_offsets"][0] <= entry["data_offsets"][1])
        if not ok:
            raise _fail(path, f"it has a corrupt safetensors header (entry {name!r}); {_REMEDY}")
        end = max(end, entry["data_offsets"][1])
    expected = _HEADER_LEN_BYTES + n + end
    if expected > size:
        raise _fail(path, f"it is truncated: {size} bytes, but its header describes {expected}; {_REMEDY}")
    if expected < size:
        raise _fail(path, f"it is corrupt: {size - expected} unexpected byte(s) after the tensor data; {_REMEDY}")
    return header, size


def _check_format(path: str, meta: Dict[str, Any]) -> None:
    """Accept :data:`FORMAT` (and, as legacy, no marker at all); reject foreign or newer markers."""
    if "format" not in meta:
        return  # legacy: EvaStateDict.save of hand-built metadata did not stamp a marker (see load docstring)
    fmt = meta["format"]
    m = _FORMAT_RE.match(fmt) if isinstance(fmt, str) else None
    if m is None:
        raise _fail(path, f"it has format marker {fmt!r}, not {_FORMAT_NAME}/<version>; it was not written by "
                          "eva-kernels; give a file written by `eva init --out`")
    version = int(m.group(1))
    if version > int(_FORMAT_VERSION):
        raise _fail(path, f"it was written by a newer eva-kernels (format {fmt}); this version reads {FORMAT}; "
                          "upgrade eva-kernels")
    if version < int(_FORMAT_VERSION):
        raise _fail(path, f"it has format {fmt}, which this version ({FORMAT}) does not read; {_REMEDY}")


def _check_consistency(path: str, header: Dict[str, Any], meta: Dict[str, Any]) -> List[str]:
    """Tensors 2-D fp32, ``order`` == the stored tensors, ``layers`` ranks == shapes; returns the order."""
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    for name, entry in entries.items():
        if entry["dtype"] != "F32" or len(entry["shape"]) != 2:
            raise _fail(path, f"tensor {name!r} is {entry['dtype']} with shape {entry['shape']}; EVA files hold 2-D "
                              f"F32 (rank, in_features) tensors; the file is corrupt or not from EvaStateDict.save; "
                              f"{_REMEDY}")
    for key, kind in (("layers", dict), ("run", dict), ("settings", dict), ("groups", list), ("model", dict),
                      ("provenance", dict)):
        if key in meta and not isinstance(meta[key], kind):
            raise _fail(path, f"metadata entry {key!r} is a {type(meta[key]).__name__}, not a {kind.__name__}; "
                              f"the file is corrupt; {_REMEDY}")
    order = meta.get("order")
    if order is None:
        order = list(entries)
    elif not isinstance(order, list) or not all(isinstance(n, str) for n in order):
        raise _fail(path, f"metadata 'order' is not a list of layer names; the file is corrupt; {_REMEDY}")
    elif len(set(order)) != len(order):
        dup = next(n for i, n in enumerate(order) if n in order[:i])
        raise _fail(path, f"metadata 'order' names {dup!r} twice; the file is corrupt; {_REMEDY}")
    absent = [n for n in order if n not in entries]
    if absent:
        raise _fail(path, f"metadata 'order' names {len(absent)} tensor(s) the file does not hold (e.g. "
                          f"{absent[0]!r}); the file is corrupt; {_REMEDY}")
    listed = set(order)
    unlisted = [n for n in entries if n not in listed]
    if unlisted:
        raise _fail(path, f"it holds {len(unlisted)} tensor(s) missing from metadata 'order' (e.g. {unlisted[0]!r}); "
                          f"the file is corrupt; {_REMEDY}")
    layers = meta.get("layers", {})
    for name in order:
        info = layers.get(name)
        if not isinstance(info, dict):
            continue
        shape = entries[name]["shape"]
        for key, axis in (("rank", 0), ("in_features", 1)):
            if key in info and (isinstance(info[key], bool) or info[key] != shape[axis]):
                raise _fail(path, f"layer {name!r} has metadata {key} {info[key]!r} but its tensor is "
                                  f"{shape[0]} x {shape[1]}; the file is corrupt; {_REMEDY}")
    return order


def load_eva_state_dict(path: str, device: Optional[str] = None) -> EvaStateDict:
    """Read a file written by :meth:`EvaStateDict.save` (metadata restored, order preserved).

    Every problem with the file raises :class:`~eva.errors.EvaError`, one line naming ``path``:
    missing, a directory, empty, truncated, not safetensors, a safetensors file without the
    ``"eva_metadata"`` header entry (e.g. a model's own weights), metadata that is not a JSON
    object, a foreign format marker or a newer format version, tensors that are not 2-D float32,
    ``order`` not matching the stored tensors, and per-layer ``rank``/``in_features`` that
    contradict the tensor shapes.

    Files without a ``"format"`` entry are accepted as version 1: the previous ``save`` wrote
    the metadata it was given verbatim, so ``EvaStateDict(tensors).save(p)`` produced them; the
    ``"eva_metadata"`` header entry already marks the file as ours, and all the structural
    checks still apply. Tensors are read on the CPU, then moved to ``device`` (if given).
    """
    from safetensors import safe_open
    path = os.fspath(path)
    header, _ = _read_header(path)
    stored = (header.get("__metadata__") or {})
    entries = [k for k in header if k != "__metadata__"]
    if _META_KEY not in stored:
        example = f" (e.g. {entries[0]!r})" if entries else ""
        raise _fail(path, f"it is not an EVA file: a safetensors file with {len(entries)} tensor(s){example} but no "
                          f"{_META_KEY!r} header entry; files written by `eva init` / EvaStateDict.save carry it; "
                          "give one of those")
    try:
        meta = json.loads(stored[_META_KEY])
    except ValueError as exc:
        raise _fail(path, f"its {_META_KEY!r} header entry is not valid JSON ({exc}); the file is corrupt; "
                          f"{_REMEDY}") from None
    if not isinstance(meta, dict):
        raise _fail(path, f"its {_META_KEY!r} header entry is a JSON {type(meta).__name__}, not an object; the file "
                          f"is corrupt; {_REMEDY}")
    _check_format(path, meta)
    order = _check_consistency(path, header, meta)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in order}
    except Exception as exc:  # safetensors' own checks (SafetensorError) after ours passed: still the file
        raise _fail(path, f"safetensors cannot read it ({exc}); {_REMEDY}") from exc
    for name, t in tensors.items():
        if t.dim() != 2 or t.dtype != torch.float32:  # belt and braces; the header check covers this
            raise _fail(path, f"tensor {name!r} loaded as {t.dtype} {tuple(t.shape)}, not 2-D float32; {_REMEDY}")
    if device is not None and torch.device(device) != torch.device("cpu"):
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return EvaStateDict(tensors, metadata=meta)
