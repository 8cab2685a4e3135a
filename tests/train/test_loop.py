"""The pretraining loop on a tiny char-level corpus: outputs, exact resume, limits and bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gptforge.checkpoint import (COMPLETE_MARKER, MODEL_FILE, latest_checkpoint, load_checkpoint,
                                 load_state_dict)
from gptforge.data.prepare import prepare_corpus
from gptforge.errors import CheckpointError, ConfigError, DataError
from gptforge.train import pretrain
from gptforge.train.metrics import read_metrics

pytestmark = pytest.mark.integration


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_state_dict(checkpoint / MODEL_FILE)


def train_losses(out_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train_loss"] for r in read_metrics(out_dir / "metrics.jsonl") if "train_loss" in r}


def test_a_run_writes_checkpoints_metrics_tensorboard_and_a_loss_curve(make_config):
    config = make_config(max_steps=6, eval_interval=3, log_interval=2, checkpoint_interval=3, tensorboard=True)
    result = pretrain(config, progress=False)
    out = Path(config.train.out_dir)

    assert result.steps == 6 and result.tokens_seen == 6 * 4 * 16
    assert result.checkpoint == out / "checkpoints" / "step-0000006" == latest_checkpoint(out)
    assert result.val_ppl == pytest.approx(2.718281828 ** result.val_loss)
    assert result.val_bpb == pytest.approx(result.val_loss / 0.6931471805599453)  # 1 byte per char token
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records if "train_loss" in r] == [2, 4, 6]
    assert [r["step"] for r in records if "val_loss" in r] == [3, 6]
    assert set(records[0]) == {"step", "train_loss", "lr", "tokens_per_s", "elapsed_s"}
    assert records[-1]["val_loss"] == result.val_loss
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    saved = json.loads((out / "config.json").read_text())
    assert saved["model"]["vocab_size"] == result_vocab(config)
    ckpt = load_checkpoint(out)
    assert ckpt.config["model"] == saved["model"]
    state = json.loads((result.checkpoint / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["world_size"] == 1 and state["tokens_seen"] == result.tokens_seen
    assert {"python", "numpy", "torch", "cuda"} == set(state["rng"][0])


def result_vocab(config) -> int:
    from gptforge.data.tokens import TokenData

    return TokenData(config.data.dir).vocab_size


def test_resume_is_exact(make_config, tmp_path):
    # Dropout makes the torch RNG matter; the schedule is pinned to 8 steps in both runs.
    model = {"dropout": 0.2}
    common = dict(lr_decay_steps=8, checkpoint_interval=4, eval_interval=3, grad_accum_steps=2)
    whole = make_config(model, max_steps=8, out_dir=str(tmp_path / "whole"), **common)
    pretrain(whole, progress=False)

    half = make_config(model, max_steps=4, out_dir=str(tmp_path / "split"), **common)
    first = pretrain(half, progress=False)
    assert first.steps == 4
    rest = make_config(model, max_steps=8, out_dir=str(tmp_path / "split"), **common)
    resumed = pretrain(rest, resume=True, progress=False)

    assert resumed.steps == 8 and resumed.tokens_seen == 8 * 2 * 4 * 16
    assert train_losses(tmp_path / "split") == train_losses(tmp_path / "whole")  # exact, every step
    a, b = weights(tmp_path / "whole/checkpoints/step-0000008"), weights(resumed.checkpoint)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [r["step"] for r in read_metrics(tmp_path / "split/metrics.jsonl") if "train_loss" in r]
    assert steps == list(range(1, 9))  # one clean curve


def test_a_step_folder_without_its_marker_is_skipped_on_resume(make_config, tmp_path):
    config = make_config(max_steps=4, checkpoint_interval=2)
    pretrain(config, progress=False)
    out = Path(config.train.out_dir)
    (out / "checkpoints/step-0000004" / COMPLETE_MARKER).unlink()  # as if killed before the marker

    assert (out / "checkpoints/latest").read_text().strip() == "step-0000004"
    assert latest_checkpoint(out) == out / "checkpoints/step-0000002"
    assert load_checkpoint(out).path == out / "checkpoints/step-0000002"
    result = pretrain(make_config(max_steps=5, checkpoint_interval=2), resume=True, progress=False)
    assert result.steps == 5
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if "train_loss" in r]
    assert steps == [1, 2, 3, 4, 5]


def test_max_minutes_stops_early_with_a_checkpoint(make_config):
    result = pretrain(make_config(max_steps=1000, max_minutes=1e-9, checkpoint_interval=500), progress=False)
    assert result.steps == 1
    assert result.checkpoint.name == "step-0000001" and latest_checkpoint(result.out_dir) == result.checkpoint
    assert result.val_loss is not None


def test_resume_may_raise_max_steps_and_a_finished_run_trains_no_more(make_config):
    pretrain(make_config(max_steps=2), progress=False)
    again = pretrain(make_config(max_steps=2), resume=True, progress=False)
    assert again.steps == 2 and again.checkpoint.name == "step-0000002" and again.val_loss is not None
    more = pretrain(make_config(max_steps=3), resume=True, progress=False)
    assert more.steps == 3 and more.checkpoint.name == "step-0000003"


def test_overwrite_starts_afresh(make_config):
    first = pretrain(make_config(max_steps=4), progress=False)
    with pytest.raises(ConfigError, match=r"already holds checkpoints; pass --resume to continue or "
                                          r"--train\.overwrite=true to start afresh"):
        pretrain(make_config(max_steps=2), progress=False)
    second = pretrain(make_config(max_steps=2, overwrite=True), progress=False)
    names = sorted(p.name for p in (first.out_dir / "checkpoints").iterdir())
    assert names == ["latest", "step-0000002"] and second.steps == 2
    assert [r["step"] for r in read_metrics(first.out_dir / "metrics.jsonl") if "train_loss" in r] == [1, 2]


# --------------------------------------------------------------------------------------------------
# Bad inputs: one clear sentence each.
def test_missing_data_folder(make_config, tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match=r"nope is not a prepared data folder .*gptforge prepare"):
        pretrain(make_config(data=missing), progress=False)


def test_resume_with_nothing_to_resume(make_config, tmp_path):
    with pytest.raises(CheckpointError, match=r"nothing to resume in .*run"):
        pretrain(make_config(), resume=True, progress=False)


def test_resume_on_data_from_another_tokenizer(make_config, tmp_path, corpus_writer):
    pretrain(make_config(max_steps=2), progress=False)
    prepare_corpus(corpus_writer(tmp_path / "other.txt", "zebra yak xylophone quiz"), tmp_path / "other",
                   tokenizer="char")
    with pytest.raises(DataError, match=r"was prepared with tokenizer \w+ but checkpoint .*step-0000002's tokenizer"):
        pretrain(make_config(max_steps=4, data=tmp_path / "other"), resume=True, progress=False)


def test_resume_with_another_model_shape(make_config):
    pretrain(make_config(max_steps=2), progress=False)
    with pytest.raises(ConfigError, match=r"model\.n_embd is 64 but checkpoint .* was trained with 32; "
                                          r"a resumed run must keep the model section unchanged"):
        pretrain(make_config({"n_embd": 64}, max_steps=4), resume=True, progress=False)


def test_model_vocab_smaller_than_the_data(make_config):
    with pytest.raises(ConfigError, match=r"model\.vocab_size \(100\) is smaller than the vocabulary of the data"):
        pretrain(make_config({"vocab_size": 100}), progress=False)


def test_context_longer_than_the_validation_split(make_config, data_dir):
    from gptforge.data.tokens import TokenData

    val_tokens = TokenData(data_dir).num_tokens("val")
    with pytest.raises(DataError, match=rf"the val split of .* has {val_tokens} tokens but one block needs"):
        pretrain(make_config({"block_size": val_tokens}), progress=False)


def test_nothing_is_written_when_setup_fails(make_config):
    config = make_config({"vocab_size": 100})
    with pytest.raises(ConfigError):
        pretrain(config, progress=False)
    assert not Path(config.train.out_dir).exists()
