"""The daemon's modules import each other without cycles (module-level or inside functions):
``reference`` <- ``stats`` <- ``calibrate`` <- ``baseline``, and so on up to ``core``."""

from __future__ import annotations

import ast
import os

import lrwatch.daemon

PKG = os.path.dirname(lrwatch.daemon.__file__)
# reference.py's module __getattr__ keeps the old ``reference.build_reference`` import
# working (deprecated, it warns); it is the only edge allowed to point upward
ALLOWED = {("reference", "baseline")}


def _edges() -> dict[str, set[str]]:
    mods = {f[:-3] for f in os.listdir(PKG) if f.endswith(".py") and f != "__init__.py"}
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m in mods:
        with open(os.path.join(PKG, m + ".py"), encoding="utf-8") as fh:
            tree = ast.parse(fh.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                targets = [node.module] if node.module else [a.name for a in node.names]
                for t in targets:
                    t = t.split(".")[0]
                    if t in mods and (m, t) not in ALLOWED:
                        graph[m].add(t)
    return graph


def test_no_import_cycles_among_the_daemon_modules() -> None:
    graph = _edges()
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for t in sorted(graph[m]):
            assert state.get(t) != 1, "import cycle: " + " -> ".join(path[path.index(t):] + [t])
            if t not in state:
                visit(t)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert "calibrate" in graph["baseline"] and "reference" in graph["stats"]
    assert not graph["reference"] & {"calibrate", "stats", "baseline"}
