"""The pretraining loop: one process or many (torchrun), exact resume from the latest checkpoint.

A step draws the global batch (see :mod:`.batches`), runs ``grad_accum_steps`` forward/backward passes
under autocast, clips, and takes one AdamW step with the scheduled learning rate. Every checkpoint
holds the weights, the optimizer state and a trainer state with the step and every random-number
state (Python, NumPy, torch, CUDA, the batch generator), so a resumed run continues bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from .. import checkpoint as ckpt
from ..config import ModelConfig, RunConfig
from ..data.tokens import TokenData
from ..errors import ConfigError
from ..fsutil import write_json_atomic
from ..evaluate.lm import evaluate_lm, lm_loss
from ..model import GPT
from ..runtime import autocast_dtype
from ..tokenizer import load_tokenizer
from .batches import BatchSampler
from .distributed import (DistContext, all_reduce_mean, barrier, broadcast_object, cleanup_distributed,
                          gather_objects, init_distributed)
from .metrics import LOSS_CURVE_FILE, METRICS_FILE, TENSORBOARD_DIR, MetricsWriter, plot_loss_curve, truncate_metrics
from .optim import build_optimizer, schedule_for
from .rng import decode_tensor, encode_tensor, get_rng_state, set_rng_state

log = logging.getLogger(__name__)

RUN_CONFIG_FILE = "config.json"


@dataclass
class TrainResult:
    """What a finished (or time-limited) run reached."""

    steps: int
    train_loss: Optional[float]
    val_loss: Optional[float]
    val_ppl: Optional[float]
    val_bpb: Optional[float]
    checkpoint: Path
    out_dir: Path
    tokens_seen: int
    elapsed_s: float


def pretrain(config: RunConfig, *, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train ``config.model`` on the prepared data in ``config.data.dir``; checkpoint into ``config.train.out_dir``.

    With ``resume`` the run continues exactly from the latest complete checkpoint in out_dir (up to
    ``config.train.max_steps``, which may have been raised). Under ``torchrun`` every process calls
    this; only rank 0 writes files and shows progress.
    """
    config.validate()
    ctx, device = init_distributed(config.train.device)
    try:
        return _Run(config, ctx, device, resume=resume, progress=progress).train()
    finally:
        cleanup_distributed(ctx)


# --------------------------------------------------------------------------------------------------
class _Run:
    """The state of one pretraining run; ``__init__`` sets everything up, :meth:`train` loops."""

    def __init__(self, config: RunConfig, ctx: DistContext, device: torch.device, *, resume: bool, progress: bool):
        tc = config.train
        self.tc, self.ctx, self.device, self.progress = tc, ctx, device, progress
        self.out_dir = Path(tc.out_dir)

        self.data = TokenData(config.data.dir)
        self.tokenizer = self.data.tokenizer
        self.model_config = _resolve_model_config(config.model, self.data.vocab_size, config.data.dir)
        block = self.model_config.block_size
        for split in ("train", "val"):
            self.data.require_tokens(split, block + 1)  # one window of inputs plus its shifted targets
        self.config_dict = config.to_dict()
        self.config_dict["model"] = dataclasses.asdict(self.model_config)

        resume_from = self._prepare_out_dir(resume)

        self.autocast_dtype, scaled = autocast_dtype(tc.dtype, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=scaled)

        # Identical initial weights on every process (DDP would broadcast rank 0's anyway).
        _seed_everything(tc.seed)
        if resume_from is None:
            model = GPT(self.model_config).to(device)
        else:
            state = ckpt.load_state_dict(resume_from / ckpt.MODEL_FILE, device="cpu")
            model = ckpt.build_model(self.model_config, state, device=device)
        model.train()
        self.model = model
        self.optimizer = build_optimizer(model, tc, device.type)
        self.sampler = BatchSampler(self.data.split("train"), block_size=block, batch_size=tc.batch_size,
                                    grad_accum_steps=tc.grad_accum_steps, seed=tc.seed,
                                    rank=ctx.rank, world_size=ctx.world_size)
        self.lr_at = schedule_for(tc)
        self.step, self.tokens_seen, self.elapsed_before = 0, 0, 0.0
        self.last_checkpoint: Optional[Path] = None
        if resume_from is None:
            # Distinct dropout streams per process; rank 0's matches a single-process run.
            _seed_everything(tc.seed + ctx.rank)
        else:
            self._restore(resume_from)

        self.ddp: Optional[DistributedDataParallel] = None
        runner: torch.nn.Module = model
        if ctx.is_distributed:
            self.ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
            runner = self.ddp
        if tc.compile:
            runner = torch.compile(runner)
        self.runner = runner

        if ctx.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.out_dir / RUN_CONFIG_FILE, self.config_dict)
            if resume_from is not None:
                truncate_metrics(self.out_dir / METRICS_FILE, self.step)
            self.metrics = MetricsWriter(self.out_dir, tensorboard=tc.tensorboard,
                                         purge_step=self.step + 1 if resume_from is not None else None)
        barrier(ctx)

    # ----------------------------------------------------------------------------------------------
    def _prepare_out_dir(self, resume: bool) -> Optional[Path]:
        """The checkpoint to resume from (None for a fresh start), after checking out_dir."""
        out = self.out_dir
        if resume:
            found = ckpt.find_resume_checkpoint(out, (ckpt.OPTIMIZER_FILE, ckpt.TRAINER_STATE_FILE))
            # The tokenizer first: another tokenizer usually also means another vocab_size below.
            self.data.check_tokenizer(load_tokenizer(found), what=f"checkpoint {found}", source=found)
            saved = ckpt.read_config(found)["model"]
            now = dataclasses.asdict(self.model_config)
            changed = [k for k in now if saved.get(k) != now[k]]
            if changed:
                k = changed[0]
                raise ConfigError(
                    f"model.{k} is {now[k]!r} but checkpoint {found} was trained with {saved.get(k)!r}; "
                    f"a resumed run must keep the model section unchanged"
                )
            log.info("resuming from %s", found)
            return found

        ckpt_root = out / ckpt.CHECKPOINTS_DIR
        has_checkpoints = ckpt_root.is_dir() and any(
            p.name == ckpt.LATEST_POINTER or p.name.startswith("step-") for p in ckpt_root.iterdir())
        if has_checkpoints and not self.tc.overwrite:
            raise ConfigError(
                f"out_dir {out} already holds checkpoints; pass --resume to continue or "
                f"--train.overwrite=true to start afresh"
            )
        barrier(self.ctx)  # every process has looked before rank 0 deletes anything
        if self.ctx.is_main:
            if has_checkpoints:
                log.info("train.overwrite: deleting the checkpoints in %s", ckpt_root)
                shutil.rmtree(ckpt_root)
            # Whatever curve is here belongs to an earlier run that is being replaced.
            (out / METRICS_FILE).unlink(missing_ok=True)
            (out / LOSS_CURVE_FILE).unlink(missing_ok=True)
            shutil.rmtree(out / TENSORBOARD_DIR, ignore_errors=True)
        return None

    def _restore(self, path: Path) -> None:
        """Optimizer, step counters and every random state from a checkpoint's training files."""
        opt_state = torch.load(path / ckpt.OPTIMIZER_FILE, map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(opt_state)
        state = json.loads((path / ckpt.TRAINER_STATE_FILE).read_text(encoding="utf-8"))
        self.step = state["step"]
        self.tokens_seen = state["tokens_seen"]
        self.elapsed_before = state["elapsed_s"]
        self.last_checkpoint = path
        self.sampler.load_state(decode_tensor(state["batch_generator"]))
        if state.get("grad_scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["grad_scaler"])
        rng = state["rng"]
        if state["world_size"] != self.ctx.world_size:
            log.warning("checkpoint was written by %d processes, resuming with %d: data order is kept only "
                        "if the global batch is the same, dropout streams are not", state["world_size"],
                        self.ctx.world_size)
        if self.ctx.rank < len(rng):
            set_rng_state(rng[self.ctx.rank], self.device)
        else:
            _seed_everything(self.tc.seed + self.ctx.rank + self.step)

    # ----------------------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        from tqdm.auto import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        tc, ctx = self.tc, self.ctx
        show_bar = self.progress and ctx.is_main
        start_step = self.step
        if start_step >= tc.max_steps:
            log.info("checkpoint is at step %d and train.max_steps is %d: nothing to train", start_step, tc.max_steps)
        log.info("training %d parameters for steps %d..%d, %d tokens per step",
                 self.model.num_parameters(), start_step + 1, tc.max_steps, self.sampler.tokens_per_step)

        bar = tqdm(total=tc.max_steps, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stderr,
                   disable=not show_bar)
        t_start = time.monotonic()
        last_log = (t_start, self.tokens_seen)
        train_loss: Optional[float] = None
        val: Optional[dict[str, Any]] = None
        try:
            with logging_redirect_tqdm() if show_bar else contextlib.nullcontext():
                while self.step < tc.max_steps:
                    lr = self.lr_at(self.step)
                    loss = self._train_step(lr)
                    self.step += 1
                    self.tokens_seen += self.sampler.tokens_per_step
                    bar.update(1)
                    now = time.monotonic()
                    out_of_time = tc.max_minutes is not None and now - t_start >= tc.max_minutes * 60
                    if tc.max_minutes is not None:
                        out_of_time = broadcast_object(out_of_time, ctx)  # every process must stop together
                    last = self.step == tc.max_steps or out_of_time

                    if self.step % tc.log_interval == 0 or last:
                        # .item() only here: on CUDA it waits for the GPU.
                        train_loss = all_reduce_mean(loss.item(), ctx, self.device)
                        tok_s = (self.tokens_seen - last_log[1]) / max(now - last_log[0], 1e-9)
                        last_log = (now, self.tokens_seen)
                        self._record({"step": self.step, "train_loss": train_loss, "lr": lr, "tokens_per_s": tok_s,
                                      "elapsed_s": self.elapsed_before + now - t_start})
                        bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")
                        if not show_bar:
                            log.info("step %d/%d: loss %.4f, lr %.2e, %.0f tok/s",
                                     self.step, tc.max_steps, train_loss, lr, tok_s)
                    if self.step % tc.eval_interval == 0 or last:
                        val = self._evaluate()
                    if self.step % tc.checkpoint_interval == 0 or last:
                        self._save_checkpoint(self.elapsed_before + time.monotonic() - t_start)
                    if out_of_time:
                        log.info("train.max_minutes (%g) reached at step %d; stopping", tc.max_minutes, self.step)
                        break
            if val is None:  # nothing was trained (already at max_steps): still report where the model is
                val = self._evaluate(record=False)
        finally:
            bar.close()
            if ctx.is_main:
                self.metrics.close()
        if ctx.is_main:
            plot_loss_curve(self.out_dir / METRICS_FILE, self.out_dir / LOSS_CURVE_FILE)
        barrier(ctx)
        elapsed = self.elapsed_before + time.monotonic() - t_start
        return TrainResult(
            steps=self.step, train_loss=train_loss, val_loss=val["loss"], val_ppl=val["perplexity"],
            val_bpb=val["bits_per_byte"], checkpoint=self.last_checkpoint, out_dir=self.out_dir,
            tokens_seen=self.tokens_seen, elapsed_s=elapsed,
        )

    def _train_step(self, lr: float) -> torch.Tensor:
        """One optimizer step; returns this process's mean micro-batch loss (a detached tensor)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        micro_batches = self.sampler.next_step()
        n = len(micro_batches)
        total = torch.zeros((), device=self.device)
        for i, (x, y) in enumerate(micro_batches):
            if self.device.type == "cuda":
                x, y = x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
            # Gradients are all-reduced only on the last micro-batch; the others just accumulate.
            sync = self.ddp is None or i == n - 1
            with contextlib.nullcontext() if sync else self.ddp.no_sync():
                with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                                    enabled=self.autocast_dtype is not None):
                    loss = lm_loss(self.runner(x), y) / n
                self.scaler.scale(loss).backward()
            total += loss.detach()
        if self.tc.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tc.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def _evaluate(self, record: bool = True) -> dict[str, Any]:
        """Validation metrics, computed on rank 0 (the fixed windows make other ranks' work redundant)."""
        result = None
        if self.ctx.is_main:
            result = evaluate_lm(
                self.model, self.data.split("val"), block_size=self.model_config.block_size,
                batch_size=self.tc.batch_size, num_batches=self.tc.eval_batches,
                bytes_per_token=self.data.bytes_per_token("val"), device=self.device,
                autocast_dtype=self.autocast_dtype,
            )
            bpb = result["bits_per_byte"]
            log.info("step %d: val loss %.4f, perplexity %.2f%s", self.step, result["loss"], result["perplexity"],
                     f", {bpb:.4f} bits/byte" if bpb is not None else "")
            if record:
                self._record({"step": self.step, "val_loss": result["loss"], "val_ppl": result["perplexity"],
                              "val_bpb": bpb})
        return broadcast_object(result, self.ctx)

    def _record(self, record: dict[str, Any]) -> None:
        if self.ctx.is_main:
            self.metrics.write(record)

    def _save_checkpoint(self, elapsed_s: float) -> None:
        # Every process contributes its random state (dropout streams differ per rank).
        rng_states = gather_objects(get_rng_state(self.device), self.ctx)
        name = f"step-{self.step:07d}"
        path = self.out_dir / ckpt.CHECKPOINTS_DIR / name
        if self.ctx.is_main:
            trainer_state = {
                "step": self.step,
                "tokens_seen": self.tokens_seen,
                "elapsed_s": elapsed_s,
                "world_size": self.ctx.world_size,
                "global_batch_size": self.sampler.global_batch_size,
                "batch_generator": encode_tensor(self.sampler.state()),
                "grad_scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "rng": rng_states,
            }
            ckpt.save_checkpoint(path, self.model, self.tokenizer, self.config_dict,
                                 optimizer_state=self.optimizer.state_dict(), trainer_state=trainer_state)
            ckpt.update_latest(self.out_dir, name)
            ckpt.prune_checkpoints(self.out_dir, self.tc.keep_checkpoints)
        self.last_checkpoint = path
        barrier(self.ctx)


# --------------------------------------------------------------------------------------------------
def _resolve_model_config(model: ModelConfig, data_vocab: int, data_dir: str) -> ModelConfig:
    """The model section with vocab_size taken from the data when unset; it must cover the data's ids."""
    if model.vocab_size is None:
        return dataclasses.replace(model, vocab_size=data_vocab)
    if model.vocab_size < data_vocab:
        raise ConfigError(
            f"model.vocab_size ({model.vocab_size}) is smaller than the vocabulary of the data in {data_dir} "
            f"({data_vocab}); leave model.vocab_size unset to take it from the data"
        )
    return dataclasses.replace(model)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
