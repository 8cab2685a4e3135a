"""Imports go only leftwards: config → model → tokenizer, data → checkpoint, convert → train, generate,
evaluate → serve → cli (see shared/DESIGN.md). Walks every module's imports."""

import ast
from pathlib import Path

import gptforge

PKG = Path(gptforge.__file__).parent

# Rank of each top-level module; a module may import only modules of a lower or equal rank,
# except where FORBIDDEN says otherwise.
RANK = {
    "errors": 0, "config": 1, "model": 2, "tokenizer": 3, "data": 3,
    "runtime": 2, "fsutil": 0, "checkpoint": 4, "convert": 4, "peft": 4, "heads": 4, "quant": 4, "inference": 4,
    "native": 1,
    "train": 5, "generate": 5, "evaluate": 5, "finetune": 6, "serve": 7, "chat": 7, "cli": 8, "__init__": 0,
}
FORBIDDEN = {("train", "generate"), ("train", "serve"), ("generate", "train"), ("model", "tokenizer"),
             ("model", "peft"), ("model", "train"), ("config", "model")}


def _top(module_path: Path) -> str:
    rel = module_path.relative_to(PKG)
    return rel.parts[0].removesuffix(".py")


def _imported_tops(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    rel_parts = path.relative_to(PKG).parts
    tops = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if node.module and node.module.startswith("gptforge."):
                    tops.add(node.module.split(".")[1])
                continue
            # relative import: resolve against the package the file lives in
            base = list(rel_parts[:-1])
            up = node.level - 1
            base = base[: len(base) - up] if up else base
            target = base + (node.module.split(".") if node.module else [])
            if target:
                tops.add(target[0])
            else:  # `from . import x` at the package root
                tops.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("gptforge."):
                    tops.add(alias.name.split(".")[1])
    return tops


def test_imports_only_go_leftwards():
    problems = []
    for path in PKG.rglob("*.py"):
        me = _top(path)
        for other in _imported_tops(path):
            if other == me or other not in RANK:
                continue
            if RANK.get(me, 0) < RANK[other] or (me, other) in FORBIDDEN:
                problems.append(f"{path.relative_to(PKG)} imports {other}")
    assert not problems, "layering violations:\n" + "\n".join(sorted(problems))


def test_config_and_cli_import_no_torch_at_module_level():
    for name in ("config.py", "cli.py", "errors.py"):
        tree = ast.parse((PKG / name).read_text())
        top_level = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = {a.name for n in top_level for a in n.names} | {getattr(n, "module", None) for n in top_level}
        assert "torch" not in names, f"{name} imports torch at module level"
