"""A fine-tuning run under faults: changed hyperparameters on resume, damaged training state, a signal, a
diverging learning rate. Failures leave the run folder byte-identical."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from gptforge import checkpoint as ckpt
from gptforge.errors import CheckpointError, ConfigError, TrainingDiverged
from gptforge.finetune import finetune
from gptforge.train.metrics import read_metrics
from gptforge.weights import first_nonfinite
from tests.model_utils import reseal
from tests.train.test_faults import snapshot, strict_records

pytestmark = pytest.mark.integration


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["train_loss"] for r in read_metrics(out / "metrics.jsonl") if "train_loss" in r}


@pytest.fixture
def finished(make_config):
    config = make_config("classify", max_steps=4, eval_interval=2, checkpoint_interval=2, patience=3)
    finetune(config, progress=False)
    return Path(config.out_dir)


def test_resume_refuses_changed_hyperparameters_and_leaves_config_json_alone(make_config, finished, caplog):
    before = snapshot(finished)
    with pytest.raises(ConfigError) as err:
        finetune(make_config("classify", max_steps=6, eval_interval=2, checkpoint_interval=2, patience=5,
                             learning_rate=1e-2), resume=True, progress=False)
    assert str(err.value).startswith("--resume would change learning_rate (0.003 -> 0.01), patience (3 -> 5) "
                                     f"from what the run in {finished} was started with")
    assert str(err.value).endswith("or add --allow_resume_changes=true to change them on purpose")
    assert snapshot(finished) == before

    # where it stops and how often it evaluates may change; with the flag, the rest too (loudly)
    result = finetune(make_config("classify", max_steps=6, eval_interval=3, checkpoint_interval=2, patience=5,
                                  learning_rate=1e-2, allow_resume_changes=True), resume=True, progress=False)
    assert result.steps == 6
    assert "with changed settings (--allow_resume_changes): learning_rate (0.003 -> 0.01), patience (3 -> 5)" \
        in caplog.text
    assert json.loads((finished / "config.json").read_text())["learning_rate"] == 1e-2


def test_resume_keeps_the_schedule_it_started_with(make_config, finished):
    finetune(make_config("classify", max_steps=6, eval_interval=2, checkpoint_interval=2, patience=3),
             resume=True, progress=False)
    lr = {r["step"]: r["lr"] for r in read_metrics(finished / "metrics.jsonl") if "lr" in r}
    assert lr[5] == lr[6] == pytest.approx(3e-4)  # min_lr_ratio 0.1 × 3e-3: the 4-step schedule has ended
    state = json.loads((ckpt.latest_checkpoint(finished) / ckpt.TRAINER_STATE_FILE).read_text())
    assert state["schedule_steps"] == 4


@pytest.mark.parametrize("file, damage, fragment", [
    (ckpt.TRAINER_STATE_FILE, lambda p: p.write_text(p.read_text()[:40]), "cannot read"),
    (ckpt.TRAINER_STATE_FILE, lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "early_stopping": 3})),
     "trainer_state.json is damaged or not a fine-tuning run's"),
    (ckpt.OPTIMIZER_FILE, lambda p: p.write_bytes(p.read_bytes()[:100]), "cannot read"),
    # the other damaged kinds, as a fine-tuning run meets them
    (ckpt.TRAINER_STATE_FILE, lambda p: p.write_text(json.dumps({k: v for k, v in json.loads(p.read_text()).items()
                                                                 if k != "rng"})), "has no 'rng' entry"),
    (ckpt.OPTIMIZER_FILE, lambda p: torch.save({"hello": 1}, p), "optimizer.pt is not an optimizer state"),
])
def test_damaged_training_state_changes_nothing(make_config, finished, file, damage, fragment):
    latest = ckpt.latest_checkpoint(finished)
    damage(latest / file)
    config = make_config("classify", max_steps=6, eval_interval=2, checkpoint_interval=2, patience=3)
    for message in (f"{file} does not match the checksum", fragment):  # the checksum first; resealed, the contents
        before = snapshot(finished)
        with pytest.raises(CheckpointError, match=message):
            finetune(config, resume=True, progress=False)
        assert snapshot(finished) == before
        reseal(latest)


def test_a_signal_saves_at_the_next_step_and_resume_is_exact(make_config, tmp_path):
    keys = dict(max_steps=6, eval_interval=2, checkpoint_interval=100, dropout=0.2)
    straight = finetune(make_config("classify", out_dir=str(tmp_path / "straight"), **keys), progress=False)

    def sigterm_at_step_2(step: int, metrics) -> None:
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # during an evaluation: taken at step 3's boundary

    config = make_config("classify", out_dir=str(tmp_path / "split"), **keys)
    stopped = finetune(config, progress=False, on_eval=sigterm_at_step_2, handle_signals=True)
    assert stopped.stopped_by == "SIGTERM" and stopped.steps == 3 and stopped.after is None
    assert stopped.last_checkpoint == ckpt.latest_checkpoint(config.out_dir) == tmp_path / "split/checkpoints/step-0000003"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert not (tmp_path / "split/report.json").exists()

    resumed = finetune(config, resume=True, progress=False)
    assert losses(tmp_path / "split") == losses(tmp_path / "straight") and len(losses(tmp_path / "split")) == 6
    assert resumed.after["metrics"] == straight.after["metrics"]
    a = ckpt.load_state_dict(straight.last_checkpoint / ckpt.MODEL_FILE)
    b = ckpt.load_state_dict(resumed.last_checkpoint / ckpt.MODEL_FILE)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_diverging_fine_tune_stops_and_keeps_its_finite_checkpoints(make_config, finished):
    with pytest.raises(TrainingDiverged, match=r"^training diverged: .*still the latest checkpoint; resume from it "
                                               r"with a lower learning rate \(--learning_rate=\.\.\. "
                                               r"--allow_resume_changes=true\)"):
        finetune(make_config("classify", max_steps=40, eval_interval=2, checkpoint_interval=2, patience=3,
                             learning_rate=1e9, warmup_steps=0, grad_clip=0, max_nonfinite_steps=2,
                             allow_resume_changes=True), resume=True, progress=False)
    for step in (finished / "checkpoints").glob("step-*"):
        assert first_nonfinite(ckpt.load_state_dict(step / ckpt.MODEL_FILE)) is None
    assert first_nonfinite(ckpt.load_state_dict(finished / "best" / ckpt.MODEL_FILE)) is None
    strict_records(finished / "metrics.jsonl")
