"""How many CSV rows go to each split of ``eva compare``.

:func:`fit_sizes` takes the sizes the user passed (``None``: not passed) and the number of rows.
Sizes not passed start from :data:`DEFAULT_SIZES`; when those do not fit a small CSV they are
scaled down by one factor (and the result is said in one line, :attr:`SplitSizes.note`). Sizes
the user passed are never changed: when they do not fit, :class:`SizeError` names the flags, the
rows there are and sizes that would fit. The calibration rows (EVA's) come from the training
split, so their number never exceeds it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

from ..errors import EvaError

#: split -> default number of rows (``--train-size``, ``--validation-size``, ``--test-size``)
DEFAULT_SIZES: Dict[str, int] = {"train": 1200, "validation": 200, "test": 400}
#: default ``--calibration-size`` (lowered to the training rows when there are fewer)
DEFAULT_CALIBRATION = 64
#: the fewest rows a split may have
MINIMUM: Dict[str, int] = {"train": 2, "validation": 1, "test": 1}
FLAGS: Dict[str, str] = {"train": "--train-size", "validation": "--validation-size", "test": "--test-size",
                         "calibration": "--calibration-size"}


class SizeError(EvaError):
    """Sizes passed on the command line that the CSV cannot hold; ``eva compare`` prints it as
    ``eva compare: error: ...``."""


@dataclass
class SplitSizes:
    """Rows per split; ``note`` is one line when the defaults were scaled down, else ``""``."""

    train: int
    validation: int
    test: int
    calibration: int
    note: str = ""

    def as_flags(self) -> str:
        """The sizes as the command-line flags that reproduce them."""
        return flags_text({k: getattr(self, k) for k in FLAGS})


def flags_text(sizes: Dict[str, int]) -> str:
    """``{"train": 400, ...}`` as ``"--train-size 400 ..."`` (in the order of :data:`FLAGS`)."""
    return " ".join(f"{FLAGS[k]} {sizes[k]}" for k in FLAGS if k in sizes)


def scale(sizes: Dict[str, int], rows: int) -> Dict[str, int]:
    """``sizes`` times one factor so that they sum to at most ``rows`` (rounded down, each at
    least its :data:`MINIMUM`); ``rows`` must hold the minimums."""
    total = sum(sizes.values())
    out = {k: max(MINIMUM[k], v * rows // total) for k, v in sizes.items()}
    while sum(out.values()) > rows:  # a minimum pushed the sum over: take from the largest split
        largest = max((k for k in out if out[k] > MINIMUM[k]), key=out.__getitem__)
        out[largest] -= 1
    return out


def _too_big(given: Dict[str, int], wanted: Dict[str, int], rows: int, source: str) -> SizeError:
    """The refusal of passed sizes that do not fit, with sizes that do (the same proportions)."""
    fit = flags_text({k: v for k, v in scale(wanted, rows).items() if k in given})
    free = [k for k in wanted if k not in given]
    if not free:
        return SizeError(f"{flags_text(given)} need {sum(given.values())} rows, but {source} has {rows}; sizes "
                         f"that fit (the same proportions): {fit}; or leave the three out to scale the defaults down")
    left = max(rows - sum(given.values()), 0)
    return SizeError(f"{flags_text(given)} leaves {left} of the {rows} rows of {source} for "
                     f"{' and '.join(FLAGS[k] for k in free)} (at least {sum(MINIMUM[k] for k in free)}); "
                     f"sizes that fit: {fit}")


def _scaled_note(given: Dict[str, int], free: Dict[str, int], rows: int, source: str) -> str:
    """The start of the line that says the default sizes were scaled down (the sizes used follow)."""
    beside = f" beside {flags_text(given)}" if given else ""
    return f"splits: {source} has {rows} rows, too few for the default {flags_text(free)}{beside}; scaled down to "


def fit_sizes(rows: int, *, train: Optional[int] = None, validation: Optional[int] = None,
              test: Optional[int] = None, calibration: Optional[int] = None, source: str = "the CSV") -> SplitSizes:
    """The split sizes for ``rows`` rows (module docstring); ``source`` names the file in messages.

    Raises :class:`EvaError` when ``rows`` cannot hold the smallest splits, :class:`SizeError`
    when passed sizes do not fit."""
    need_least = sum(MINIMUM.values())
    if rows < need_least:
        raise EvaError(f"{source}: {rows} rows, but the train / validation / test splits need at least "
                       f"{need_least} ({' + '.join(map(str, MINIMUM.values()))}); add rows")
    given = {k: v for k, v in (("train", train), ("validation", validation), ("test", test)) if v is not None}
    wanted = {k: given.get(k, d) for k, d in DEFAULT_SIZES.items()}
    sizes, note = dict(wanted), ""
    if sum(wanted.values()) > rows:
        free = {k: v for k, v in wanted.items() if k not in given}
        left = rows - sum(given.values())
        if not free or left < sum(MINIMUM[k] for k in free):
            raise _too_big(given, wanted, rows, source)
        sizes.update(scale(free, left))
        note = _scaled_note(given, free, rows, source)
    cal = _calibration(calibration, sizes["train"])
    result = SplitSizes(sizes["train"], sizes["validation"], sizes["test"], cal)
    if note:
        result.note = note + result.as_flags()
    return result


def _calibration(calibration: Optional[int], train: int) -> int:
    """The calibration rows: the passed number (refused above ``train``) or the default, at most ``train``."""
    if calibration is None:
        return min(DEFAULT_CALIBRATION, train)
    if calibration > train:
        raise SizeError(f"--calibration-size {calibration} is more than the {train} training rows (EVA calibrates "
                        f"on training rows only); pass --calibration-size {train} or less")
    return calibration
