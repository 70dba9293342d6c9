"""The package's import contract: arrows point down the layers only, and no module imports itself back.

    core → (nothing of ours)   formats → core   publish → formats, core   pipeline → publish, formats, core
    mergekit_plugin → pipeline and below   cli, remix, the package's __init__ → anything

Every import counts, also one inside a function (a lazy import still ties the two modules together). Only
``core.method``'s discovery of ``core/methods/`` is dynamic (``importlib``), by design: a registry that finds its
plugins imports them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lowrank_methods"
LAYERS = ["core", "formats", "publish", "pipeline", "mergekit_plugin", "top"]
# third-party packages a layer must not use (core is pure math: no files, no Hub, no mergekit)
FORBIDDEN = {
    "core": {"mergekit", "huggingface_hub", "safetensors", "yaml", "click", "tqdm", "peft", "transformers"},
    "formats": {"mergekit", "huggingface_hub", "click", "yaml"},
    "publish": {"mergekit", "click"},
    "pipeline": {"click"},  # printing is the CLIs' (cli.py; mergekit_plugin inside mergekit-yaml's click command)
}


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "top"


def imports_of(path: Path, root: Path = PACKAGE) -> list[tuple[str, int]]:
    """Every module ``path`` imports (absolute names; ``from x import y`` counts y when it is a module)."""
    tree = ast.parse(path.read_text(), str(path))
    here = module_name(path, root).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            submodules = [f"{base}.{alias.name}" for alias in node.names if _is_module(root, f"{base}.{alias.name}")]
            found += [(m, node.lineno) for m in submodules]  # `from pkg import sub` imports sub (pkg/__init__
            if len(submodules) < len(node.names):            # runs anyway, for any import of a submodule)
                found.append((base, node.lineno))
    return found


def _is_module(root: Path, name: str) -> bool:
    path = root.parent / name.replace(".", "/")
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def graph(root: Path = PACKAGE) -> dict[str, list[tuple[str, int]]]:
    ours = {module_name(p, root): p for p in root.rglob("*.py")}
    return {name: [(m, line) for m, line in imports_of(path, root) if m in ours and m != name]
            for name, path in ours.items()}


def upward_imports(root: Path = PACKAGE) -> list[str]:
    bad = []
    for name, path in {module_name(p, root): p for p in root.rglob("*.py")}.items():
        layer = layer_of(name)
        for target, line in imports_of(path, root):
            top = target.split(".")[0]
            if top == "lowrank_methods" and target != "lowrank_methods" and \
                    LAYERS.index(layer_of(target)) > LAYERS.index(layer):
                bad.append(f"{path.relative_to(root.parent)}:{line}: {layer} imports {target} ({layer_of(target)})")
            elif top == "lowrank_methods" and target == "lowrank_methods" and layer != "top":
                bad.append(f"{path.relative_to(root.parent)}:{line}: {layer} imports the package's __init__")
            elif top in FORBIDDEN.get(layer, ()):
                bad.append(f"{path.relative_to(root.parent)}:{line}: {layer} imports {top}")
    return bad


def cycles(root: Path = PACKAGE) -> list[list[str]]:
    """Strongly connected components of the module graph with more than one module (Tarjan)."""
    edges = {k: sorted({m for m, _ in v}) for k, v in graph(root).items()}
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_arrows_point_down_the_layers_only():
    assert upward_imports() == []


def test_there_is_no_import_cycle():
    assert cycles() == []


def test_every_module_is_in_a_layer():
    tops = {p.name for p in PACKAGE.glob("*.py")}
    assert tops == {"__init__.py", "cli.py", "remix.py"}, "a new top-level module: put it in a layer"
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"} == set(LAYERS) - {"top"}


@pytest.mark.parametrize("bad_import, complaint", [
    ("from lowrank_methods.pipeline.engine import run_merge", "core imports lowrank_methods.pipeline.engine"),
    ("import huggingface_hub", "core imports huggingface_hub"),
])
def test_the_contract_catches_a_bad_import(tmp_path, bad_import, complaint):
    """The checks themselves, on a copy of the package with one deliberately bad import added to core."""
    import shutil

    copy = tmp_path / "lowrank_methods"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    types = copy / "core" / "types.py"
    types.write_text(types.read_text() + f"\n\ndef _bad():\n    {bad_import}\n")
    assert any(complaint in line for line in upward_imports(copy))


def test_the_contract_catches_a_cycle(tmp_path):
    import shutil

    copy = tmp_path / "lowrank_methods"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    linalg = copy / "core" / "linalg.py"
    linalg.write_text(linalg.read_text() + "\n\ndef _bad():\n    from lowrank_methods.core import rules\n")
    assert ["lowrank_methods.core.linalg", "lowrank_methods.core.rules"] in cycles(copy)


def test_the_docs_name_every_registered_method():
    """The README's method table and docs/methods/ are prose, kept by hand: forgetting a method there is loud."""
    import re

    from lowrank_methods.core.method import list_methods

    readme = (PACKAGE.parent / "README.md").read_text()
    table = {name for row in readme.splitlines() if row.startswith("| `") for name in re.findall(r"`(\w+)`", row.split("|")[1])}
    aliases = {"task_arithmetic", "linear", "ties"}  # mergekit's own names, documented with mtc
    for method in list_methods():
        assert method.name in table, f"README.md's method table lacks {method.name}"
        assert method.name in aliases or (PACKAGE.parent / "docs" / "methods" / f"{method.name}.md").is_file(), \
            f"docs/methods/{method.name}.md is missing"
