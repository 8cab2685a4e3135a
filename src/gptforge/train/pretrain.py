"""Pretraining: a GPT on prepared token data, one process or many (torchrun), exact resume.

Pretraining's own parts sit here: the model built (or reloaded) from the run config, the random windows
of :mod:`.batches`, next-token loss, validation loss / perplexity / bits per byte on fixed windows, and the
checks a resumed run must pass. The step, schedule, checkpoints and restore are the shared
:class:`~.trainer.Trainer`'s; every checkpoint holds the weights, the optimizer state and a trainer state
with the step and every random-number state (Python, NumPy, torch, CUDA, the batch generator), so a
resumed run continues bit for bit.

The learning-rate schedule's length (``lr_decay_steps``, else ``max_steps``) is fixed when the run starts
and recorded in the trainer state (``schedule_steps``): a resume that raises ``max_steps`` keeps it (the
extra steps run at ``min_lr``), so "N steps, then resume to 2N" is exactly one run with that schedule.
A resume refuses changed hyperparameters (see :data:`RESUME_FREE_KEYS`) unless ``allow_resume_changes``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from .. import checkpoint as ckpt
from ..config import ModelConfig, RunConfig
from ..data.tokens import TokenData
from ..errors import ConfigError
from ..evaluate.lm import evaluate_lm, lm_loss
from ..model import GPT
from ..tokenizer import load_tokenizer
from .batches import BatchSampler
from .distributed import DistContext, barrier, broadcast_object, cleanup_distributed, init_distributed
from .metrics import LOSS_CURVE_FILE, METRICS_FILE, plot_loss_curve
from .optim import schedule_for
from .rng import seed_everything
from .signals import signal_name
from .trainer import Trainer, check_resume_changes, clear_run_outputs, holds_checkpoints, read_trainer_state

log = logging.getLogger(__name__)

RESUME_FREE_KEYS = frozenset({
    "out_dir", "max_steps", "eval_interval", "checkpoint_interval", "keep_checkpoints", "device", "tensorboard",
    "overwrite", "eval_batches", "log_interval", "compile", "max_minutes", "max_nonfinite_steps",
    "allow_resume_changes", "lr_decay_steps",  # lr_decay_steps: compared with the recorded schedule instead
})
"""``train`` keys a resumed run may change freely: where it stops, how often it logs, evaluates and saves,
where it runs. Every other key (learning rate, schedule, batch, seed, dtype, ...) needs
``allow_resume_changes``; the ``model`` section may never change."""


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
    stopped_by: Optional[str] = None
    """``SIGTERM`` / ``SIGINT`` when a signal stopped the run (after saving ``checkpoint``; the val_* are then
    None); None when it ran to its end."""


def pretrain(config: RunConfig, *, resume: bool = False, progress: bool = True,
             handle_signals: bool = False) -> TrainResult:
    """Train ``config.model`` on the prepared data in ``config.data.dir``; checkpoint into ``config.train.out_dir``.

    With ``resume`` the run continues exactly from the latest complete checkpoint in out_dir (up to
    ``config.train.max_steps``, which may have been raised). Under ``torchrun`` every process calls
    this; only rank 0 writes files and shows progress. ``handle_signals`` (the CLI's choice): SIGTERM /
    SIGINT while training save a checkpoint at the next step and return (``stopped_by``).
    """
    config.validate()
    ctx, device = init_distributed(config.train.device)
    job: Optional[_Pretraining] = None
    try:
        job = _Pretraining(config, ctx, device, resume=resume)
        return job.run(progress, handle_signals)
    finally:
        if job is not None:
            job.trainer.release_process_group()
        cleanup_distributed(ctx)


def next_token_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Pretraining's loss: mean next-token cross-entropy of a window batch (inputs, targets)."""
    x, y = batch
    return lm_loss(model(x), y)


# --------------------------------------------------------------------------------------------------
class _Pretraining:
    """Pretraining's parts around the shared :class:`Trainer`; ``__init__`` sets everything up."""

    def __init__(self, config: RunConfig, ctx: DistContext, device: torch.device, *, resume: bool):
        tc = config.train
        self.tc, self.ctx, self.device = tc, ctx, device
        self.out_dir = Path(tc.out_dir)

        self.data = TokenData(config.data.dir)
        self.tokenizer = self.data.tokenizer
        self.model_config = _resolve_model_config(config.model, self.data.vocab_size, config.data.dir)
        block = self.model_config.block_size
        for split in ("train", "val"):
            self.data.require_tokens(split, block + 1)  # one window of inputs plus its shifted targets
            self.data.check_ids(split, self.model_config.vocab_size)
        self.config_dict = config.to_dict()
        self.config_dict["model"] = dataclasses.asdict(self.model_config)

        self.schedule_steps = tc.lr_decay_steps if tc.lr_decay_steps is not None else tc.max_steps
        resume_from = self._prepare_out_dir(resume)

        # Identical initial weights on every process (DDP would broadcast rank 0's anyway).
        seed_everything(tc.seed)
        if resume_from is None:
            model = GPT(self.model_config).to(device)
        else:
            state = ckpt.load_state_dict(resume_from / ckpt.MODEL_FILE, device="cpu")
            model = ckpt.build_model(self.model_config, state, device=device, source=resume_from / ckpt.MODEL_FILE)
        model.train()
        self.model = model
        self.sampler = BatchSampler(self.data.split("train"), block_size=block, batch_size=tc.batch_size,
                                    grad_accum_steps=tc.grad_accum_steps, seed=tc.seed,
                                    rank=ctx.rank, world_size=ctx.world_size)
        self.val: Optional[dict[str, Any]] = None
        self.trainer = Trainer(model, tc, device=device, ctx=ctx, batches=self.sampler, loss_fn=next_token_loss,
                               lr_at=schedule_for(tc, decay_steps=self.schedule_steps), max_steps=tc.max_steps,
                               evaluate=self._evaluate, write_checkpoint=self._write_checkpoint,
                               extra_state=lambda: {"schedule_steps": self.schedule_steps},
                               log_interval=tc.log_interval, max_minutes=tc.max_minutes, compile=tc.compile)
        if resume_from is None:
            # Distinct dropout streams per process; rank 0's matches a single-process run.
            seed_everything(tc.seed + ctx.rank)
        else:
            self.trainer.restore(resume_from)
        self.trainer.start(self.config_dict, resumed=resume_from is not None)

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
            self._check_train_changes(found)
            log.info("resuming from %s", found)
            return found

        has_checkpoints = holds_checkpoints(out)
        if has_checkpoints and not self.tc.overwrite:
            raise ConfigError(
                f"out_dir {out} already holds checkpoints; pass --resume to continue or "
                f"--train.overwrite=true to start afresh"
            )
        barrier(self.ctx)  # every process has looked before rank 0 deletes anything
        if self.ctx.is_main:
            if has_checkpoints:
                log.info("train.overwrite: deleting the checkpoints in %s", out / ckpt.CHECKPOINTS_DIR)
                shutil.rmtree(out / ckpt.CHECKPOINTS_DIR)
            clear_run_outputs(out)
        return None

    def _check_train_changes(self, found: Path) -> None:
        """Refuse (or, with allow_resume_changes, log) changed hyperparameters; keep the schedule's length
        from the run's start unless lr_decay_steps changes it on purpose."""
        tc = self.tc
        saved_train = ckpt.read_config(found).get("train") or {}
        recorded = read_trainer_state(found).get("schedule_steps")
        if recorded is None:  # a checkpoint from before the length was recorded: what its own config said
            recorded = saved_train.get("lr_decay_steps") or saved_train.get("max_steps") or tc.max_steps
        saved = {**saved_train, "lr_decay_steps": recorded}
        now = dataclasses.asdict(tc)
        free = RESUME_FREE_KEYS - {"lr_decay_steps"} if tc.lr_decay_steps is not None else RESUME_FREE_KEYS
        check_resume_changes(saved, now, free=free, allow=tc.allow_resume_changes,
                             flag="--train.allow_resume_changes", run_dir=self.out_dir)
        self.schedule_steps = tc.lr_decay_steps if tc.lr_decay_steps is not None else recorded
        if tc.max_steps > self.schedule_steps:
            log.warning("the learning-rate schedule keeps the length it started with (%d steps): steps %d..%d run "
                        "at train.min_lr; to stretch it instead, pass --train.lr_decay_steps=%d with "
                        "--train.allow_resume_changes=true", self.schedule_steps, self.schedule_steps + 1,
                        tc.max_steps, tc.max_steps)

    # ----------------------------------------------------------------------------------------------
    def run(self, progress: bool, handle_signals: bool = False) -> TrainResult:
        tc, trainer = self.tc, self.trainer
        if trainer.step >= tc.max_steps:
            log.info("checkpoint is at step %d and train.max_steps is %d: nothing to train", trainer.step, tc.max_steps)
        log.info("training %d parameters for steps %d..%d, %d tokens per step",
                 self.model.num_parameters(), trainer.step + 1, tc.max_steps, self.sampler.tokens_per_step)
        outcome = trainer.run(progress=progress, handle_signals=handle_signals)
        stopped_by = signal_name(outcome.signal) if outcome.signal is not None else None
        if self.val is None and stopped_by is None:  # nothing was trained: still report where the model is
            self._evaluate(record=False)
        if self.ctx.is_main:
            plot_loss_curve(self.out_dir / METRICS_FILE, self.out_dir / LOSS_CURVE_FILE)
        barrier(self.ctx)
        val = self.val if stopped_by is None else None
        return TrainResult(
            steps=trainer.step, train_loss=outcome.train_loss, val_loss=val and val["loss"],
            val_ppl=val and val["perplexity"], val_bpb=val and val["bits_per_byte"],
            checkpoint=trainer.last_checkpoint, out_dir=self.out_dir, tokens_seen=trainer.tokens_seen,
            elapsed_s=trainer.elapsed_s, stopped_by=stopped_by,
        )

    def _evaluate(self, record: bool = True) -> None:
        """Validation metrics into ``self.val``, computed on rank 0 (the fixed windows make other ranks'
        work redundant) and shared with every process."""
        result = None
        step = self.trainer.step
        if self.ctx.is_main:
            result = evaluate_lm(
                self.model, self.data.split("val"), block_size=self.model_config.block_size,
                batch_size=self.tc.batch_size, num_batches=self.tc.eval_batches,
                bytes_per_token=self.data.bytes_per_token("val"), device=self.device,
                autocast_dtype=self.trainer.autocast_dtype,
            )
            bpb = result["bits_per_byte"]
            log.info("step %d: val loss %.4f, perplexity %.2f%s", step, result["loss"], result["perplexity"],
                     f", {bpb:.4f} bits/byte" if bpb is not None else "")
            if record:
                self.trainer.record({"step": step, "val_loss": result["loss"], "val_ppl": result["perplexity"],
                                     "val_bpb": bpb})
        self.val = broadcast_object(result, self.ctx)
        if not math.isfinite(self.val["loss"]):  # every process raises alike; no checkpoint is written
            raise self.trainer.nonfinite_evaluation("loss", self.val["loss"])

    def _write_checkpoint(self, path: Path, **training_state: Any) -> None:
        ckpt.save_checkpoint(path, self.model, self.tokenizer, self.config_dict, **training_state)


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
