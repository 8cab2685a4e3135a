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

Faults it handles the same way for every run:

- a step whose loss or gradient norm is NaN or infinite is skipped (no weight update), logged and recorded
  in ``metrics.jsonl`` (``"skipped": true``); ``max_nonfinite_steps`` of them in a row stop the run with
  :class:`~gptforge.errors.TrainingDiverged`. Every process takes the same decision (one all-reduce of
  the flags per step). Checkpoints are never written from non-finite weights, and a periodic checkpoint
  is put off while the latest steps are being skipped, so ``latest`` stays on the last good one;
- with ``handle_signals``, SIGTERM / SIGINT save a checkpoint at the next step boundary and end the run
  (:attr:`RunOutcome.signal`); a second signal stops at once (:class:`~.signals.StopSignals`);
- a resume validates ``trainer_state.json`` and ``optimizer.pt`` (parsing, keys, tensor shapes against the
  parameters) before anything in the run folder is written, raising CheckpointError.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Collection, Optional, Protocol, Union

import torch
from torch.nn.parallel import DistributedDataParallel

from .. import checkpoint as ckpt
from ..config import FinetuneConfig, TrainConfig
from ..errors import CheckpointError, ConfigError, TrainingDiverged
from ..fsutil import write_json_atomic
from ..runtime import autocast_dtype
from ..weights import first_nonfinite
from .distributed import (DistContext, all_reduce_mean, barrier, broadcast_object, gather_objects,
                          max_over_processes)
from .metrics import LOSS_CURVE_FILE, METRICS_FILE, TENSORBOARD_DIR, MetricsWriter, truncate_metrics
from .optim import build_optimizer
from .rng import get_rng_state, seed_everything, set_rng_state
from .signals import StopSignals, signal_name

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
    signal: Optional[int] = None
    """The signal (SIGTERM, SIGINT) that stopped the run after a checkpoint; None when none did."""


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
        self.skipped_steps = 0
        """Steps skipped for a non-finite loss or gradient norm, over the whole run."""
        self.nonfinite_in_a_row = 0
        """Consecutive skipped steps up to the current one (0 after a good step)."""

    # ----------------------------------------------------------------------------------------------
    def restore(self, path: Path) -> dict[str, Any]:
        """Optimizer, counters, data position, grad scaler and every random state from a checkpoint's
        training files (its weights are the caller's to load); returns the trainer state, whose own
        entries (``extra_state``) the caller reads back.

        Everything is validated first (CheckpointError for a damaged or foreign file, or an optimizer state
        that does not fit the parameters); nothing on disk is touched."""
        state = read_trainer_state(path, per_rank=self.per_rank_state)
        optimizer_state = _load_optimizer_state(path, self.device)
        self._check_optimizer_state(optimizer_state, path)
        damaged = f"checkpoint {path}: {ckpt.TRAINER_STATE_FILE} is damaged or was not written by this kind of run"
        try:
            self.optimizer.load_state_dict(optimizer_state)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"checkpoint {path}: {ckpt.OPTIMIZER_FILE} does not fit this run's optimizer "
                                  f"({exc})") from None
        self.step, self.tokens_seen, self.elapsed_before = state["step"], state["tokens_seen"], state["elapsed_s"]
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.nonfinite_in_a_row = int(state.get("nonfinite_in_a_row", 0))
        try:
            self.batches.load_state_dict(state)
            if state.get("grad_scaler") and self.scaler.is_enabled():
                self.scaler.load_state_dict(state["grad_scaler"])
            self._restore_rng(state)
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
            raise CheckpointError(f"{damaged} (its data position, grad scaler or random states: "
                                  f"{type(exc).__name__}: {exc})") from None
        self.last_checkpoint = path
        return state

    def _check_optimizer_state(self, saved: Any, path: Path) -> None:
        """CheckpointError unless ``saved`` is an AdamW state for exactly these parameters (groups, counts,
        and the shape of every per-parameter tensor)."""
        where = f"checkpoint {path}: {ckpt.OPTIMIZER_FILE}"
        if not (isinstance(saved, dict) and isinstance(saved.get("state"), dict)
                and isinstance(saved.get("param_groups"), list)):
            raise CheckpointError(f"{where} is not an optimizer state (no 'state' and 'param_groups')")
        groups = self.optimizer.param_groups
        if len(saved["param_groups"]) != len(groups):
            raise CheckpointError(f"{where} holds {len(saved['param_groups'])} parameter groups, this run's "
                                  f"optimizer has {len(groups)}; was it written for another model or strategy?")
        for i, (saved_group, group) in enumerate(zip(saved["param_groups"], groups)):
            ids = saved_group.get("params") if isinstance(saved_group, dict) else None
            if not isinstance(ids, list) or len(ids) != len(group["params"]):
                n = len(ids) if isinstance(ids, list) else "no"
                raise CheckpointError(f"{where} holds {n} parameters in group {i}, the model being trained has "
                                      f"{len(group['params'])}; was it written for another model or strategy?")
            for pid, param in zip(ids, group["params"]):
                entry = saved["state"].get(pid, {})
                if not isinstance(entry, dict):
                    raise CheckpointError(f"{where} is damaged (the state of parameter {pid} is not a dict)")
                for name, value in entry.items():
                    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
                        raise CheckpointError(
                            f"{where} does not fit the model: its {name!r} has shape {tuple(value.shape)} for a "
                            f"parameter of shape {tuple(param.shape)}; was it written for another model?")

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
    def run(self, *, stopped: bool = False, progress: bool = True, handle_signals: bool = False) -> RunOutcome:
        """Train until ``max_steps``, until ``evaluate()`` says stop, or until ``max_minutes`` run out;
        evaluate and checkpoint on their schedules and at the end.

        ``handle_signals``: while training, SIGTERM / SIGINT save a checkpoint at the next step boundary and
        end the run (``RunOutcome.signal``); a second one raises KeyboardInterrupt at once. Raises
        TrainingDiverged after ``max_nonfinite_steps`` skipped steps in a row."""
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
        stop_signal: Optional[int] = None
        try:
            with logging_redirect_tqdm() if show_bar else contextlib.nullcontext(), \
                    StopSignals(handle_signals) as signals:
                while self.step < self.max_steps and not stopped:
                    lr = self.lr_at(self.step)
                    t0 = time.monotonic()
                    loss, tokens, fault, stop_signal = self._train_step(lr, signals)
                    self.step += 1
                    self.tokens_seen += tokens
                    due = self.step % self.log_interval == 0 or self.step == self.max_steps
                    loss_value = loss if fault is None else None
                    self.train_time += time.monotonic() - t0
                    bar.update(1)
                    now = time.monotonic()
                    if self.max_minutes is not None:  # every process must stop together
                        out_of_time = broadcast_object(now - t_loop >= self.max_minutes * 60, ctx)
                    last = self.step == self.max_steps or out_of_time
                    if fault is not None:
                        self._skipped(lr, fault)
                    else:
                        self.nonfinite_in_a_row = 0
                    if fault is None and (due or last or stop_signal is not None):
                        train_loss = all_reduce_mean(loss_value, ctx, self.device)
                        tok_s = (self.tokens_seen - last_log[1]) / max(now - last_log[0], 1e-9)
                        last_log = (now, self.tokens_seen)
                        self.record({"step": self.step, "train_loss": train_loss, "lr": lr, "tokens_per_s": tok_s,
                                     "elapsed_s": self.elapsed_before + now - self._t_start})
                        bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")
                        if not show_bar:
                            log.log(self.step_log_level, "step %d/%d: loss %.4f, lr %.2e, %.0f tok/s",
                                    self.step, self.max_steps, train_loss, lr, tok_s)
                    if stop_signal is not None:  # no evaluation: a stop is asked to be quick
                        log.warning("%s received: saving a checkpoint at step %d, then stopping (a second signal "
                                    "stops at once, without one)", signal_name(stop_signal), self.step)
                        path = self.save_checkpoint()
                        log.warning("stopped by %s at step %d; saved %s", signal_name(stop_signal), self.step, path)
                        break
                    if self.step % config.eval_interval == 0 or last:
                        stopped = bool(self.evaluate())
                    if last or stopped:
                        self.save_checkpoint()
                    elif self.step % config.checkpoint_interval == 0:
                        if self.nonfinite_in_a_row:  # keep `latest` on a step the run was still sound at
                            log.warning("step %d: checkpoint put off, the last %d step(s) were skipped", self.step,
                                        self.nonfinite_in_a_row)
                        else:
                            self.save_checkpoint()
                    if out_of_time:
                        log.info("train.max_minutes (%g) reached at step %d; stopping", self.max_minutes, self.step)
                        break
        finally:
            bar.close()
            if self.metrics is not None:
                self.metrics.close()
        return RunOutcome(train_loss=train_loss, stopped=stopped, out_of_time=out_of_time, signal=stop_signal)

    def _skipped(self, lr: float, fault: dict[str, float]) -> None:
        """Count, log and record a step skipped for a non-finite loss or gradient norm; raise
        TrainingDiverged when there have been ``max_nonfinite_steps`` in a row."""
        self.skipped_steps += 1
        self.nonfinite_in_a_row += 1
        limit = self.config.max_nonfinite_steps
        what = _describe_fault(fault)
        log.warning("step %d: %s; update skipped (%d in a row, %s stops the run)", self.step, what,
                    self.nonfinite_in_a_row, limit)
        self.record({"step": self.step, "skipped": True, "train_loss": fault["loss"], "grad_norm": fault["grad_norm"],
                     "lr": lr, "skipped_steps": self.skipped_steps})
        if self.nonfinite_in_a_row >= limit:
            raise TrainingDiverged(
                f"training diverged: {limit} steps in a row had a non-finite loss or gradient norm (step "
                f"{self.step}: {what}; {self._flag('max_nonfinite_steps')}={limit}); {self._kept()}; resume from it "
                f"with a lower learning "
                f"rate ({self._flag('learning_rate')}=... {self._flag('allow_resume_changes')}=true) or "
                f"stronger clipping ({self._flag('grad_clip')})")

    def nonfinite_evaluation(self, name: str, value: Any) -> TrainingDiverged:
        """The error for a validation metric that came out NaN or infinite (the caller raises it)."""
        return TrainingDiverged(
            f"training diverged: validation {name} is {value} at step {self.step}; {self._kept()}; resume from it "
            f"with a lower learning rate ({self._flag('learning_rate')}=... "
            f"{self._flag('allow_resume_changes')}=true)")

    def _kept(self) -> str:
        kept = ckpt.latest_checkpoint(self.out_dir) if self.ctx.is_main else self.last_checkpoint
        if kept is None:
            return "no checkpoint was saved"
        return f"nothing more was saved, and {kept} is still the latest checkpoint"

    def _flag(self, name: str) -> str:
        return f"--train.{name}" if isinstance(self.config, TrainConfig) else f"--{name}"

    def _train_step(self, lr: float, signals: StopSignals
                    ) -> tuple[float, int, Optional[dict[str, float]], Optional[int]]:
        """One optimizer step: (this process's mean micro-batch loss, tokens, the fault that made every process
        skip the update or None, the signal that some process received or None).

        The loss and gradient norm are read back every step (one wait for the device), and one all-reduce
        makes every process agree on skipping and on stopping."""
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
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
        if self.config.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.config.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.trainable if p.grad is not None])
        loss_value, norm_value = torch.stack([total.float(), norm.float().to(total.device)]).tolist()
        # An infinite gradient under fp16 loss scaling is the scaler's business (it skips and lowers the scale).
        bad = not math.isfinite(loss_value) or (not self.scaler.is_enabled() and not math.isfinite(norm_value))
        # A signal that came during this step (it is read now) ends the run after it.
        any_bad, any_signal = max_over_processes([float(bad), float(signals.signum or 0)], self.ctx, self.device)
        fault = None
        if any_bad:
            # Gradient norms agree after the all-reduce; losses do not: report the mean (NaN if any is).
            fault = {"loss": all_reduce_mean(loss_value, self.ctx, self.device), "grad_norm": norm_value}
        else:
            self.scaler.step(self.optimizer)
        if self.scaler.is_enabled():
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value, tokens, fault, int(any_signal) or None

    def _to_device(self, batch: Any) -> Any:
        if self.device.type != "cuda":
            return batch  # already on the CPU
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.pin_memory().to(self.device, non_blocking=True)
        if isinstance(batch, dict):
            return {k: move(v) for k, v in batch.items()}
        return type(batch)(move(t) for t in batch)

    def release_process_group(self) -> None:
        """Drop the DistributedDataParallel wrapper, the one holder of the process group besides torch itself.

        Call it when training is over and before ``destroy_process_group``: the wrapper sits in a reference
        cycle (the run's callbacks point back at their owner), so without this it lives until the garbage
        collector or interpreter exit, and the group it holds is torn down there instead, where gloo's
        threads can abort the process ("terminate called without an active exception").
        """
        if self.ddp is not None:
            self.ddp = None
            self.runner = self.model

    def save_checkpoint(self) -> Path:
        """Write ``out_dir/checkpoints/step-N`` (on the main process), point ``latest`` at it, prune old ones.

        Weights holding a NaN or an infinity are never written: TrainingDiverged, and ``latest`` and the
        older checkpoints stay as they are (every process sees the same weights, so all raise alike)."""
        bad = first_nonfinite(self.model.state_dict())
        if bad is not None:
            raise TrainingDiverged(
                f"training diverged: the weights hold non-finite values ({bad}) at step {self.step}, so no "
                f"checkpoint was written; {self._kept()}; resume from it with a lower learning rate "
                f"({self._flag('learning_rate')}=... {self._flag('allow_resume_changes')}=true)")
        # Every process contributes its random state (dropout streams differ per rank).
        rng_states = gather_objects(get_rng_state(self.device), self.ctx)
        name = f"step-{self.step:07d}"
        path = self.out_dir / ckpt.CHECKPOINTS_DIR / name
        if self.ctx.is_main:
            trainer_state = {"step": self.step, "tokens_seen": self.tokens_seen, "elapsed_s": self.elapsed_s,
                             "skipped_steps": self.skipped_steps, "nonfinite_in_a_row": self.nonfinite_in_a_row,
                             **self.batches.state_dict(), **self.extra_state(),
                             "grad_scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None}
            if self.per_rank_state:
                trainer_state.update(world_size=self.ctx.world_size, rng=rng_states)
            else:
                trainer_state["rng"] = rng_states[0]
            # latest moves, and older checkpoints are pruned, only once this one is written.
            self.write_checkpoint(path, optimizer_state=self.optimizer.state_dict(), trainer_state=trainer_state)
            ckpt.update_latest(self.out_dir, name)
            ckpt.prune_checkpoints(self.out_dir, self.config.keep_checkpoints, protect=(name,))
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


def _describe_fault(fault: dict[str, float]) -> str:
    loss, norm = fault["loss"], fault["grad_norm"]
    if not math.isfinite(loss):
        return f"non-finite loss ({loss})"
    return f"non-finite gradient norm ({norm}) at loss {loss:.4f}"


def read_trainer_state(path: Path, *, per_rank: bool = True) -> dict[str, Any]:
    """The ``trainer_state.json`` of checkpoint ``path``, checked for the entries every run restores (step,
    counters, random states); CheckpointError, naming the file, for a damaged or foreign one."""
    file = path / ckpt.TRAINER_STATE_FILE
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {file} ({type(exc).__name__}: {exc}); resume from an earlier "
                              f"checkpoint or start afresh") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file} is not a trainer state (not a JSON object)")
    checks = {"step": _is_count, "tokens_seen": _is_count,
              "elapsed_s": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
              "rng": (lambda v: isinstance(v, list) and all(isinstance(r, dict) for r in v)) if per_rank
              else (lambda v: isinstance(v, dict)),
              "schedule_steps": lambda v: v is None or (_is_count(v) and v > 0)}
    if per_rank:
        checks["world_size"] = lambda v: _is_count(v) and v > 0
    for key, ok in checks.items():
        if key == "schedule_steps" and key not in state:
            continue  # written since the schedule's length is fixed at the run's start
        if key not in state:
            raise CheckpointError(f"{file} has no {key!r} entry: it is damaged or was not written by this kind of "
                                  f"run; resume from an earlier checkpoint or start afresh")
        if not ok(state[key]):
            raise CheckpointError(f"{file} has an invalid {key!r} entry ({str(state[key])[:40]!r}): it is damaged; "
                                  f"resume from an earlier checkpoint or start afresh")
    return state


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _load_optimizer_state(path: Path, device: torch.device) -> Any:
    file = path / ckpt.OPTIMIZER_FILE
    try:
        return torch.load(file, map_location=device, weights_only=True)
    except Exception as exc:  # a truncated zip, a foreign pickle, a missing file: all mean "cannot resume"
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"cannot read {file} ({reason[:200]}); resume from an earlier checkpoint or "
                              f"start afresh") from None


def check_resume_changes(saved: dict[str, Any], now: dict[str, Any], *, free: Collection[str], allow: bool,
                         flag: str, run_dir: Path) -> list[tuple[str, Any, Any]]:
    """The settings of ``now`` (a config section as a dict) that differ from the ``saved`` one a resumed run
    was started with, leaving out the ``free`` ones (where it stops, how often it evaluates, ...).

    ConfigError listing them unless ``allow`` (the ``flag`` option); with it, a warning lists them."""
    changes = [(k, saved[k], v) for k, v in now.items() if k in saved and k not in free and not same_setting(saved[k], v)]
    if not changes:
        return []
    listed = ", ".join(f"{k} ({old!r} -> {new!r})" for k, old, new in changes)
    if not allow:
        raise ConfigError(f"--resume would change {listed} from what the run in {run_dir} was started with; "
                          f"leave them as they were to continue it exactly, or add {flag}=true to change them "
                          f"on purpose")
    log.warning("resuming %s with changed settings (%s): %s", run_dir, flag, listed)
    return changes


def same_setting(saved: Any, now: Any) -> bool:
    """Equal values, or two spellings of the same local path."""
    if saved == now:
        return True
    if isinstance(saved, str) and isinstance(now, str) and saved and now and Path(saved).exists() and Path(now).exists():
        return Path(saved).resolve() == Path(now).resolve()
    return False
