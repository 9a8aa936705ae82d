"""Real English text for CPU benchmarks without a dataset hub: docstrings of the Python
standard library, in a fixed order, cut into passages of roughly ``chars`` characters."""
from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
import sys
import warnings
from typing import List

_SKIP = ("test", "idlelib", "tkinter", "turtle", "lib2to3", "ensurepip", "venv", "__main__", "antigravity", "this")


def stdlib_passages(chars: int = 700, limit: int = 4000) -> List[str]:
    """Up to ``limit`` passages (str) of about ``chars`` characters of stdlib documentation."""
    names = sorted(m.name for m in pkgutil.iter_modules() if m.name in sys.stdlib_module_names
                   and not m.name.startswith(_SKIP) and not m.name.startswith("_"))
    text_parts: List[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in names:
            try:
                mod = importlib.import_module(name)
            except Exception:  # noqa: BLE001 - optional platform modules
                continue
            docs = [inspect.getdoc(mod) or ""]
            for _, obj in sorted(vars(mod).items()):
                if (inspect.isfunction(obj) or inspect.isclass(obj)) and getattr(obj, "__module__", "") == name:
                    docs.append(inspect.getdoc(obj) or "")
            for doc in docs:
                doc = re.sub(r"\s+", " ", doc).strip()
                if len(doc) > 80:
                    text_parts.append(doc)
    passages, cur = [], ""
    for part in text_parts:
        cur = f"{cur} {part}".strip()
        while len(cur) >= chars:
            cut = cur.rfind(". ", 0, chars)
            cut = cut + 1 if cut > chars // 2 else chars
            passages.append(cur[:cut].strip())
            cur = cur[cut:].strip()
            if len(passages) >= limit:
                return passages
    return passages


if __name__ == "__main__":
    ps = stdlib_passages()
    print(len(ps), "passages;", sum(len(p) for p in ps), "chars; first:", ps[0][:200])
