"""`gptforge train` when things go wrong: a diverging resume, damaged training state, out-of-range token
ids, changed hyperparameters on resume, SIGTERM; and the schedule's length fixed at the run's start.

Every failure must be one `error:` line, exit 2, and leave the run folder byte-identical."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from gptforge import checkpoint as ckpt
from gptforge.errors import ConfigError
from gptforge.train import pretrain
from gptforge.train.metrics import read_metrics
from gptforge.weights import first_nonfinite
from tests.cli_utils import assert_one_line_error, run
from tests.model_utils import reseal
from tests.train.test_faults import snapshot, strict_records

pytestmark = pytest.mark.integration


def yaml_config(config, path: Path) -> str:
    """``config`` (a RunConfig) as a YAML file for ``gptforge train --config``."""
    raw = config.to_dict()
    raw.pop("preset", None)
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return str(path)


def train_losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["train_loss"] for r in read_metrics(out / "metrics.jsonl") if "train_loss" in r}


def lrs(out: Path) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in read_metrics(out / "metrics.jsonl") if "lr" in r}


def same_weights(a: Path, b: Path) -> bool:
    x, y = ckpt.load_state_dict(a / ckpt.MODEL_FILE), ckpt.load_state_dict(b / ckpt.MODEL_FILE)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture
def healthy_run(make_config, tmp_path):
    """A finished 4-step run (checkpoints at 2 and 4) and its YAML config."""
    config = make_config(max_steps=4)
    pretrain(config, progress=False)
    return Path(config.train.out_dir), yaml_config(config, tmp_path / "run.yaml")


# --------------------------------------------------------------------------------------------------
# The case: resuming a healthy run at learning rate 1e6
def test_resuming_at_a_huge_learning_rate_is_refused_then_stops_with_one_line_and_keeps_latest(healthy_run, capsys):
    out, config = healthy_run
    before = snapshot(out)
    code, _, err = run(capsys, "train", "--config", config, "--resume", "-q", "--train.learning_rate=1e6",
                       "--train.min_lr=1e6", "--train.max_steps=30")
    assert_one_line_error(code, err, "--resume would change learning_rate (0.003 -> 1000000.0), "
                                     "min_lr (0.0003 -> 1000000.0) from what the run in")
    assert "add --train.allow_resume_changes=true to change them on purpose" in err
    assert snapshot(out) == before  # config.json included

    code, outp, err = run(capsys, "train", "--config", config, "--resume", "-q", "--train.learning_rate=1e6",
                          "--train.min_lr=1e6", "--train.max_steps=30", "--train.eval_interval=100",
                          "--train.max_nonfinite_steps=3", "--train.allow_resume_changes=true")
    assert_one_line_error(code, err, "training diverged: 3 steps in a row had a non-finite loss or gradient norm")
    assert "lower learning rate" in err and "val loss" not in outp and "perplexity" not in outp
    latest = ckpt.latest_checkpoint(out)
    assert latest is not None and f"{latest} is still the latest checkpoint" in err
    for step in sorted((out / "checkpoints").glob("step-*")):  # every checkpoint kept is finite
        assert ckpt.is_complete(step) and first_nonfinite(ckpt.load_state_dict(step / ckpt.MODEL_FILE)) is None
    records = strict_records(out / "metrics.jsonl")  # strict JSON, NaN as null
    assert [r["skipped_steps"] for r in records if r.get("skipped")] == [1, 2, 3]
    assert all(r["train_loss"] is None for r in records if r.get("skipped"))


def test_a_non_finite_validation_loss_stops_the_run_without_saving(healthy_run, capsys):
    out, config = healthy_run
    code, _, err = run(capsys, "train", "--config", config, "--resume", "-q", "--train.learning_rate=1e6",
                       "--train.min_lr=1e6", "--train.max_steps=30", "--train.eval_interval=1",
                       "--train.checkpoint_interval=1", "--train.allow_resume_changes=true")
    assert code == 2 and "error: training diverged: validation loss is nan at step" in err
    latest = ckpt.latest_checkpoint(out)
    assert f"{latest} is still the latest checkpoint" in err
    val = [r for r in strict_records(out / "metrics.jsonl") if "val_loss" in r]
    assert val[-1]["val_loss"] is None and val[-1]["val_ppl"] is None
    assert int(latest.name.removeprefix("step-")) == val[-1]["step"] - 1  # that step's checkpoint was not written
    assert first_nonfinite(ckpt.load_state_dict(latest / ckpt.MODEL_FILE)) is None


# --------------------------------------------------------------------------------------------------
# The schedule's length is fixed at the run's start
def test_going_further_keeps_the_schedule_and_matches_one_run_with_that_schedule(make_config, tmp_path, caplog):
    pretrain(make_config(max_steps=4, out_dir=str(tmp_path / "split")), progress=False)
    resumed = pretrain(make_config(max_steps=8, out_dir=str(tmp_path / "split")), resume=True, progress=False)
    # the choice is said, not silent (the README's "continue, and go further" flow)
    assert ("the learning-rate schedule keeps the length it started with (4 steps): steps 5..8 run at train.min_lr; "
            "to stretch it instead, pass --train.lr_decay_steps=8 with --train.allow_resume_changes=true") in caplog.text
    whole = pretrain(make_config(max_steps=8, lr_decay_steps=4, out_dir=str(tmp_path / "whole")), progress=False)

    assert [lrs(tmp_path / "split")[s] for s in range(5, 9)] == [3e-4] * 4  # min_lr after the 4-step schedule
    assert train_losses(tmp_path / "split") == train_losses(tmp_path / "whole") and resumed.steps == 8
    assert same_weights(resumed.checkpoint, whole.checkpoint)
    state = json.loads((resumed.checkpoint / ckpt.TRAINER_STATE_FILE).read_text())
    assert state["schedule_steps"] == 4


def test_changing_the_schedule_on_resume_is_explicit(make_config, tmp_path, caplog):
    pretrain(make_config(max_steps=4), progress=False)
    out = Path(make_config().train.out_dir)
    before = snapshot(out)
    with pytest.raises(ConfigError, match=r"--resume would change lr_decay_steps \(4 -> 8\)"):
        pretrain(make_config(max_steps=8, lr_decay_steps=8), resume=True, progress=False)
    assert snapshot(out) == before
    pretrain(make_config(max_steps=8, lr_decay_steps=8, allow_resume_changes=True), resume=True, progress=False)
    assert "with changed settings (--train.allow_resume_changes): lr_decay_steps (4 -> 8)" in caplog.text
    from gptforge.train.optim import lr_at

    expected = lr_at(4, learning_rate=3e-3, min_lr=3e-4, warmup_steps=2, decay_steps=8)
    assert lrs(out)[5] == pytest.approx(expected) and expected > 3e-4


# --------------------------------------------------------------------------------------------------
# Damaged training state: one line, exit 2, the run folder unchanged
def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _edit_state(**changes):
    def edit(path: Path) -> None:
        state = json.loads(path.read_text())
        for key, value in changes.items():
            if value is None:
                del state[key]
            else:
                state[key] = value
        path.write_text(json.dumps(state))
    return edit


DAMAGE = {
    "truncated trainer state": (ckpt.TRAINER_STATE_FILE, _truncate, "cannot read {ck}/trainer_state.json (JSONDecodeError"),
    "no rng": (ckpt.TRAINER_STATE_FILE, _edit_state(rng=None), "trainer_state.json has no 'rng' entry"),
    "bad schedule": (ckpt.TRAINER_STATE_FILE, _edit_state(schedule_steps=0), "has an invalid 'schedule_steps' entry"),
    "bad data position": (ckpt.TRAINER_STATE_FILE, _edit_state(batch_generator="AAAA"),
                          "trainer_state.json is damaged or was not written by this kind of run"),
    "truncated optimizer": (ckpt.OPTIMIZER_FILE, _truncate, "cannot read {ck}/optimizer.pt"),
    "foreign optimizer": (ckpt.OPTIMIZER_FILE, lambda p: torch.save({"hello": 1}, p),
                          "optimizer.pt is not an optimizer state"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_training_state_is_one_line_and_changes_nothing(healthy_run, capsys, case):
    out, config = healthy_run
    name, damage, fragment = DAMAGE[case]
    ck = out / "checkpoints/step-0000004"
    damage(ck / name)
    before = snapshot(out)
    code, _, err = run(capsys, "train", "--config", config, "--resume", "-q", "--train.max_steps=6")
    # the checksum recorded at save catches it first, naming the file ...
    assert_one_line_error(code, err, f"checkpoint {ck} is damaged: {name} does not match the checksum")
    assert snapshot(out) == before
    # ... and behind it, a file that matches its (resealed) checksum is still checked for what it holds
    reseal(ck)
    before = snapshot(out)
    code, _, err = run(capsys, "train", "--config", config, "--resume", "-q", "--train.max_steps=6")
    assert_one_line_error(code, err, fragment.format(ck=ck))
    assert snapshot(out) == before


def test_an_optimizer_state_from_a_wider_model_is_refused_before_anything_is_written(make_config, healthy_run,
                                                                                    capsys, tmp_path):
    out, config = healthy_run
    wide = make_config({"n_embd": 64}, max_steps=2, out_dir=str(tmp_path / "wide"))
    pretrain(wide, progress=False)
    shutil.copy(tmp_path / "wide/checkpoints/step-0000002/optimizer.pt", out / "checkpoints/step-0000004/optimizer.pt")
    reseal(out / "checkpoints/step-0000004")  # past the checksum, to the shape check
    before = snapshot(out)
    code, _, err = run(capsys, "train", "--config", config, "--resume", "-q", "--train.max_steps=6")
    assert_one_line_error(code, err, "optimizer.pt does not fit the model: its 'exp_avg' has shape (")
    assert "for a parameter of shape (" in err
    assert snapshot(out) == before


def test_weights_of_another_shape_are_refused_before_anything_is_written(make_config, healthy_run, capsys, tmp_path):
    """model.safetensors from a wider model (sealed into the checkpoint, so past the checksum): one line naming
    the tensor, the run folder byte-identical."""
    out, config = healthy_run
    pretrain(make_config({"n_embd": 64}, max_steps=2, out_dir=str(tmp_path / "wide")), progress=False)
    ck = out / "checkpoints/step-0000004"
    shutil.copy(tmp_path / "wide/checkpoints/step-0000002" / ckpt.MODEL_FILE, ck / ckpt.MODEL_FILE)
    reseal(ck)
    before = snapshot(out)
    code, _, err = run(capsys, "train", "--config", config, "--resume", "-q", "--train.max_steps=6")
    assert_one_line_error(code, err, f"weights {ck / ckpt.MODEL_FILE} do not fit the model config: tensor ")  # (was torch's first line, naming neither)
    assert re.search(r"has shape \(\d+,( \d+)?\), the config gives \(\d+,( \d+)?\)$", err.strip()), err
    assert snapshot(out) == before


def _corrupt_ids(data_dir: Path, target: Path) -> Path:
    shutil.copytree(data_dir, target)
    ids = np.memmap(target / "train.bin", dtype=json.loads((target / "meta.json").read_text())["dtype"], mode="r+")
    ids[1234] = 60000
    ids.flush()
    del ids
    return target


def test_token_ids_beyond_the_vocabulary_are_one_line(healthy_run, data_dir, capsys, tmp_path):
    out, config = healthy_run
    bad = _corrupt_ids(data_dir, tmp_path / "bad_data")
    before = snapshot(out)
    code, _, err = run(capsys, "train", "--config", config, "--resume", "-q", "--train.max_steps=6",
                       f"--data.dir={bad}")
    assert_one_line_error(code, err, f"{bad / 'train.bin'} holds token id 60000 at position 1234 but the model's "
                                     "vocabulary has")
    assert snapshot(out) == before
    fresh = tmp_path / "fresh"
    code, _, err = run(capsys, "train", "--config", config, "-q", f"--data.dir={bad}", f"--train.out_dir={fresh}")
    assert_one_line_error(code, err, "holds token id 60000")
    assert not fresh.exists()


# --------------------------------------------------------------------------------------------------
# SIGTERM: a checkpoint at the next step, a message, 128 + 15; --resume continues exactly
def test_sigterm_during_train_saves_says_where_and_resume_is_exact(make_config, tmp_path):
    common = dict(max_steps=100000, lr_decay_steps=200, checkpoint_interval=100000, eval_interval=100000,
                  log_interval=1)
    config = make_config(out_dir=str(tmp_path / "split"), **common)
    out = Path(config.train.out_dir)
    env = {**os.environ, "GPTFORGE_NATIVE": "0",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2] / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "gptforge.cli", "train", "--config",
                             yaml_config(config, tmp_path / "split.yaml"), "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 240
        while not train_losses(out) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    latest = ckpt.latest_checkpoint(out)
    n = json.loads((latest / ckpt.TRAINER_STATE_FILE).read_text())["step"]
    assert stdout.strip() == f"stopped by SIGTERM at step {n}; saved {latest}; resume with --resume"
    assert "Traceback" not in stderr and n < 100000

    resumed = pretrain(make_config(out_dir=str(out), **{**common, "max_steps": n + 2}), resume=True, progress=False)
    whole = pretrain(make_config(out_dir=str(tmp_path / "whole"), **{**common, "max_steps": n + 2}), progress=False)
    assert train_losses(out) == train_losses(tmp_path / "whole") and len(train_losses(out)) == n + 2
    assert same_weights(resumed.checkpoint, whole.checkpoint)


# --------------------------------------------------------------------------------------------------
# Ctrl-C (SIGINT) during `gptforge train`, in-process: the same checkpoint at the next step as SIGTERM, exit 130;
# a second one stops at once ("interrupted", 130) and writes nothing
def signal_before_step(monkeypatch, step: int, *signums: int) -> None:
    """Send this process ``signums`` (in order) as training step ``step`` begins."""
    from gptforge.train.trainer import Trainer

    original = Trainer._train_step

    def train_step(self, lr, signals):
        if self.step + 1 == step:
            for signum in signums:
                os.kill(os.getpid(), signum)
        return original(self, lr, signals)

    monkeypatch.setattr(Trainer, "_train_step", train_step)


def test_ctrl_c_during_train_saves_at_the_next_step_says_where_and_resume_is_exact(make_config, tmp_path, capsys,
                                                                                 monkeypatch):
    common = dict(max_steps=6, checkpoint_interval=100, eval_interval=100)
    whole = pretrain(make_config(out_dir=str(tmp_path / "whole"), **common), progress=False)
    config = yaml_config(make_config(out_dir=str(tmp_path / "split"), **common), tmp_path / "split.yaml")
    previous = signal.getsignal(signal.SIGINT)
    with monkeypatch.context() as patch:
        signal_before_step(patch, 3, signal.SIGINT)
        code, out, err = run(capsys, "train", "--config", config, "-q")
    assert code == 128 + signal.SIGINT, err  # 130, as a shell reports Ctrl-C
    saved = tmp_path / "split/checkpoints/step-0000003"
    assert out == f"stopped by SIGINT at step 3; saved {saved}; resume with --resume\n"
    assert "interrupted" not in err and "Traceback" not in err
    assert ckpt.latest_checkpoint(tmp_path / "split") == saved
    assert signal.getsignal(signal.SIGINT) is previous

    code, out, err = run(capsys, "train", "--config", config, "-q", "--resume")
    assert code == 0, err
    assert train_losses(tmp_path / "split") == train_losses(tmp_path / "whole")
    assert same_weights(ckpt.latest_checkpoint(tmp_path / "split"), whole.checkpoint)


def test_a_second_ctrl_c_during_train_stops_at_once_and_writes_no_checkpoint(healthy_run, capsys, monkeypatch):
    out, config = healthy_run
    before = snapshot(out / "checkpoints")
    previous = signal.getsignal(signal.SIGINT)
    with monkeypatch.context() as patch:
        signal_before_step(patch, 6, signal.SIGINT, signal.SIGINT)
        code, stdout, err = run(capsys, "train", "--config", config, "--resume", "-q", "--train.max_steps=8")
    assert (code, stdout) == (130, "")
    assert err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err
    assert snapshot(out / "checkpoints") == before  # step 5 trained, nothing saved: latest is still step 4
    assert signal.getsignal(signal.SIGINT) is previous
