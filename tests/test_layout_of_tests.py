"""The layout of the test suite: shared helpers live in helpers.py, fixtures in conftest.py, and no test module
imports another test module, conftest or the fake Hub's module (tests get ``fake_hub`` as a fixture)."""

from __future__ import annotations

import ast
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEST_MODULES = sorted(HERE.glob("test_*.py"))
FORBIDDEN = "a test module (test_*), conftest or hub_server"


def forbidden(name: str | None) -> bool:
    top = (name or "").split(".")[0]
    return top.startswith("test_") or top in ("conftest", "hub_server")


def imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every import anywhere in the module (top level, in functions, in ``if`` blocks); a
    relative import counts as its module name (``from . import test_x`` as ``test_x``)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.module:
                found.append((node.lineno, node.module))
            if node.level or not node.module:
                found += [(node.lineno, alias.name) for alias in node.names]
        elif (isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name))
              and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id)
              in ("import_module", "__import__", "importorskip")
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.append((node.lineno, node.args[0].value))  # importlib.import_module("test_x") and the like
    return found


def test_no_test_module_imports_another_test_module_or_conftest():
    assert len(TEST_MODULES) > 20 and Path(__file__).resolve() in TEST_MODULES  # the glob found the suite
    bad = []
    for path in TEST_MODULES:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        bad += [f"{path.name}:{line}: imports {name}" for line, name in imported_modules(tree) if forbidden(name)]
    assert not bad, (f"imports from {FORBIDDEN}; shared helpers belong in tests/helpers.py, fixtures in "
                     "conftest.py:\n" + "\n".join(bad))


def test_the_check_sees_every_kind_of_import():
    source = ("import test_a\nfrom test_b import x\nimport conftest as c\nfrom hub_server import TOKEN\n"
              "from . import test_c\ndef f():\n    from conftest import y\n"
              "import importlib\nimportlib.import_module('test_d')\n"
              "from helpers import write_adapter\nimport lowrank_methods.test_utils\nfrom testing import z\n")
    names = sorted(name for _, name in imported_modules(ast.parse(source)) if forbidden(name))
    assert names == ["conftest", "conftest", "hub_server", "test_a", "test_b", "test_c", "test_d"]
