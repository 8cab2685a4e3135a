"""The monitor commands of the README and the Python example of docs/monitor.md run as written (on a tiny
classifier standing in for runs/sentiment, in a temporary folder)."""

import re
import shlex
from pathlib import Path

import pytest

from gptforge.cli import main

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration


def readme_monitor_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    lines = [line for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S) for line in block.splitlines()]
    return [shlex.split(line, comments=True)[1:] for line in lines if line.startswith("gptforge monitor ")]


def test_the_readme_monitor_example_runs(classifier, tmp_path, monkeypatch, capsys):
    commands = readme_monitor_commands()
    assert len(commands) == 2
    once = [argv for argv in commands if "--follow" not in argv]  # the --follow one runs until stopped
    monkeypatch.chdir(tmp_path)
    swap = {"runs/sentiment": str(classifier), "examples/monitor/news.jsonl": str(ROOT / "examples/monitor/news.jsonl")}
    for argv in once:
        code = main([swap.get(a, a) for a in argv] + ["--device", "cpu"])
        out, err = capsys.readouterr()
        assert code == 0, err
        assert out.startswith("monitored 240 items")
    assert (tmp_path / "runs/news-monitor/trend.png").stat().st_size > 0


def test_the_python_example_of_the_docs_runs(classifier, tmp_path, monkeypatch, capsys):
    text = (ROOT / "docs/monitor.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 1
    code = blocks[0].replace('"runs/sentiment"', repr(str(classifier))).replace(
        '"examples/monitor/news.jsonl"', repr(str(ROOT / "examples/monitor/news.jsonl")))
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/monitor.md", "exec"), {})
    out = capsys.readouterr().out
    assert "monitored 240 items" in out and (tmp_path / "runs/news-monitor/results.jsonl").exists()
