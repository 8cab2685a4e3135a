"""Faults during training: non-finite steps, non-finite weights, signals, and strict-JSON metrics (the
training core on a toy model; pretraining's own cases are in test_pretrain_faults.py)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import torch
from torch import nn

from gptforge import checkpoint as ckpt
from gptforge.config import TrainConfig
from gptforge.errors import TrainingDiverged
from gptforge.tokenizer import CharTokenizer
from gptforge.train import Trainer
from gptforge.train.metrics import MetricsWriter, read_metrics, truncate_metrics
from gptforge.train.rng import seed_everything
from gptforge.train.signals import StopSignals
from tests.train.test_trainer import CountingBatches, mse

pytestmark = pytest.mark.integration


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path → sha256 of its bytes)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def strict_records(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl parsed as strict JSON (NaN / Infinity literals fail)."""
    def refuse(name: str):
        raise AssertionError(f"non-JSON constant {name} in {path}")
    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def toy_trainer(out: Path, max_steps: int, *, loss_fn: Optional[Callable] = None, resume: bool = False,
                **config: Any) -> Trainer:
    """The toy regression run of test_trainer, with a replaceable loss and config keys."""
    seed_everything(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.3), nn.Linear(8, 1))
    values = dict(out_dir=str(out), max_steps=12, eval_interval=100, checkpoint_interval=2, keep_checkpoints=2,
                  learning_rate=1e-2, warmup_steps=0, grad_clip=0.5, tensorboard=False, device="cpu")
    values.update(config)
    tokenizer = CharTokenizer(list("ab"))

    def write(path: Path, **state: Any) -> None:
        ckpt.save_checkpoint(path, model, tokenizer, {}, **state)

    trainer = Trainer(model, TrainConfig(**values), device=torch.device("cpu"),
                      batches=CountingBatches(micro_batches=2), loss_fn=loss_fn or mse, lr_at=lambda step: 1e-2,
                      max_steps=max_steps, evaluate=lambda: False, write_checkpoint=write)
    latest = ckpt.latest_checkpoint(out) if resume else None
    if latest is not None:
        model.load_state_dict(ckpt.load_state_dict(latest / ckpt.MODEL_FILE))
        trainer.restore(latest)
    else:
        seed_everything(1)
    trainer.start({"toy": True}, resumed=latest is not None)
    return trainer


def weights_now(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


# --------------------------------------------------------------------------------------------------
# Non-finite steps
def test_a_non_finite_loss_skips_the_update_and_the_run_goes_on(tmp_path):
    seen: dict[int, dict[str, torch.Tensor]] = {}
    trainer: Trainer

    def loss_at_step_3_is_nan(model, batch):
        seen.setdefault(trainer.step + 1, weights_now(trainer))  # weights as the step starts
        loss = mse(model, batch)
        return loss * float("nan") if trainer.step + 1 == 3 else loss

    trainer = toy_trainer(tmp_path / "run", 6, loss_fn=loss_at_step_3_is_nan)
    outcome = trainer.run(progress=False)

    assert trainer.step == 6 and trainer.skipped_steps == 1 and trainer.nonfinite_in_a_row == 0
    assert all(torch.equal(seen[3][k], seen[4][k]) for k in seen[3])  # step 3 changed no weight
    assert any(not torch.equal(seen[2][k], seen[3][k]) for k in seen[2])  # ... while step 2 did
    assert outcome.train_loss is not None and math.isfinite(outcome.train_loss)
    records = strict_records(tmp_path / "run/metrics.jsonl")
    skipped = [r for r in records if r.get("skipped")]
    assert skipped == [{"step": 3, "skipped": True, "train_loss": None, "grad_norm": None, "lr": 1e-2,
                        "skipped_steps": 1}]
    assert [r["step"] for r in records if r.get("train_loss") is not None] == [1, 2, 4, 5, 6]
    state = json.loads((trainer.last_checkpoint / ckpt.TRAINER_STATE_FILE).read_text())
    assert state["skipped_steps"] == 1 and state["nonfinite_in_a_row"] == 0


def test_an_infinite_gradient_norm_skips_the_update(tmp_path, caplog):
    trainer: Trainer

    def infinite_gradient_at_step_2(g: torch.Tensor) -> torch.Tensor:
        return torch.full_like(g, float("inf")) if trainer.step + 1 == 2 else g

    trainer = toy_trainer(tmp_path / "run", 3, grad_clip=0.0)
    trainer.model[0].weight.register_hook(infinite_gradient_at_step_2)
    trainer.run(progress=False)
    assert trainer.skipped_steps == 1
    assert "step 2: non-finite gradient norm (inf) at loss" in caplog.text
    (skipped,) = [r for r in strict_records(tmp_path / "run/metrics.jsonl") if r.get("skipped")]
    assert skipped["step"] == 2 and skipped["grad_norm"] is None and math.isfinite(skipped["train_loss"])


def test_too_many_non_finite_steps_in_a_row_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path):
    trainer: Trainer

    def nan_from_step_3(model, batch):
        loss = mse(model, batch)
        return loss * float("nan") if trainer.step + 1 >= 3 else loss

    out = tmp_path / "run"
    trainer = toy_trainer(out, 12, loss_fn=nan_from_step_3, max_nonfinite_steps=3)
    with pytest.raises(TrainingDiverged) as err:
        trainer.run(progress=False)
    message = str(err.value)
    assert message.startswith("training diverged: 3 steps in a row had a non-finite loss or gradient norm "
                              "(step 5: non-finite loss (nan); --train.max_nonfinite_steps=3)")
    assert f"{out / 'checkpoints/step-0000002'} is still the latest checkpoint" in message
    assert "lower learning rate (--train.learning_rate=" in message and "\n" not in message
    # step 4's periodic checkpoint was put off: latest stays on the last step that trained soundly
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-0000002"]
    assert ckpt.latest_checkpoint(out).name == "step-0000002"
    assert [r["step"] for r in strict_records(out / "metrics.jsonl") if r.get("skipped")] == [3, 4, 5]


def test_non_finite_weights_are_never_saved_and_latest_does_not_move(tmp_path):
    out = tmp_path / "run"
    trainer = toy_trainer(out, 2)
    trainer.run(progress=False)
    before = snapshot(out / "checkpoints")
    with torch.no_grad():
        trainer.model[2].bias.fill_(float("inf"))
    trainer.step = 3
    with pytest.raises(TrainingDiverged, match=r"the weights hold non-finite values \(2\.bias\) at step 3, so no "
                                               r"checkpoint was written; nothing more was saved, and .*step-0000002 "
                                               r"is still the latest checkpoint"):
        trainer.save_checkpoint()
    assert snapshot(out / "checkpoints") == before


def test_metrics_are_strict_json(tmp_path):
    writer = MetricsWriter(tmp_path, tensorboard=True)
    writer.write({"step": 1, "train_loss": float("nan"), "val_ppl": float("inf"), "skipped": True})
    writer.write({"step": 2, "train_loss": 1.5})
    writer.close()
    assert strict_records(tmp_path / "metrics.jsonl")[0] == {"step": 1, "train_loss": None, "val_ppl": None,
                                                              "skipped": True}
    # A file an older gptforge wrote with NaN literals is cleaned when a resume truncates it.
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train_loss": NaN}\n{"step": 3, "train_loss": 1.0}\n')
    truncate_metrics(tmp_path / "metrics.jsonl", 2)
    assert strict_records(tmp_path / "metrics.jsonl") == [{"step": 1, "train_loss": None}]
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "train_loss": None}]


# --------------------------------------------------------------------------------------------------
# Signals
def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["train_loss"] for r in read_metrics(out / "metrics.jsonl") if "train_loss" in r}


def signal_at(steps: dict[int, int]) -> Callable:
    """A loss that sends this process ``steps[n]`` while step n runs (its backward pass still to come)."""
    def loss_fn(model, batch):
        trainer = loss_fn.trainer
        n = trainer.step + 1
        if n in steps and not loss_fn.sent.get(n):
            loss_fn.sent[n] = True
            os.kill(os.getpid(), steps[n])
        return mse(model, batch)
    loss_fn.sent = {}
    return loss_fn


def test_sigterm_saves_at_the_step_boundary_and_resume_is_exact(tmp_path):
    previous = signal.getsignal(signal.SIGTERM)
    straight = toy_trainer(tmp_path / "straight", 9, checkpoint_interval=100)
    straight.run(progress=False)

    loss_fn = signal_at({4: signal.SIGTERM})
    stopped = loss_fn.trainer = toy_trainer(tmp_path / "split", 9, loss_fn=loss_fn, checkpoint_interval=100)
    outcome = stopped.run(progress=False, handle_signals=True)
    assert outcome.signal == signal.SIGTERM and stopped.step == 4
    assert ckpt.latest_checkpoint(tmp_path / "split").name == "step-0000004"
    assert signal.getsignal(signal.SIGTERM) is previous  # the handler lasted as long as the run

    resumed = toy_trainer(tmp_path / "split", 9, resume=True, checkpoint_interval=100)
    assert resumed.step == 4
    resumed.run(progress=False)
    assert losses(tmp_path / "split") == losses(tmp_path / "straight") and len(losses(tmp_path / "split")) == 9
    a = ckpt.load_state_dict(straight.last_checkpoint / ckpt.MODEL_FILE)
    b = ckpt.load_state_dict(resumed.last_checkpoint / ckpt.MODEL_FILE)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_signal_stops_at_once_without_a_checkpoint(tmp_path):
    previous = signal.getsignal(signal.SIGINT)
    loss_fn = signal_at({2: signal.SIGINT})
    trainer = loss_fn.trainer = toy_trainer(tmp_path / "run", 9, loss_fn=loss_fn, checkpoint_interval=100)

    def twice(model, batch):
        loss = loss_fn(model, batch)
        if trainer.step + 1 == 2:
            os.kill(os.getpid(), signal.SIGINT)  # the second one, while step 2 still runs
        return loss

    trainer.loss_fn = twice
    with pytest.raises(KeyboardInterrupt):
        trainer.run(progress=False, handle_signals=True)
    assert trainer.step == 1 and not (tmp_path / "run/checkpoints").exists()
    assert signal.getsignal(signal.SIGINT) is previous


def test_stop_signals_install_nothing_when_disabled_or_off_the_main_thread():
    import threading

    previous = signal.getsignal(signal.SIGTERM)
    with StopSignals(enabled=False):
        assert signal.getsignal(signal.SIGTERM) is previous
    with StopSignals() as stop:
        assert signal.getsignal(signal.SIGTERM) == stop._handle
    assert signal.getsignal(signal.SIGTERM) is previous
    seen = []
    thread = threading.Thread(target=lambda: seen.append(StopSignals().__enter__()._previous))
    thread.start()
    thread.join(timeout=30)
    assert seen == [{}]
