"""Resume continues a run exactly; the best checkpoint and early stopping survive a restart."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gptforge.checkpoint import MODEL_FILE, latest_checkpoint, load_state_dict
from gptforge.errors import CheckpointError, ConfigError
from gptforge.finetune import finetune
from gptforge.train.metrics import read_metrics

pytestmark = pytest.mark.integration


class Crash(Exception):
    pass


def crash_at(step: int):
    def on_eval(at: int, metrics) -> None:
        if at == step:
            raise Crash

    return on_eval


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["train_loss"] for r in read_metrics(out / "metrics.jsonl") if "train_loss" in r}


@pytest.mark.parametrize("strategy", ["full", "lora"])
def test_a_crashed_run_resumes_to_the_same_weights_and_losses(make_config, tmp_path, strategy):
    # Dropout on and more steps than one epoch holds (160 examples / 16 = 10 batches): the resumed run
    # must restore the random state and the position in the data order.
    keys = dict(strategy=strategy, max_steps=12, eval_interval=4, checkpoint_interval=4, dropout=0.2,
                learning_rate=1e-2, keep_checkpoints=3)
    straight = finetune(make_config("classify", out_dir=str(tmp_path / "straight"), **keys), progress=False)

    config = make_config("classify", out_dir=str(tmp_path / "crashed"), **keys)
    with pytest.raises(Crash):
        finetune(config, progress=False, on_eval=crash_at(12))  # after the step-8 checkpoint
    assert latest_checkpoint(config.out_dir).name == "step-0000008"
    resumed = finetune(config, resume=True, progress=False)

    assert resumed.steps == straight.steps == 12
    assert losses(Path(config.out_dir)) == losses(straight.out_dir)
    assert resumed.after["metrics"] == straight.after["metrics"]
    assert resumed.before == straight.before  # kept in the trainer state
    a = load_state_dict(straight.last_checkpoint / MODEL_FILE)
    b = load_state_dict(resumed.last_checkpoint / MODEL_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if strategy == "lora":
        a = load_state_dict(straight.last_checkpoint / "adapter_model.safetensors")
        b = load_state_dict(resumed.last_checkpoint / "adapter_model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_early_stopping_keeps_the_best_checkpoint(make_config):
    # An absurd learning rate makes every evaluation after the first worse: the run stops after `patience`
    # bad evaluations, and the weights it ends with are the best (first) evaluation's.
    config = make_config("classify", max_steps=40, eval_interval=2, patience=2, metric="val_loss",
                         learning_rate=3.0, warmup_steps=0, grad_clip=0)
    result = finetune(config, progress=False)
    vals = [r["val_loss"] for r in read_metrics(Path(config.out_dir) / "metrics.jsonl") if "val_loss" in r]
    assert result.stopped_early and result.steps < 40
    assert result.steps == result.best_step + 2 * 2
    assert result.best_value == min(vals[1:])  # vals[0] is the model before training
    assert result.after["metrics"]["val_loss"] == pytest.approx(result.best_value, rel=1e-6)


def test_refuses_to_mix_runs(make_config):
    config = make_config("classify", max_steps=2, eval_interval=2)
    with pytest.raises(CheckpointError, match="nothing to resume"):
        finetune(config, resume=True, progress=False)
    finetune(config, progress=False)
    with pytest.raises(ConfigError, match="already holds a fine-tuning run"):
        finetune(config, progress=False)
    with pytest.raises(ConfigError, match="strategy is 'lora' but the run"):
        finetune(make_config("classify", max_steps=2, strategy="lora"), resume=True, progress=False)
