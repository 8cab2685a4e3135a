"""The training core that pretraining and fine-tuning share.

A :class:`Trainer` does what every run does the same way: the optimizer step over ``grad_accum_steps``
micro-batches under autocast (DDP syncing gradients on the last one only), GradScaler and gradient
clipping, the learning-rate schedule, the log / evaluation / checkpoint schedule and the time limit, the
progress bar and ``metrics.jsonl``, and the training state of a checkpoint with its exact restore (step,
data position, optimizer, grad scaler, every random state). What differs between runs is passed in:

- a :class:`BatchSource`: this process's micro-batches for each step, and its data position as JSON;
- ``loss_fn(model, batch)``: the mean loss of one micro-batch;
- ``evaluate()``: called on the evaluation schedule; True stops the run (early stopping);
- ``write_checkpoint(path, optimizer_state=..., trainer_state=...)``: writes the weights its own way;
- ``extra_state()``: the caller's own entries of ``trainer_state.json`` (read back from :meth:`Trainer.restore`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Union

import torch
from torch.nn.parallel import DistributedDataParallel

from .. import checkpoint as ckpt
from ..config import FinetuneConfig, TrainConfig
from ..fsutil import write_json_atomic
from ..runtime import autocast_dtype
from .distributed import DistContext, all_reduce_mean, barrier, broadcast_object, gather_objects
from .metrics import LOSS_CURVE_FILE, METRICS_FILE, TENSORBOARD_DIR, MetricsWriter, truncate_metrics
from .optim import build_optimizer
from .rng import get_rng_state, seed_everything, set_rng_state

log = logging.getLogger(__name__)

RUN_CONFIG_FILE = "config.json"

LossFn = Callable[[torch.nn.Module, Any], torch.Tensor]
"""``loss_fn(model, batch)``: the mean loss of one micro-batch (a 0-dim tensor)."""
WriteCheckpoint = Callable[..., Any]
"""``write_checkpoint(path, *, optimizer_state, trainer_state)``: writes one checkpoint folder."""


class BatchSource(Protocol):
    """Where a run's training batches come from, and how far into them it is."""

    def next_step(self) -> list[Any]:
        """This process's micro-batches for the next optimizer step (CPU tensors; the trainer moves them)."""

    def count_tokens(self, micro_batches: list[Any]) -> int:
        """The tokens one step's micro-batches count for in ``tokens_seen``."""

    def state_dict(self) -> dict[str, Any]:
        """The data position, JSON-ready: its entries go into ``trainer_state.json``."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from the position in a saved ``trainer_state.json``."""


@dataclass
class RunOutcome:
    """How :meth:`Trainer.run` ended."""

    train_loss: Optional[float]
    """The last logged training loss (mean over processes); None when no step ran."""
    stopped: bool
    """``evaluate()`` asked to stop (or the run was already stopped)."""
    out_of_time: bool
    """``max_minutes`` ran out."""


class Trainer:
    """Steps, checkpoints and restores one training run; see the module doc.

    ``ctx`` is the torch.distributed context of a run that may run under torchrun (its trainer state then
    holds one RNG state per process and the world size); None is a run that is always one process (its
    trainer state holds one RNG state). ``step_log_level`` is how loudly a logged step is reported when no
    progress bar shows it.
    """

    def __init__(self, model: torch.nn.Module, config: Union[TrainConfig, FinetuneConfig], *, device: torch.device,
                 batches: BatchSource, loss_fn: LossFn, lr_at: Callable[[int], float], max_steps: int,
                 evaluate: Callable[[], Optional[bool]], write_checkpoint: WriteCheckpoint,
                 extra_state: Callable[[], dict[str, Any]] = dict, ctx: Optional[DistContext] = None,
                 log_interval: int = 1, max_minutes: Optional[float] = None, compile: bool = False,
                 step_log_level: int = logging.INFO):
        self.model, self.config, self.device = model, config, device
        self.batches, self.loss_fn, self.lr_at, self.max_steps = batches, loss_fn, lr_at, max_steps
        self.evaluate, self.write_checkpoint, self.extra_state = evaluate, write_checkpoint, extra_state
        self.per_rank_state = ctx is not None
        self.ctx = ctx or DistContext()
        self.log_interval, self.max_minutes, self.step_log_level = log_interval, max_minutes, step_log_level
        self.out_dir = Path(config.out_dir)

        self.autocast_dtype, scaled = autocast_dtype(config.dtype, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=scaled)
        self.optimizer = build_optimizer(model, config, device.type)
        # Frozen weights have no gradient: clipping looks at the trained ones only.
        self.trainable = [p for p in model.parameters() if p.requires_grad]

        self.ddp: Optional[DistributedDataParallel] = None
        runner: torch.nn.Module = model
        if self.ctx.is_distributed:
            self.ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
            runner = self.ddp
        if compile:
            runner = torch.compile(runner)
        self.runner = runner

        self.step = self.tokens_seen = 0
        self.elapsed_before = 0.0
        self.train_time = 0.0
        """Seconds spent in optimizer steps by this process since it started (evaluations excluded)."""
        self.last_checkpoint: Optional[Path] = None
        self.metrics: Optional[MetricsWriter] = None
        self._t_start = time.monotonic()

    # ----------------------------------------------------------------------------------------------
    def restore(self, path: Path) -> dict[str, Any]:
        """Optimizer, counters, data position, grad scaler and every random state from a checkpoint's
        training files (its weights are the caller's to load); returns the trainer state, whose own
        entries (``extra_state``) the caller reads back."""
        self.optimizer.load_state_dict(torch.load(path / ckpt.OPTIMIZER_FILE, map_location=self.device,
                                                  weights_only=True))
        state = json.loads((path / ckpt.TRAINER_STATE_FILE).read_text(encoding="utf-8"))
        self.step, self.tokens_seen, self.elapsed_before = state["step"], state["tokens_seen"], state["elapsed_s"]
        self.batches.load_state_dict(state)
        if state.get("grad_scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["grad_scaler"])
        self._restore_rng(state)
        self.last_checkpoint = path
        return state

    def _restore_rng(self, state: dict[str, Any]) -> None:
        rng, ctx = state["rng"], self.ctx
        if not self.per_rank_state:
            set_rng_state(rng, self.device)
            return
        if state["world_size"] != ctx.world_size:
            log.warning("checkpoint was written by %d processes, resuming with %d: data order is kept only "
                        "if the global batch is the same, dropout streams are not", state["world_size"],
                        ctx.world_size)
        if ctx.rank < len(rng):
            set_rng_state(rng[ctx.rank], self.device)
        else:
            seed_everything(self.config.seed + ctx.rank + self.step)

    def start(self, run_config: dict[str, Any], *, resumed: bool) -> None:
        """Write ``out_dir/config.json`` and open the metrics (cut back to the restored step on resume);
        the clock of ``elapsed_s`` starts here."""
        if self.ctx.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.out_dir / RUN_CONFIG_FILE, run_config)
            if resumed:
                truncate_metrics(self.out_dir / METRICS_FILE, self.step)
            self.metrics = MetricsWriter(self.out_dir, tensorboard=self.config.tensorboard,
                                         purge_step=self.step + 1 if resumed else None)
        barrier(self.ctx)
        self._t_start = time.monotonic()

    @property
    def elapsed_s(self) -> float:
        """Wall-clock seconds of the run, over all its resumes."""
        return self.elapsed_before + time.monotonic() - self._t_start

    def record(self, record: dict[str, Any]) -> None:
        """Append a metrics record (on the main process)."""
        if self.metrics is not None:
            self.metrics.write(record)

    # ----------------------------------------------------------------------------------------------
    def run(self, *, stopped: bool = False, progress: bool = True) -> RunOutcome:
        """Train until ``max_steps``, until ``evaluate()`` says stop, or until ``max_minutes`` run out;
        evaluate and checkpoint on their schedules and at the end."""
        from tqdm.auto import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        config, ctx = self.config, self.ctx
        show_bar = progress and ctx.is_main
        bar = tqdm(total=self.max_steps, initial=self.step, unit="step", dynamic_ncols=True, file=sys.stderr,
                   disable=not show_bar)
        t_loop = time.monotonic()
        last_log = (t_loop, self.tokens_seen)
        train_loss: Optional[float] = None
        out_of_time = False
        try:
            with logging_redirect_tqdm() if show_bar else contextlib.nullcontext():
                while self.step < self.max_steps and not stopped:
                    lr = self.lr_at(self.step)
                    t0 = time.monotonic()
                    loss, tokens = self._train_step(lr)
                    self.step += 1
                    self.tokens_seen += tokens
                    due = self.step % self.log_interval == 0 or self.step == self.max_steps
                    # .item() waits for the device: only on logged steps, and inside the step's time.
                    loss_value = loss.item() if due else None
                    self.train_time += time.monotonic() - t0
                    bar.update(1)
                    now = time.monotonic()
                    if self.max_minutes is not None:  # every process must stop together
                        out_of_time = broadcast_object(now - t_loop >= self.max_minutes * 60, ctx)
                    last = self.step == self.max_steps or out_of_time

                    if due or last:
                        train_loss = all_reduce_mean(loss.item() if loss_value is None else loss_value,
                                                     ctx, self.device)
                        tok_s = (self.tokens_seen - last_log[1]) / max(now - last_log[0], 1e-9)
                        last_log = (now, self.tokens_seen)
                        self.record({"step": self.step, "train_loss": train_loss, "lr": lr, "tokens_per_s": tok_s,
                                     "elapsed_s": self.elapsed_before + now - self._t_start})
                        bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")
                        if not show_bar:
                            log.log(self.step_log_level, "step %d/%d: loss %.4f, lr %.2e, %.0f tok/s",
                                    self.step, self.max_steps, train_loss, lr, tok_s)
                    if self.step % config.eval_interval == 0 or last:
                        stopped = bool(self.evaluate())
                    if self.step % config.checkpoint_interval == 0 or last or stopped:
                        self.save_checkpoint()
                    if out_of_time:
                        log.info("train.max_minutes (%g) reached at step %d; stopping", self.max_minutes, self.step)
                        break
        finally:
            bar.close()
            if self.metrics is not None:
                self.metrics.close()
        return RunOutcome(train_loss=train_loss, stopped=stopped, out_of_time=out_of_time)

    def _train_step(self, lr: float) -> tuple[torch.Tensor, int]:
        """One optimizer step: (this process's mean micro-batch loss as a detached tensor, tokens)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        micro_batches = self.batches.next_step()
        tokens = self.batches.count_tokens(micro_batches)
        n = len(micro_batches)
        total = torch.zeros((), device=self.device)
        for i, batch in enumerate(micro_batches):
            batch = self._to_device(batch)
            # Gradients are all-reduced only on the last micro-batch; the others just accumulate.
            sync = self.ddp is None or i == n - 1
            with contextlib.nullcontext() if sync else self.ddp.no_sync():
                with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                                    enabled=self.autocast_dtype is not None):
                    loss = self.loss_fn(self.runner, batch) / n
                self.scaler.scale(loss).backward()
            total += loss.detach()
        if self.config.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.trainable, self.config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return total, tokens

    def _to_device(self, batch: Any) -> Any:
        if self.device.type != "cuda":
            return batch  # already on the CPU
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.pin_memory().to(self.device, non_blocking=True)
        if isinstance(batch, dict):
            return {k: move(v) for k, v in batch.items()}
        return type(batch)(move(t) for t in batch)

    def save_checkpoint(self) -> Path:
        """Write ``out_dir/checkpoints/step-N`` (on the main process), point ``latest`` at it, prune old ones."""
        # Every process contributes its random state (dropout streams differ per rank).
        rng_states = gather_objects(get_rng_state(self.device), self.ctx)
        name = f"step-{self.step:07d}"
        path = self.out_dir / ckpt.CHECKPOINTS_DIR / name
        if self.ctx.is_main:
            trainer_state = {"step": self.step, "tokens_seen": self.tokens_seen, "elapsed_s": self.elapsed_s,
                             **self.batches.state_dict(), **self.extra_state(),
                             "grad_scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None}
            if self.per_rank_state:
                trainer_state.update(world_size=self.ctx.world_size, rng=rng_states)
            else:
                trainer_state["rng"] = rng_states[0]
            self.write_checkpoint(path, optimizer_state=self.optimizer.state_dict(), trainer_state=trainer_state)
            ckpt.update_latest(self.out_dir, name)
            ckpt.prune_checkpoints(self.out_dir, self.config.keep_checkpoints)
        self.last_checkpoint = path
        barrier(self.ctx)
        return path


def holds_checkpoints(out_dir: Path) -> bool:
    """Whether ``out_dir/checkpoints`` holds a step checkpoint or a ``latest`` pointer."""
    root = out_dir / ckpt.CHECKPOINTS_DIR
    return root.is_dir() and any(p.name == ckpt.LATEST_POINTER or p.name.startswith("step-") for p in root.iterdir())


def clear_run_outputs(out_dir: Path, *files: str) -> None:
    """Delete what an earlier run in ``out_dir`` logged and plotted (metrics, loss curve, TensorBoard
    events) and ``files``: they belong to the run being replaced."""
    for name in (METRICS_FILE, LOSS_CURVE_FILE, *files):
        (out_dir / name).unlink(missing_ok=True)
    shutil.rmtree(out_dir / TENSORBOARD_DIR, ignore_errors=True)
