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
