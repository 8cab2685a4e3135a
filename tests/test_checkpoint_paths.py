"""Paths stay where they belong: ``latest`` names a folder inside checkpoints/, shard names stay inside their
model folder, a mistyped local path is an error with a did-you-mean (never a hub download), and a
fine-tuning run folder means its best/ checkpoint, which the load names."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gptforge import checkpoint as ckpt
from gptforge.config import InferenceConfig
from gptforge.errors import CheckpointError
from tests.cli_utils import assert_one_line_error, run
from tests.model_utils import save_tiny_checkpoint

CHARS = "abcdefgh \n"


def snapshot(root: Path) -> dict[str, bytes | None]:
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None) for p in root.rglob("*")}


def tiny(path: Path, seed: int = 0) -> Path:
    return save_tiny_checkpoint(path, CHARS, block_size=16, n_layer=1, n_embd=16, seed=seed)


@pytest.fixture
def no_hub(monkeypatch):
    def refuse(repo_id):
        raise AssertionError(f"tried to download {repo_id!r} from the hub")
    monkeypatch.setattr(ckpt, "download_from_hub", refuse)


# --------------------------------------------------------------------------------------------------
# latest
@pytest.mark.parametrize("pointer", ["../../elsewhere/step-0000001", "/tmp/step-0000001", "..", "step-1/../../x",
                                     "sub/step-0000001"])
def test_latest_must_name_a_folder_inside_checkpoints(tmp_path, pointer):
    run_dir = tmp_path / "a" / "run"
    tiny(run_dir / "checkpoints" / "step-0000001")
    tiny(tmp_path / "elsewhere" / "step-0000001", seed=3)  # what ../../elsewhere would reach
    (run_dir / "checkpoints" / "latest").write_text(pointer + "\n")
    before = snapshot(tmp_path)
    message = (f"{run_dir / 'checkpoints' / 'latest'} names {pointer!r}, which is not a checkpoint folder inside "
               f"{run_dir / 'checkpoints'}; it must hold a folder name such as step-0000100")
    for call in (ckpt.latest_checkpoint, ckpt.resolve_checkpoint, ckpt.load_checkpoint,
                 lambda p: ckpt.find_resume_checkpoint(p, ())):
        with pytest.raises(CheckpointError, match=re.escape(message)):
            call(run_dir)
    assert snapshot(tmp_path) == before


def test_latest_naming_a_symlink_out_of_the_run_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    tiny(run_dir / "checkpoints" / "step-0000001")
    outside = tiny(tmp_path / "outside" / "step-0000009", seed=3)
    (run_dir / "checkpoints" / "step-0000009").symlink_to(outside, target_is_directory=True)
    (run_dir / "checkpoints" / "latest").write_text("step-0000009\n")
    with pytest.raises(CheckpointError, match="not a checkpoint folder inside"):
        ckpt.load_checkpoint(run_dir)


def test_update_latest_refuses_a_path(tmp_path):
    run_dir = tmp_path / "run"
    tiny(run_dir / "checkpoints" / "step-0000001")
    before = snapshot(tmp_path)
    with pytest.raises(CheckpointError, match=re.escape("'latest' must name a folder inside")):
        ckpt.update_latest(run_dir, "../run/checkpoints/step-0000001")
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------------------------------
# shard names
def sharded_hf_folder(tmp_path: Path) -> Path:
    """A Hugging Face folder whose weights are split over two shards with an index."""
    source = tiny(tmp_path / "c")
    hf = ckpt.convert_to_hf(source, tmp_path / "hf")
    (hf / "char_tokenizer.json").write_bytes((source / "char_tokenizer.json").read_bytes())  # no HF form of it
    state = load_file(str(hf / "model.safetensors"))
    names = sorted(state)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(hf / shard), metadata={"format": "pt"})
    (hf / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    return hf


def test_a_sharded_folder_loads(tmp_path):
    hf = sharded_hf_folder(tmp_path)
    assert ckpt.load_pretrained(hf).model.config.n_layer == 1


@pytest.mark.parametrize("shard", ["../model-00002-of-00002.safetensors", "/tmp/x.safetensors",
                                   "sub/../../x.safetensors", "~/x.safetensors"])
def test_shard_names_outside_the_folder_are_refused(tmp_path, shard):
    hf = sharded_hf_folder(tmp_path)
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes((hf / "model-00002-of-00002.safetensors").read_bytes())
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: (shard if v.startswith("model-00002") else v) for k, v in index["weight_map"].items()}
    (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    before = snapshot(tmp_path)
    with pytest.raises(CheckpointError, match=re.escape(
            f"{hf / 'model.safetensors.index.json'} names shard {shard!r}, which is not a file inside {hf}; "
            f"refusing to read weights from outside the model folder")):
        ckpt.convert_from_hf(hf, tmp_path / "out")
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------------------------------
# local-looking paths
def test_a_mistyped_local_path_suggests_the_sibling_and_never_asks_the_hub(tmp_path, monkeypatch, no_hub, capsys):
    monkeypatch.chdir(tmp_path)
    tiny(tmp_path / "runs" / "demo" / "checkpoints" / "step-0000001")
    for source, hint in [("runs/demo-typo", "did you mean runs/demo?"), ("runs/dmeo/checkpoints", "did you mean runs/demo?"),
                         ("./runs/demo2", "did you mean runs/demo?"), ("../nowhere-at-all", "no such local folder"),
                         ("/no/such/folder", "no such local folder")]:
        with pytest.raises(CheckpointError, match=re.escape(f"model {source} does not exist (") + ".*" + re.escape(hint)):
            ckpt.load_pretrained(source)
    code, _, err = run(capsys, "generate", "--checkpoint", "runs/demo-typo", "--device", "cpu")
    assert_one_line_error(code, err, "model runs/demo-typo does not exist (no such local folder; did you mean runs/demo?)")


def test_a_missing_home_path_is_local(tmp_path, monkeypatch, no_hub):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "gpt-small").mkdir()
    with pytest.raises(CheckpointError, match=re.escape(f"did you mean {tmp_path / 'models' / 'gpt-small'}?")):
        ckpt.load_pretrained("~/models/gpt-smal")


def test_a_hub_id_still_goes_to_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    asked = []
    monkeypatch.setattr(ckpt, "download_from_hub", lambda repo_id: asked.append(repo_id) or tmp_path)
    assert ckpt.looks_local("someorg/model") is False
    ckpt.resolve_model_source("someorg/model")
    ckpt.resolve_model_source("gpt2")
    assert asked == ["someorg/model", "gpt2"]


# --------------------------------------------------------------------------------------------------
# a fine-tuning run folder means best/
def fine_tuning_run(tmp_path: Path) -> Path:
    """A fine-tuning run folder laid out as gptforge.finetune writes it: best/ from an early step, and
    later resumable checkpoints with other weights."""
    run_dir = tmp_path / "ft"
    tiny(run_dir / "best", seed=1)
    tiny(run_dir / "checkpoints" / "step-0000006", seed=2)
    ckpt.update_latest(run_dir, "step-0000006")
    (run_dir / "config.json").write_text(json.dumps({"task": "lm", "checkpoint": "base"}))
    return run_dir


def test_a_fine_tuning_run_folder_means_its_best_checkpoint_everywhere(tmp_path, caplog):
    run_dir = fine_tuning_run(tmp_path)
    best = ckpt.load_checkpoint(run_dir / "best").model.state_dict()
    assert ckpt.resolve_checkpoint(run_dir) == run_dir / "best"
    loaders = [ckpt.load_checkpoint, ckpt.load_task_checkpoint, ckpt.load_pretrained,
               lambda p: ckpt.load_for_inference(InferenceConfig(checkpoint=str(p), device="cpu")),
               lambda p: ckpt.load_for_inference(InferenceConfig(checkpoint=str(p), device="cpu"), task=True)]
    for load in loaders:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="gptforge.checkpoint"):
            loaded = load(run_dir)
        assert loaded.path == run_dir / "best"
        for name, tensor in loaded.model.state_dict().items():
            assert torch.equal(tensor, best[name]), name
        assert f"loaded {run_dir / 'best'} (best validation checkpoint of fine-tuning run {run_dir})" in caplog.messages


def test_a_pretraining_run_folder_still_means_its_latest_and_says_so(tmp_path, caplog):
    run_dir = tmp_path / "run"
    tiny(run_dir / "checkpoints" / "step-0000001")
    tiny(run_dir / "checkpoints" / "step-0000002", seed=1)
    ckpt.update_latest(run_dir, "step-0000002")
    with caplog.at_level(logging.INFO, logger="gptforge.checkpoint"):
        assert ckpt.load_pretrained(run_dir).path.name == "step-0000002"
    assert f"loaded {run_dir / 'checkpoints' / 'step-0000002'} (latest complete checkpoint of run {run_dir})" \
        in caplog.messages


def test_the_cli_says_which_folder_it_loaded(tmp_path, capsys):
    run_dir = fine_tuning_run(tmp_path)
    code, out, err = run(capsys, "generate", "--checkpoint", str(run_dir), "--device", "cpu", "--prompt", "ab",
                         "--max-new-tokens", "2", "--temperature", "0")
    assert code == 0, err
    assert f"loaded {run_dir / 'best'} (best validation checkpoint of fine-tuning run {run_dir})" in err
