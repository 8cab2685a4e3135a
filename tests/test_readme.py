"""The README's Python examples run as written (in a temporary folder)."""

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"

pytestmark = pytest.mark.integration


def python_blocks(section: str) -> list[str]:
    text = README.read_text(encoding="utf-8")
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, flags=re.S)


def test_python_api_examples_run(tmp_path, monkeypatch, capsys):
    blocks = python_blocks("Python API")
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    assert namespace["result"].steps == 50
    assert namespace["result"].val_bpb > 0
    assert (tmp_path / "runs/api/checkpoints/latest").is_file()
    assert namespace["logits"].shape == (1, 16, 50257)
    assert namespace["model"].num_parameters() == 124_439_808
    assert namespace["greedy"].shape == namespace["drawn"].shape == (2,)
    with torch.inference_mode():
        logits = namespace["served"].lm_head(namespace["hidden"])
    assert torch.equal(namespace["greedy"], logits.argmax(-1))


def cli_commands(command: str) -> list[list[str]]:
    """Each `gptforge COMMAND ...` line of the README's bash blocks (and the Makefile's demo), as argv."""
    import shlex

    text = README.read_text(encoding="utf-8")
    lines = [line for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S) for line in block.splitlines()]
    makefile = (README.parent / "Makefile").read_text(encoding="utf-8").replace("\\\n", " ")
    lines += [line.split("/bin/", 1)[1] for line in makefile.splitlines() if f"/bin/gptforge {command} " in line]
    argvs = [shlex.split(line, comments=True) for line in lines if line.startswith(f"gptforge {command} ")]
    return [argv[1:] for argv in argvs]


GENERATE_COMMANDS = cli_commands("generate")
CHAT_COMMANDS = cli_commands("chat")


@pytest.fixture(scope="module")
def demo_sized(tmp_path_factory):
    """A stand-in for runs/demo: a byte-level BPE model with its 128-token context."""
    from tests.cli_utils import save_tiny_bpe_checkpoint

    return save_tiny_bpe_checkpoint(tmp_path_factory.mktemp("readme") / "demo")


def _as_written(argv: list[str], checkpoint, tmp_path) -> list[str]:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("ROMEO:\nJULIET:\n", encoding="utf-8")
    swap = {"runs/demo": str(checkpoint), "runs/chat-sft": str(checkpoint), "prompts.txt": str(prompts)}
    return [swap.get(a, a) for a in argv] + ["--device", "cpu"]


def test_the_readme_has_the_commands_this_file_runs():
    assert len(GENERATE_COMMANDS) == 10 and len(CHAT_COMMANDS) == 1  # 9 in the README, 1 in the Makefile


@pytest.mark.parametrize("argv", [a for a in GENERATE_COMMANDS if "gpt2" not in a],  # the hub id needs the hub
                         ids=lambda argv: " ".join(argv[2:6]))
def test_readme_generate_examples_run_on_a_demo_sized_model(argv, demo_sized, tmp_path, monkeypatch, capsys):
    from gptforge.cli import main

    monkeypatch.chdir(tmp_path)
    code = main(_as_written(argv, demo_sized, tmp_path))
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out and "error:" not in err


@pytest.mark.parametrize("argv", CHAT_COMMANDS)
def test_readme_chat_example_runs_on_a_demo_sized_model(argv, demo_sized, tmp_path, monkeypatch, capsys):
    import io
    import sys

    from gptforge.cli import main

    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\nWho are you?\n"))
    code = main(_as_written(argv, demo_sized, tmp_path))
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.count("\n") >= 2 and "error:" not in err  # two replies


# --------------------------------------------------------------------------------------------------
# Scoring and multiple choice
SCORE_COMMANDS = cli_commands("score")
CHOICE_COMMANDS = [argv for argv in cli_commands("evaluate") if "choice" in argv]


def _section(title: str) -> str:
    return README.read_text(encoding="utf-8").split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_readme_scoring_commands_run_as_written(demo_sized, tmp_path, monkeypatch, capsys):
    import json
    import subprocess

    from gptforge.cli import main

    assert len(SCORE_COMMANDS) == 2 and len(CHOICE_COMMANDS) == 1
    monkeypatch.chdir(tmp_path)
    body = _section("Scoring and multiple choice")
    printf = [line for line in re.findall(r"```bash\n(.*?)```", body, flags=re.S)[0].splitlines()
              if line.startswith("printf ")]
    subprocess.run(["bash", "-c", printf[0]], check=True, timeout=60)  # writes candidates.txt
    (tmp_path / "mc.jsonl").write_text(json.dumps({"context": "JULIET: O Romeo,",
                                                   "choices": [" Romeo!", " What light"], "answer": 0}) + "\n")
    for argv in SCORE_COMMANDS + CHOICE_COMMANDS:
        code = main(_as_written(argv, demo_sized, tmp_path))
        out, err = capsys.readouterr()
        assert code == 0, err
        assert "error:" not in err
        if "--json" in argv:
            assert [c["text"] for c in json.loads(out)["candidates"]] != []
        elif "score" in argv:
            assert len(out.strip().splitlines()) == 4  # the header and three candidates
        else:
            assert out.startswith("acc ")


def test_readme_scoring_python_example_runs(demo_sized, tmp_path, monkeypatch, capsys):
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copytree(demo_sized, tmp_path / "runs/demo")
    blocks = re.findall(r"```python\n(.*?)```", _section("Scoring and multiple choice"), flags=re.S)
    assert len(blocks) == 1
    exec(compile(blocks[0], str(README), "exec"), {})
    lines = capsys.readouterr().out.strip().splitlines()
    assert sorted(line.split()[0] for line in lines) == ["1", "2"]
