"""Labelled text for the fine-tuning comparison: a CSV read and checked, then split by seed.

:func:`read_labelled_csv` reads ``text`` and ``label`` columns (names given by the caller) and
checks, before any model is loaded: the file and the columns exist (the columns found are
listed), every text is non-empty, labels are integers or strings (mapped to ``0..C-1`` in sorted
order), there are at least two classes and enough rows for the splits. :func:`split` deals the
shuffled rows (fixed seed) into disjoint train / validation / test sets; EVA's calibration
batches come from the training split only (:func:`calibration_rows`).
"""
from __future__ import annotations

import csv
import os
import random
from dataclasses import dataclass
from typing import Dict, List, Sequence

from ..errors import EvaError


@dataclass
class Labelled:
    """Texts with integer labels ``0..C-1``; ``classes[i]`` is the original label of class ``i``."""

    texts: List[str]
    labels: List[int]
    classes: List[str]

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, index: Sequence[int]) -> "Labelled":
        return Labelled([self.texts[i] for i in index], [self.labels[i] for i in index], self.classes)


@dataclass
class Splits:
    train: Labelled
    validation: Labelled
    test: Labelled


def _label_key(values: List[str]):
    """Integers sort numerically (and must all be integers), else strings sort as strings."""
    try:
        ints = [int(v) for v in values]
    except ValueError:
        return sorted(set(values)), False
    if any(str(i) != v.strip() for i, v in zip(ints, values)):  # "1.5" or "01" are not integer labels
        return sorted(set(values)), False
    return [str(v) for v in sorted(set(ints))], True


def read_labelled_csv(path: str, text_column: str, label_column: str, *, need_rows: int = 0,
                      limit: int = 0) -> Labelled:
    """The rows of ``path`` as :class:`Labelled` (at most ``limit`` rows when > 0, in file order).

    Raises :class:`EvaError` naming the file, the column, the count and the fix: a missing
    file or column, an empty text or label, a label that is a float, a single class, fewer than
    ``need_rows`` rows.
    """
    if not os.path.isfile(path):
        raise EvaError(f"--data {path!r}: no such file; pass a CSV file with a header row")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = reader.fieldnames or []
            missing = [c for c in (text_column, label_column) if c not in columns]
            if missing:
                raise EvaError(f"--data {path!r}: no column {missing[0]!r}; its columns are {columns}; pass "
                               f"--text-column / --label-column with one of them")
            texts, raw = [], []
            for line, row in enumerate(reader, start=2):
                text, label = (row.get(text_column) or "").strip(), (row.get(label_column) or "").strip()
                if not text or not label:
                    which = text_column if not text else label_column
                    raise EvaError(f"--data {path!r}: line {line} has an empty {which!r}; remove the row or fill it")
                texts.append(text)
                raw.append(label)
                if limit and len(texts) >= limit:
                    break
    except UnicodeDecodeError as exc:
        raise EvaError(f"--data {path!r}: not UTF-8 ({exc.reason} at byte {exc.start}); convert it with iconv") from None
    classes, numeric = _label_key(raw)
    if not numeric and any(_is_float(v) for v in raw):
        bad = next(v for v in raw if _is_float(v))
        raise EvaError(f"--data {path!r}: column {label_column!r} holds {bad!r}: labels must be integers or strings "
                       "(class names), not fractional numbers; this command does classification only")
    if len(classes) < 2:
        raise EvaError(f"--data {path!r}: column {label_column!r} has a single class ({classes[0]!r} in all "
                       f"{len(raw)} rows); classification needs at least two")
    if len(texts) < need_rows:
        raise EvaError(f"--data {path!r}: {len(texts)} rows, but the splits need at least {need_rows}; add rows or "
                       "lower --train-size / --test-size")
    index: Dict[str, int] = {c: i for i, c in enumerate(classes)}
    key = (lambda v: str(int(v))) if numeric else (lambda v: v)
    return Labelled(texts, [index[key(v)] for v in raw], classes)


def _is_float(v: str) -> bool:
    try:
        float(v)
    except ValueError:
        return False
    return True


def split(data: Labelled, train: int, validation: int, test: int, seed: int) -> Splits:
    """Disjoint random train / validation / test subsets of the given sizes (fixed by ``seed``)."""
    order = list(range(len(data)))
    random.Random(seed).shuffle(order)
    a, b = train, train + validation
    return Splits(data.take(order[:a]), data.take(order[a:b]), data.take(order[b:b + test]))


def calibration_rows(train: Labelled, n: int, seed: int) -> Labelled:
    """``n`` rows of the training split for EVA's calibration (never validation or test rows)."""
    order = list(range(len(train)))
    random.Random(seed + 1).shuffle(order)
    return train.take(order[:n])
