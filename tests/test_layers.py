"""The package reads bottom-up: each module imports only its own layer or lower ones, and no two modules
import each other, directly or around a circle. Imports inside functions count too."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "prospect"
# Lowest first. A module's layer is the first entry its dotted name starts with.
LAYERS = [
    (
        "base",
        (
            "prospect.errors",
            "prospect.options",
            "prospect.io",
            "prospect.assets",
            "prospect.progress",
            "prospect.config",
            "prospect.recipe",
        ),
    ),
    ("data", ("prospect.data",)),
    ("models", ("prospect.models",)),
    ("rewards", ("prospect.rewards",)),
    ("losses", ("prospect.losses",)),
    ("evaluation", ("prospect.evaluation",)),
    ("report", ("prospect.report",)),
    ("engine", ("prospect.engine",)),
    ("online", ("prospect.online",)),
    ("cli", ("prospect.cli", "prospect.cli_help")),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer(name: str) -> int:
    if name == "prospect":  # the package root holds only its version
        return 0
    for rank, (_, prefixes) in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return rank
    raise AssertionError(f"{name}: in no layer; add it to LAYERS")


def imports(name: str) -> set[str]:
    """The prospect modules `name` imports anywhere in its file (`from prospect.x import y` counts y when
    y is itself a module)."""
    tree = ast.parse(MODULES[name].read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("prospect")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("prospect"):
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in MODULES else node.module)
    return found - {name}


GRAPH = {name: imports(name) for name in MODULES}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_import_climbs_a_layer(name):
    upward = sorted(i for i in GRAPH[name] if layer(i) > layer(name))
    assert not upward, f"{name} ({LAYERS[layer(name)][0]}) imports from above: {upward}"


def test_no_import_cycles():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(GRAPH.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path[path.index(nxt) :], nxt]))
            if nxt in GRAPH and not state.get(nxt):
                visit(nxt)
        path.pop()
        state[node] = 2

    for name in sorted(GRAPH):
        if not state.get(name):
            visit(name)


def test_every_layer_imports_alone_in_a_fresh_interpreter():
    """Layer by layer from the bottom, each module imports in a new process with nothing above it loaded."""
    order = sorted(MODULES, key=layer)
    code = (
        "import importlib, sys\n"
        f"layers = {[layer(m) for m in order]!r}\n"
        f"order = {order!r}\n"
        "for name, rank in zip(order, layers):\n"
        "    importlib.import_module(name)\n"
        "    loaded = [m for m in sys.modules if m in set(order)]\n"
        "    higher = [m for m in loaded if layers[order.index(m)] > rank]\n"
        "    assert not higher, (name, higher)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
