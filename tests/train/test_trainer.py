"""The training core on a toy model and a toy batch source: exact restore, early stop, the trainer state."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import pytest
import torch
from torch import nn

from gptforge import checkpoint as ckpt
from gptforge.config import TrainConfig
from gptforge.tokenizer import CharTokenizer
from gptforge.train import Trainer
from gptforge.train.distributed import DistContext
from gptforge.train.metrics import read_metrics
from gptforge.train.rng import seed_everything

pytestmark = pytest.mark.integration


class CountingBatches:
    """Regression batches drawn from a seeded generator: the generator's state is the data position."""

    def __init__(self, micro_batches: int):
        self.micro_batches = micro_batches
        self.generator = torch.Generator().manual_seed(7)

    def next_step(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = []
        for _ in range(self.micro_batches):
            x = torch.randn(4, 3, generator=self.generator)
            out.append((x, x.sum(dim=1, keepdim=True)))
        return out

    def count_tokens(self, micro_batches) -> int:
        return sum(len(x) for x, _ in micro_batches)

    def state_dict(self) -> dict[str, Any]:
        return {"draws": self.generator.get_state().tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(torch.tensor(state["draws"], dtype=torch.uint8))


def mse(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def make_trainer(out: Path, max_steps: int, *, ctx: Optional[DistContext] = None, stop_at: Optional[int] = None,
                 resume: bool = False) -> Trainer:
    seed_everything(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.3), nn.Linear(8, 1))
    config = TrainConfig(out_dir=str(out), max_steps=12, eval_interval=2, checkpoint_interval=3, keep_checkpoints=2,
                         learning_rate=1e-2, warmup_steps=0, grad_clip=0.5, tensorboard=False, device="cpu")
    tokenizer = CharTokenizer(list("ab"))
    trainer: Trainer

    def evaluate() -> bool:
        trainer.record({"step": trainer.step, "val_loss": 0.0})
        return stop_at is not None and trainer.step >= stop_at

    def write(path: Path, **state: Any) -> None:
        ckpt.save_checkpoint(path, model, tokenizer, {}, **state)

    trainer = Trainer(model, config, device=torch.device("cpu"), batches=CountingBatches(micro_batches=2),
                      loss_fn=mse, lr_at=lambda step: 1e-2, max_steps=max_steps, evaluate=evaluate,
                      write_checkpoint=write, extra_state=lambda: {"mine": trainer.step * 10}, ctx=ctx)
    latest = ckpt.latest_checkpoint(out) if resume else None
    if latest is not None:
        model.load_state_dict(ckpt.load_state_dict(latest / ckpt.MODEL_FILE))  # the weights are the caller's
        assert trainer.restore(latest)["mine"] == trainer.step * 10  # the caller's own entries come back
    else:
        seed_everything(1)
    trainer.start({"toy": True}, resumed=latest is not None)
    return trainer


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["train_loss"] for r in read_metrics(out / "metrics.jsonl") if "train_loss" in r}


def test_a_restored_run_continues_bit_for_bit(tmp_path):
    straight = make_trainer(tmp_path / "straight", 9)
    straight.run(progress=False)
    make_trainer(tmp_path / "split", 6).run(progress=False)
    resumed = make_trainer(tmp_path / "split", 9, resume=True)
    assert resumed.step == 6 and resumed.tokens_seen == 6 * 2 * 4
    outcome = resumed.run(progress=False)

    assert losses(tmp_path / "split") == losses(tmp_path / "straight") and len(losses(tmp_path / "straight")) == 9
    assert outcome.train_loss == losses(tmp_path / "straight")[9] and not outcome.stopped
    a = ckpt.load_state_dict(straight.last_checkpoint / ckpt.MODEL_FILE)
    b = ckpt.load_state_dict(resumed.last_checkpoint / ckpt.MODEL_FILE)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in (tmp_path / "split/checkpoints").glob("step-*")) == ["step-0000006", "step-0000009"]


def test_evaluate_may_stop_the_run_with_a_checkpoint(tmp_path):
    outcome = make_trainer(tmp_path / "run", 12, stop_at=4).run(progress=False)
    assert outcome.stopped and ckpt.latest_checkpoint(tmp_path / "run").name == "step-0000004"
    already = make_trainer(tmp_path / "run", 12, resume=True).run(stopped=True, progress=False)
    assert already.stopped and already.train_loss is None  # a stopped run takes no more steps


@pytest.mark.parametrize("ctx", [None, DistContext()])
def test_the_trainer_state_holds_one_rng_state_or_one_per_process(tmp_path, ctx):
    trainer = make_trainer(tmp_path / "run", 3, ctx=ctx)
    trainer.run(progress=False)
    state = json.loads((trainer.last_checkpoint / ckpt.TRAINER_STATE_FILE).read_text())
    assert {"step", "tokens_seen", "elapsed_s", "draws", "mine", "grad_scaler", "rng"} <= set(state)
    if ctx is None:  # a run that is always one process (fine-tuning)
        assert "world_size" not in state and set(state["rng"]) == {"python", "numpy", "torch", "cuda"}
    else:
        assert state["world_size"] == 1 and len(state["rng"]) == 1
