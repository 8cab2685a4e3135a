"""Checkpoints that cannot poison a run: non-finite weights are never saved, pointed at, pruned last or loaded;
every file's checksum is recorded in the COMPLETE marker and verified on load and on resume."""

from __future__ import annotations

import hashlib
import json
import re
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gptforge import checkpoint as ckpt
from gptforge.config import InferenceConfig
from gptforge.errors import CheckpointError
from gptforge.model import GPT
from gptforge.weights import first_nonfinite
from tests.cli_utils import assert_one_line_error, run
from tests.model_utils import save_tiny_checkpoint

CHARS = "abcdefgh \n"
BAD_TENSOR = "blocks.1.mlp.fc.weight"


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) under ``root``: equal snapshots mean nothing changed on disk."""
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None) for p in root.rglob("*")}


def tiny(path: Path, seed: int = 0) -> Path:
    return save_tiny_checkpoint(path, CHARS, block_size=16, n_layer=2, n_embd=16, seed=seed)


def poison(folder: Path, tensor: str = BAD_TENSOR, value: float = float("nan")) -> Path:
    """Put ``value`` into one tensor of a checkpoint, as an older gptforge (no checksums, no finite check)
    wrote the checkpoints of a diverged run."""
    state = load_file(str(folder / ckpt.MODEL_FILE))
    state[tensor][0, 0] = value
    save_file(state, str(folder / ckpt.MODEL_FILE), metadata={"format": "pt"})
    (folder / ckpt.COMPLETE_MARKER).write_text("ok\n")
    return folder


def run_with(tmp_path: Path, *steps: tuple[int, bool]) -> Path:
    """A run folder with checkpoints ``step-N`` (finite or NaN)."""
    run_dir = tmp_path / "run"
    for step, finite in steps:
        folder = tiny(run_dir / ckpt.CHECKPOINTS_DIR / f"step-{step:07d}", seed=step)
        if not finite:
            poison(folder)
    return run_dir


# --------------------------------------------------------------------------------------------------
# Non-finite weights
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_save_refuses_non_finite_weights_naming_the_tensor_and_writes_nothing(tmp_path, value):
    good = tiny(tmp_path / "run" / "checkpoints" / "step-0000001")
    model = ckpt.load_checkpoint(good).model
    with torch.no_grad():
        dict(model.named_parameters())[BAD_TENSOR][1, 2] = value
    before = snapshot(tmp_path)
    tok = ckpt.load_checkpoint(good).tokenizer
    for target in (good, tmp_path / "run" / "checkpoints" / "step-0000002", tmp_path / "new" / "deep" / "ckpt"):
        with pytest.raises(CheckpointError, match=re.escape(f"refusing to save checkpoint {target}: tensor "
                                                            f"{BAD_TENSOR} holds NaN or infinite values")):
            ckpt.save_checkpoint(target, model, tok, {"model": vars(model.config)})
        assert snapshot(tmp_path) == before  # the good one untouched, no new folder, no temp folder


def test_latest_never_points_at_a_non_finite_checkpoint(tmp_path):
    run_dir = run_with(tmp_path, (1, True), (2, False))
    ckpt.update_latest(run_dir, "step-0000001")
    before = snapshot(tmp_path)
    with pytest.raises(CheckpointError, match=re.escape(
            f"refusing to point 'latest' at checkpoint {run_dir / 'checkpoints' / 'step-0000002'}: its weights "
            f"hold NaN or infinite values")):
        ckpt.update_latest(run_dir, "step-0000002")
    assert snapshot(tmp_path) == before
    assert ckpt.latest_checkpoint(run_dir).name == "step-0000001"


def test_rotation_keeps_the_newest_finite_checkpoint_and_the_one_latest_names(tmp_path):
    run_dir = run_with(tmp_path, (1, True), (2, True), (3, False), (4, False), (5, False))
    (run_dir / "checkpoints" / "latest").write_text("step-0000001\n")
    ckpt.prune_checkpoints(run_dir, keep=1)
    left = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))
    assert left == ["step-0000001", "step-0000002", "step-0000005"]  # latest, newest finite, newest


def test_rotation_of_a_healthy_run_is_unchanged(tmp_path):
    run_dir = run_with(tmp_path, (1, True), (2, True), (3, True))
    ckpt.update_latest(run_dir, "step-0000003")
    ckpt.prune_checkpoints(run_dir, keep=2)
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) == ["step-0000002", "step-0000003"]


def nan_message(folder: Path) -> str:
    return (f"weights {folder / ckpt.MODEL_FILE} hold NaN or infinite values (tensor {BAD_TENSOR}): they come from "
            f"a diverged run and cannot be used; load an earlier checkpoint")


def test_every_loader_refuses_non_finite_weights_naming_file_and_tensor(tmp_path):
    bad = poison(tiny(tmp_path / "bad"))
    before = snapshot(tmp_path)
    loaders = [ckpt.load_checkpoint, ckpt.load_task_checkpoint, ckpt.load_pretrained,
               lambda p: ckpt.load_for_inference(InferenceConfig(checkpoint=str(p), device="cpu")),
               lambda p: ckpt.load_for_inference(InferenceConfig(checkpoint=str(p), device="cpu"), task=True),
               lambda p: ckpt.convert_to_hf(p, tmp_path / "hf")]
    for load in loaders:
        with pytest.raises(CheckpointError, match=re.escape(nan_message(bad))):
            load(bad)
    assert snapshot(tmp_path) == before  # no export folder either


def test_a_run_folder_whose_latest_is_non_finite_is_refused_not_loaded(tmp_path):
    run_dir = run_with(tmp_path, (1, True), (2, False))
    (run_dir / "checkpoints" / "latest").write_text("step-0000002\n")
    with pytest.raises(CheckpointError, match=re.escape(nan_message(run_dir / "checkpoints" / "step-0000002"))):
        ckpt.load_checkpoint(run_dir)


def test_a_hugging_face_folder_with_non_finite_weights_is_refused(tmp_path):
    good = tiny(tmp_path / "good")
    hf = ckpt.convert_to_hf(good, tmp_path / "hf")
    state = load_file(str(hf / "model.safetensors"))
    state["transformer.h.0.mlp.c_fc.weight"][3, 1] = float("inf")
    save_file(state, str(hf / "model.safetensors"), metadata={"format": "pt"})
    before = snapshot(tmp_path)
    with pytest.raises(CheckpointError, match=re.escape(f"weights {hf / 'model.safetensors'} hold NaN or infinite "
                                                        f"values (tensor transformer.h.0.mlp.c_fc.weight)")):
        ckpt.convert_from_hf(hf, tmp_path / "back")
    assert snapshot(tmp_path) == before


def test_generate_and_convert_refuse_in_one_line(tmp_path, capsys):
    bad = poison(tiny(tmp_path / "bad"))
    before = snapshot(tmp_path)
    code, out, err = run(capsys, "generate", "--checkpoint", str(bad), "--device", "cpu", "--prompt", "ab",
                         "--max-new-tokens", "3")
    assert_one_line_error(code, err, f"tensor {BAD_TENSOR}")
    assert out == ""  # no NUL bytes, no prompt
    code, out, err = run(capsys, "convert", "--to-hf", str(bad), "--out", str(tmp_path / "hf"))
    assert_one_line_error(code, err, f"weights {bad / ckpt.MODEL_FILE} hold NaN")
    assert snapshot(tmp_path) == before


def test_first_nonfinite_finds_what_overflows_a_sum_and_what_does_not():
    big = torch.full((4,), 3e38)  # finite, but its float32 sum overflows: the exact check must clear it
    assert first_nonfinite({"a": torch.ones(3), "big": big, "ids": torch.arange(3)}) is None
    nan_after_inf = torch.tensor([float("inf"), float("-inf"), 1.0])  # the sum is NaN
    assert first_nonfinite({"a": torch.ones(3), "b": nan_after_inf}) == "b"
    assert first_nonfinite({"h": torch.tensor([1.0, float("nan")], dtype=torch.float16)}) == "h"


# --------------------------------------------------------------------------------------------------
# Checksums
def test_the_marker_records_the_sha256_of_every_file_written_last(tmp_path):
    folder = tiny(tmp_path / "c")
    record = json.loads((folder / ckpt.COMPLETE_MARKER).read_text())
    files = sorted(p.name for p in folder.iterdir() if p.name != ckpt.COMPLETE_MARKER)
    assert record["algorithm"] == "sha256" and sorted(record["files"]) == files
    for name, digest in record["files"].items():
        assert digest == hashlib.sha256((folder / name).read_bytes()).hexdigest()
    assert ckpt.read_checksums(folder) == record["files"]


def flip_tensor_bytes(file: Path, count: int = 64) -> None:
    """Invert ``count`` bytes in the middle of a safetensors file's tensor data (past its JSON header)."""
    data = bytearray(file.read_bytes())
    header = struct.unpack("<Q", data[:8])[0]
    start = 8 + header + (len(data) - 8 - header) // 2
    for i in range(start, start + count):
        data[i] ^= 0xFF
    file.write_bytes(bytes(data))


def test_flipped_bytes_in_the_weights_are_refused_naming_the_file(tmp_path):
    folder = tiny(tmp_path / "c")
    flip_tensor_bytes(folder / ckpt.MODEL_FILE)
    assert load_file(str(folder / ckpt.MODEL_FILE))  # still a readable file: only the checksum tells
    before = snapshot(tmp_path)
    message = (f"checkpoint {folder} is damaged: {ckpt.MODEL_FILE} does not match the checksum recorded when it "
               f"was saved; use an earlier checkpoint")
    for load in (ckpt.load_checkpoint, ckpt.load_task_checkpoint, ckpt.load_pretrained,
                 lambda p: ckpt.convert_to_hf(p, tmp_path / "hf")):
        with pytest.raises(CheckpointError, match=re.escape(message)):
            load(folder)
    assert snapshot(tmp_path) == before


def test_a_truncated_optimizer_stops_the_resume_naming_it(tmp_path):
    folder = tiny(tmp_path / "run" / "checkpoints" / "step-0000004")
    torch.save({"state": {}, "param_groups": [{"lr": 1e-3, "params": list(range(40))}]}, folder / "o.pt")
    # rewrite the checkpoint with the optimizer and trainer state, as the trainer does
    loaded = ckpt.load_checkpoint(folder)
    ckpt.save_checkpoint(folder, loaded.model, loaded.tokenizer, loaded.config,
                         optimizer_state=torch.load(folder / "o.pt"), trainer_state={"step": 4})
    ckpt.update_latest(tmp_path / "run", folder.name)
    data = (folder / ckpt.OPTIMIZER_FILE).read_bytes()
    (folder / ckpt.OPTIMIZER_FILE).write_bytes(data[: len(data) // 2])
    before = snapshot(tmp_path)
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint {folder} is damaged: {ckpt.OPTIMIZER_FILE} "
                                                        f"does not match the checksum recorded")):
        ckpt.find_resume_checkpoint(tmp_path / "run", (ckpt.OPTIMIZER_FILE, ckpt.TRAINER_STATE_FILE))
    assert snapshot(tmp_path) == before
    assert ckpt.load_checkpoint(tmp_path / "run").path == folder  # inference does not read the optimizer


def test_a_deleted_or_edited_file_is_named(tmp_path):
    folder = tiny(tmp_path / "c")
    (folder / ckpt.CONFIG_FILE).write_text((folder / ckpt.CONFIG_FILE).read_text().replace("16", "16 "))
    with pytest.raises(CheckpointError, match=re.escape(f"{ckpt.CONFIG_FILE} does not match the checksum")):
        ckpt.load_checkpoint(folder)
    other = tiny(tmp_path / "d")
    tokenizer_file = next(n for n in ckpt.read_checksums(other) if n not in (ckpt.MODEL_FILE, ckpt.CONFIG_FILE))
    (other / tokenizer_file).unlink()
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint {other} is damaged: {tokenizer_file} is missing")):
        ckpt.load_checkpoint(other)


def test_checkpoints_without_checksums_still_load(tmp_path):
    folder = tiny(tmp_path / "old")
    (folder / ckpt.COMPLETE_MARKER).write_text("ok\n")  # what gptforge wrote before checksums
    expected = GPT.forward(ckpt.load_checkpoint(folder).model, torch.tensor([[1, 2, 3]]))
    data = bytearray((folder / ckpt.MODEL_FILE).read_bytes())
    start = 8 + struct.unpack("<Q", data[:8])[0]
    for i in range(start, start + 4096, 4):
        data[i] ^= 0xFF  # the lowest mantissa byte of float32s: other values, still finite
    (folder / ckpt.MODEL_FILE).write_bytes(bytes(data))
    assert ckpt.read_checksums(folder) is None
    loaded = ckpt.load_checkpoint(folder)  # unverifiable, so it loads as it is
    assert not torch.equal(loaded.model(torch.tensor([[1, 2, 3]])), expected)


def test_a_damaged_marker_is_an_error_not_an_unverified_load(tmp_path):
    folder = tiny(tmp_path / "c")
    (folder / ckpt.COMPLETE_MARKER).write_text('{"format": 1, "algorithm": "sha256", "fil')
    with pytest.raises(CheckpointError, match=re.escape(f"the COMPLETE marker of checkpoint {folder} is damaged")):
        ckpt.load_checkpoint(folder)


def test_serve_and_chat_refuse_in_one_line(tmp_path, capsys, monkeypatch):
    """`serve` (before it listens) and `chat` (before it reads a line) refuse non-finite weights as generate does."""
    import io
    import sys

    bad = poison(tiny(tmp_path / "bad"))
    before = snapshot(tmp_path)
    code, out, err = run(capsys, "serve", "--checkpoint", str(bad), "--device", "cpu", "--port", "0")
    assert_one_line_error(code, err, nan_message(bad))
    assert out == ""
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    code, out, err = run(capsys, "chat", "--checkpoint", str(bad), "--device", "cpu")
    assert_one_line_error(code, err, nan_message(bad))
    assert out == ""
    assert snapshot(tmp_path) == before
