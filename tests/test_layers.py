"""Imports go only leftwards and never in a circle (see shared/DESIGN.md):

    errors → config, fsutil, runtime → model → tokenizer, data → weights
           → peft, heads, convert, backends → checkpoint → generate, train, evaluate → finetune
           → chat, serve → cli

Every module's imports are walked, those inside functions included (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

import gptforge

PKG = Path(gptforge.__file__).parent

# Rank of each top-level module or package; a module may import only modules of a lower or equal rank,
# except where FORBIDDEN says otherwise. Every module that exists must be listed.
RANK = {
    "__init__": 0, "errors": 0,
    "config": 1, "fsutil": 1, "runtime": 1,
    "model": 2,
    "tokenizer": 3, "data": 3,
    "weights": 4,  # what loaders share: below convert, peft and checkpoint so none needs another for it
    "peft": 5, "heads": 5, "convert": 5, "backends": 5,
    "checkpoint": 6,  # composes model + peft + heads (+ convert for Hugging Face sources) on load
    "generate": 7, "train": 7, "evaluate": 7,
    "finetune": 8, "knowledge": 8, "monitor": 8, "explain": 8, "moderation": 8,  # apps: over generate, evaluate
    "chat": 9, "serve": 9,
    "cli": 10,
}
# (importer, imported) pairs ruled out even where the ranks would allow them, or worth naming on their own.
FORBIDDEN = {
    ("config", "model"), ("model", "tokenizer"), ("model", "peft"), ("model", "heads"), ("model", "train"),
    ("model", "backends"),
    ("peft", "checkpoint"), ("peft", "convert"), ("convert", "checkpoint"),
    ("backends", "generate"), ("backends", "train"), ("backends", "serve"),
    ("train", "generate"), ("train", "serve"), ("generate", "train"),
}


def _modules() -> dict[str, Path]:
    """Dotted name → file of every module in the package (a package is its ``__init__``)."""
    return {".".join(f.relative_to(PKG.parent).with_suffix("").parts).removesuffix(".__init__"): f
            for f in PKG.rglob("*.py")}


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The package's modules that ``name`` imports, resolved to modules (``from .x import y`` gives ``x.y``
    when y is a module, else ``x``), plus the packages whose ``__init__`` such an import runs first."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            for alias in node.names:
                found.add(f"{module}.{alias.name}" if f"{module}.{alias.name}" in MODULES else module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    resolved = set()
    for target in found:
        if target not in MODULES:
            continue
        resolved.add(target)
        # Importing a.b.c runs a/__init__ and a/b/__init__ first, unless the importer lives inside them.
        parts = target.split(".")
        for i in range(2, len(parts)):
            parent = ".".join(parts[:i])
            if not (name == parent or name.startswith(parent + ".")):
                resolved.add(parent)
    resolved.discard(name)
    return resolved


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_top_level_module_has_a_rank():
    unranked = sorted({_top(m) for m in MODULES} - RANK.keys())
    assert not unranked, f"give these modules a place in RANK (and in DESIGN.md's layers): {unranked}"


def test_imports_only_go_leftwards():
    problems = []
    for module, imported in GRAPH.items():
        me = _top(module)
        for other in {_top(m) for m in imported} - {me}:
            if RANK[me] < RANK[other] or (me, other) in FORBIDDEN:
                problems.append(f"{module} imports {other}")
    assert not problems, "layering violations:\n" + "\n".join(sorted(problems))


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle (a path that comes back to its start) per strongly connected group of modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    circles = []
    for group in groups:
        start = min(group)
        path, seen = [start], {start}
        while True:  # walk inside the group until the path closes
            nxt = sorted(w for w in graph[path[-1]] if w in group)
            back = [w for w in nxt if w in seen]
            if back:
                circles.append(path[path.index(back[0]):] + [back[0]])
                break
            path.append(nxt[0])
            seen.add(nxt[0])
    return circles


def test_no_import_circles():
    circles = _circles(GRAPH)
    assert not circles, "import circles:\n" + "\n".join(" → ".join(c) for c in circles)


def test_the_circle_check_sees_circles_of_every_kind():
    assert _circles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b", "a"]]
    assert _circles({"p.x": {"p.y"}, "p.y": {"p.z"}, "p.z": {"p.x"}}) == [["p.x", "p.y", "p.z", "p.x"]]
    assert _circles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_config_and_cli_import_no_torch_at_module_level():
    for name in ("config.py", "cli.py", "errors.py"):
        tree = ast.parse((PKG / name).read_text())
        top_level = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = {a.name for n in top_level for a in n.names} | {getattr(n, "module", None) for n in top_level}
        assert "torch" not in names, f"{name} imports torch at module level"
