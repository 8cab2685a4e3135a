"""A resumed training run verifies its checkpoint before anything is written: a damaged file stops it with one
line naming the file, and leaves the run folder byte-identical (find_resume_checkpoint does the check)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gptforge.config import build_run_config
from gptforge.data.prepare import prepare_corpus
from gptforge.errors import CheckpointError
from gptforge.train import pretrain
from tests.cli_utils import assert_one_line_error, run

pytestmark = pytest.mark.integration


def snapshot(root: Path) -> dict[str, bytes | None]:
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None) for p in root.rglob("*")}


@pytest.fixture
def trained(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 300, encoding="utf-8")
    prepare_corpus(corpus, tmp_path / "data", tokenizer="char")
    config = build_run_config({
        "model": {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 16, "dropout": 0.0},
        "data": {"dir": str(tmp_path / "data")},
        "train": {"out_dir": str(tmp_path / "run"), "max_steps": 2, "batch_size": 2, "warmup_steps": 1,
                  "eval_interval": 2, "eval_batches": 1, "log_interval": 1, "checkpoint_interval": 2,
                  "tensorboard": False},
    })
    pretrain(config, progress=False)
    return config, tmp_path / "run" / "checkpoints" / "step-0000002"


@pytest.mark.parametrize("damage", ["truncate optimizer.pt", "flip model.safetensors"])
def test_resume_refuses_a_damaged_checkpoint_naming_the_file(trained, damage, capsys):
    config, step = trained
    action, name = damage.split()
    data = bytearray((step / name).read_bytes())
    if action == "truncate":
        data = data[: len(data) // 2]
    else:
        for i in range(len(data) - 200, len(data) - 136):  # 64 bytes inside the tensor data
            data[i] ^= 0xFF
    (step / name).write_bytes(bytes(data))
    run_dir = step.parent.parent
    before = snapshot(run_dir)
    config.train.max_steps = 4
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint {step} is damaged: {name} does not match")):
        pretrain(config, resume=True, progress=False)
    assert snapshot(run_dir) == before
    code, _, err = run(capsys, "train", "--resume", f"--train.out_dir={run_dir}", f"--data.dir={config.data.dir}",
                       "--model.n_layer=1", "--model.n_head=2", "--model.n_embd=16", "--model.block_size=16",
                       "--train.max_steps=4", "--train.tensorboard=false")
    assert_one_line_error(code, err, f"{name} does not match the checksum recorded when it was saved")
    assert snapshot(run_dir) == before
