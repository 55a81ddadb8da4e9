"""The house by layers: tl_vlm's import graph, read with ``ast`` (function-level imports
included), has no circles, no import from a lower layer to a higher one, no use of
another module's ``_private`` names, and no file over 800 lines.

Layers, lowest first: core < adapters < analyses (and plot) < toy < eval < study < cli.
``tl_vlm/__init__.py`` (the facade) may import anything; the one-line modules that keep
old paths alive (:mod:`tl_vlm.moved`) are not part of the graph.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tl_vlm"
LAYERS = [("tl_vlm.core", 1), ("tl_vlm.adapters", 2), ("tl_vlm.analyses", 3), ("tl_vlm.plot", 3),
          ("tl_vlm.toy", 4), ("tl_vlm.eval", 5), ("tl_vlm.study", 6), ("tl_vlm.cli", 7)]
MAX_LINES = 800


def _layer(module: str) -> int | None:
    for prefix, rank in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return rank
    return None


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()
#: old paths kept for one release: one-line aliases of the new modules
SHIMS = {name for name, path in MODULES.items()
         if "from tl_vlm.moved import become" in path.read_text()
         or name in ("tl_vlm.metrics", "tl_vlm._autoload", "tl_vlm.moved")}


def _resolve(name: str) -> str:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def _imports(name: str) -> list[tuple[str, int, list[str]]]:
    """(imported tl_vlm module, line, names taken from it) for every import in ``name``."""
    out = []
    tree = ast.parse(MODULES[name].read_text(), str(MODULES[name]))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "tl_vlm":
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                target = full if full in MODULES else _resolve(node.module)
                out.append((target, node.lineno, [] if full in MODULES else [alias.name]))
        elif isinstance(node, ast.Import):
            out += [(_resolve(a.name), node.lineno, []) for a in node.names
                    if a.name.split(".")[0] == "tl_vlm"]
    return out


def _graph() -> dict[str, set[str]]:
    return {name: {t for t, _, _ in _imports(name) if t != name and t not in SHIMS}
            for name in MODULES if name not in SHIMS}


def test_every_module_has_a_layer():
    orphans = [m for m in MODULES if m not in SHIMS and m != "tl_vlm" and _layer(m) is None]
    assert orphans == [], f"modules outside every layer: {orphans}"


def test_no_import_reaches_a_higher_layer():
    upward = []
    for name in MODULES:
        if name in SHIMS or name == "tl_vlm":
            continue
        for target, line, _ in _imports(name):
            if target in SHIMS and target != name:
                upward.append(f"{name}:{line} imports the old path {target}")
            elif target != name and (_layer(target) or 99) > _layer(name):
                upward.append(f"{name} (layer {_layer(name)}):{line} -> {target} (layer {_layer(target) or 'top'})")
    assert upward == [], "imports that run up the house:\n" + "\n".join(upward)


def test_no_import_circles():
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles = []

    def visit(v: str) -> None:   # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert circles == [], f"import circles: {circles}"


def test_no_private_names_across_modules():
    """Neither ``from tl_vlm.x import _y`` nor ``x._y`` on an imported tl_vlm module."""
    found = []
    for name in MODULES:
        if name in SHIMS:
            continue
        tree = ast.parse(MODULES[name].read_text())
        module_aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tl_vlm"):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    if full in MODULES:
                        module_aliases[alias.asname or alias.name] = full
                    elif alias.name.startswith("_") and not alias.name.startswith("__") \
                            and _resolve(node.module) != name:
                        found.append(f"{name}:{node.lineno} from {node.module} import {alias.name}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("tl_vlm") and alias.asname:
                        module_aliases[alias.asname] = alias.name
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id in module_aliases and node.attr.startswith("_") \
                    and not node.attr.startswith("__"):
                found.append(f"{name}:{node.lineno} {node.value.id}.{node.attr}")
    assert found == [], "private names used across modules:\n" + "\n".join(found)


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n not in SHIMS))
def test_no_file_over_800_lines(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[name].relative_to(ROOT)}: {lines} lines (> {MAX_LINES})"
