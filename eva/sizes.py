"""Byte sizes as users write them: ``8GB``, ``512 MiB``, ``2e9``, ``1.5gb``.

Decimal units (``KB``, ``MB``, ``GB``, ``TB``: powers of 1000) and binary units (``KiB``,
``MiB``, ``GiB``, ``TiB``: powers of 1024), case-insensitive, with an optional ``B``; a bare
number is bytes. :func:`format_bytes` is the inverse used in messages (decimal, 3 digits).
"""
from __future__ import annotations

import math
import numbers
import re

from .errors import EvaError

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_bytes(value, what: str = "size") -> int:
    """``value`` (int bytes, or a string such as ``"8GB"``) as a positive int of bytes.

    Raises :class:`EvaError` naming ``what`` and showing accepted spellings.
    """
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        if value >= 1:
            return int(value)
    elif isinstance(value, str):
        m = _SIZE.match(value)
        if m and m.group(2).lower() in _UNITS:
            n = float(m.group(1)) * _UNITS[m.group(2).lower()]
            if math.isfinite(n) and n >= 1:
                return int(n)
    raise EvaError(f"{what} must be a positive number of bytes, as an int or a string such as '8GB', "
                   f"'512MiB' or '2e9'; got {value!r}")


def format_bytes(n: int) -> str:
    """``n`` bytes in decimal units with 3 significant digits (``'3.29 GB'``)."""
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"
