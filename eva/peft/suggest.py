"""Close real names for a mistyped one (for error messages)."""
from __future__ import annotations

import difflib
from typing import Iterable, List, Set


def closest(name: str, names: Iterable[str], n: int = 3) -> List[str]:
    """Up to ``n`` of ``names`` closest to ``name`` (difflib's similarity ratio >= 0.5), best first."""
    return difflib.get_close_matches(name, list(names), n=n, cutoff=0.5)


def name_suffixes(module_names: Iterable[str]) -> Set[str]:
    """Every dotted suffix of every module name that does not start at a layer index:
    ``encoder.layer.0.attention.self.query`` gives ``query``, ``self.query``,
    ``attention.self.query`` and the full name (what a ``target_modules`` entry may be)."""
    out: Set[str] = set()
    for name in module_names:
        parts = name.split(".")
        out.update(".".join(parts[i:]) for i in range(len(parts)) if parts[i] and not parts[i].isdigit())
    return out
