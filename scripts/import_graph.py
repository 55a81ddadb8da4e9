"""Draw tl_vlm's module import graph (Graphviz), one box per layer.

    python scripts/import_graph.py [ROOT] OUT.svg     (ROOT: a checkout, default .)

Every import counts, function-level ones too. Red edges run up the house (from a lower
layer to a higher one) or close a circle. The layers are tests/test_layers.py's; modules of
an older layout that fit no layer are drawn in a grey box. Needs ``dot`` (Debian: graphviz).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

LAYERS = [("tl_vlm.core", "core", 1), ("tl_vlm.adapters", "adapters", 2),
          ("tl_vlm.analyses", "analyses", 3), ("tl_vlm.plot", "analyses", 3),
          ("tl_vlm.toy", "toy", 4), ("tl_vlm.eval", "eval", 5), ("tl_vlm.study", "study", 6),
          ("tl_vlm.cli", "cli", 7)]


def layer(module: str) -> tuple[str, int]:
    for prefix, name, rank in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return name, rank
    return "(no layer)", 0


def graph(root: Path) -> tuple[dict[str, Path], dict[str, set[str]]]:
    modules = {}
    for path in sorted((root / "tl_vlm").rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def resolve(name: str) -> str:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    shims = {n for n, p in modules.items() if "tl_vlm.moved import become" in p.read_text()
             or n in ("tl_vlm.moved", "tl_vlm._autoload", "tl_vlm.metrics")}
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        if name in shims or name == "tl_vlm":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tl_vlm"):
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules
                           else resolve(node.module) for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [resolve(a.name) for a in node.names if a.name.startswith("tl_vlm")]
            edges.setdefault(name, set()).update(t for t in targets if t and t != name and t not in shims)
    return {n: p for n, p in modules.items() if n not in shims}, edges


def cycle_edges(edges: dict[str, set[str]]) -> set[tuple[str, str]]:
    """Edges inside a strongly connected component (Tarjan)."""
    index, low, stack, on, comp_of = {}, {}, [], set(), {}

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            while True:
                w = stack.pop()
                on.discard(w)
                comp_of[w] = v
                if w == v:
                    break

    sys.setrecursionlimit(10000)
    for v in list(edges):
        if v not in index:
            visit(v)
    return {(a, b) for a, bs in edges.items() for b in bs if comp_of.get(a) == comp_of.get(b)}


def dot_source(modules: dict[str, Path], edges: dict[str, set[str]], title: str) -> str:
    circular = cycle_edges(edges)
    lines = ["digraph G {", "  rankdir=BT; splines=true; nodesep=0.15; ranksep=0.5;",
             f'  labelloc=t; label="{title}"; fontsize=20;',
             '  node [shape=box, fontsize=10, style=rounded, height=0.25];']
    groups: dict[str, list[str]] = {}
    for name in modules:
        if name != "tl_vlm":
            groups.setdefault(layer(name)[0], []).append(name)
    for group, names in groups.items():
        colour = "grey85" if group == "(no layer)" else "aliceblue"
        lines.append(f'  subgraph "cluster_{group}" {{ label="{group}"; style=filled; color="{colour}";')
        for n in names:
            lines.append(f'    "{n}" [label="{n.replace("tl_vlm.", "")}\\n{len(modules[n].read_text().splitlines())}"];')
        lines.append("  }")
    n_bad = 0
    for a, bs in sorted(edges.items()):
        for b in sorted(bs):
            if b == "tl_vlm":
                continue
            up = layer(a)[1] and layer(b)[1] and layer(b)[1] > layer(a)[1]
            bad = up or (a, b) in circular
            n_bad += bool(bad)
            lines.append(f'  "{a}" -> "{b}" [color="{"red" if bad else "grey50"}", '
                         f'penwidth={"1.6" if bad else "0.6"}, arrowsize=0.5];')
    lines.append("}")
    return "\n".join(lines), n_bad


def main(argv: list[str]) -> int:
    if len(argv) == 1:
        root, out = Path("."), Path(argv[0])
    elif len(argv) == 2:
        root, out = Path(argv[0]), Path(argv[1])
    else:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    modules, edges = graph(root)
    n_edges = sum(len(v) for v in edges.values())
    source, n_bad = dot_source(modules, edges, f"{root.resolve().name}: {len(modules)} modules, "
                                               f"{n_edges} imports")
    subprocess.run(["dot", f"-T{out.suffix.lstrip('.')}", "-o", str(out)], input=source,
                   text=True, check=True)
    print(f"{out}: {len(modules)} modules, {n_edges} imports, {n_bad} red "
          f"(circular or upward)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
