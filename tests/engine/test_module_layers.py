"""The engine's imports run one way: ``eva.engine`` imports nothing from ``eva.peft`` or
``eva.cli`` (they build on it), and inside it ``run -> sequential -> loop`` (no module imports one
above it). Read from the source with ``ast``, every import, top level or inside a function."""
from __future__ import annotations

import ast
import os

import pytest

ENGINE = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "eva", "engine")
#: a module may not import any module listed after it
ORDER = ["loop", "sequential", "run"]


def _imports(path: str):
    """(level, module) of every ``from ... import`` / ``import`` in a file."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            yield node.level, node.module or ""
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield 0, alias.name


@pytest.mark.parametrize("name", sorted(f[:-3] for f in os.listdir(ENGINE) if f.endswith(".py")))
def test_engine_module_imports_run_one_way(name):
    for level, module in _imports(os.path.join(ENGINE, f"{name}.py")):
        absolute = module if level == 0 else ("eva." + module if level == 2 else f"eva.engine.{module}")
        assert not absolute.startswith(("eva.peft", "eva.cli")), f"eva.engine.{name} imports {absolute}"
        if name in ORDER and level == 1 and module in ORDER:
            assert ORDER.index(module) < ORDER.index(name), f"eva.engine.{name} imports the higher {module}"
