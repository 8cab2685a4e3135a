"""Every `gptforge ...` command in the README, docs/ and the examples' READMEs parses as written: its
subcommand and flags exist, and fine-tuning's flat overrides name real config keys. (The README's generate,
chat and score lines also run, in test_readme.py; this check covers the rest without running them.)"""

from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path

import pytest

from gptforge.cli import _split_overrides, build_parser
from gptforge.config import FinetuneConfig

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "examples").glob("*/README.md")),
        ROOT / "benchmarks/README.md"]
SHELL_BLOCK = re.compile(r"```(?:bash|sh|shell|console)\n(.*?)```", re.S)
SEPARATORS = {"|", "||", "&&", ";", ">", ">>", "2>", "<", "&"}


def commands(path: Path) -> list[tuple[str, list[str]]]:
    """(where, argv after `gptforge`) of each gptforge command in ``path``'s code blocks."""
    found = []
    for block in SHELL_BLOCK.findall(path.read_text(encoding="utf-8")):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip().removeprefix("$ ")
            line = re.sub(r"^(\S*/)?(\.venv/bin/)?(?=gptforge )", "", line)
            if not line.startswith("gptforge "):
                continue
            try:
                words = shlex.split(line, comments=True)
            except ValueError:  # an unclosed quote: not a command a shell would take either
                found.append((f"{path.relative_to(ROOT)}: {line}", ["<unparsable>"]))
                continue
            argv = []
            for word in words[1:]:
                if word in SEPARATORS or word.startswith((">", "2>")):
                    break
                argv.append(word)
            if argv and argv[-1] == "...":  # "and the other options": an elision, not an argument
                argv.pop()
            found.append((f"{path.relative_to(ROOT)}: {line}", argv))
    return found


ALL = [c for path in DOCS if path.is_file() for c in commands(path)]
FINETUNE_KEYS = {f.name for f in dataclasses.fields(FinetuneConfig)}


def test_the_docs_have_commands_to_check():
    assert len(ALL) > 50
    assert {argv[0] for _, argv in ALL} >= {"train", "generate", "chat", "serve", "finetune", "evaluate", "index",
                                            "score", "monitor", "explain"}


@pytest.fixture(scope="module")
def parser():
    return build_parser()


@pytest.mark.parametrize("where,argv", ALL, ids=[w[:90] for w, _ in ALL])
def test_documented_command_parses(where, argv, parser, capsys):
    if "--help" in argv or "-h" in argv:
        return
    try:
        args, rest = parser.parse_known_args(argv)
    except SystemExit:
        pytest.fail(f"{where}\n{capsys.readouterr().err.strip()}")
    overrides = _split_overrides(args.command, rest)
    if args.command in ("finetune", "tune"):
        for item in overrides:
            key = item[2:].split("=", 1)[0].removeprefix("finetune.").replace("-", "_")
            assert key in FINETUNE_KEYS, f"{where}: --{key} is not a fine-tuning option"
