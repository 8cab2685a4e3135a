"""Fine-tuning: one process, exact resume, evaluation before and after, early stopping.

A run reads its examples (:mod:`.data`), wraps the pretrained GPT for the task (a ``TaskModel`` with a
fresh head for classify / tokens) and sets which weights train (:mod:`.strategies`); the shared
:class:`~gptforge.train.trainer.Trainer` then takes AdamW steps over the trainable parameters only, with
linear warmup then cosine decay, gradient accumulation and clipping, checkpoints and exact restore. Every
``eval_interval`` steps the run evaluates on the validation examples; the best evaluation so far is kept in
``out_dir/best`` and :class:`EarlyStopping` ends the run after ``patience`` evaluations without
improvement. The run folder::

    out_dir/
      config.json          the resolved fine-tuning config
      metrics.jsonl        train loss per step, validation metrics per evaluation (step 0: before training)
      report.json          the before / after report (best weights), also printed by the CLI
      confusion_matrix.png classify only
      loss_curve.png
      best/                the best weights: a task checkpoint, or an adapter folder (lora, adapter, prefix)
      merged/              lora with merge: the best adapter merged into a full task checkpoint
      checkpoints/         resumable checkpoints (weights as in best/, optimizer.pt, trainer_state.json)

A resumed run keeps the learning-rate schedule's length fixed at its start (raising max_steps or epochs
lets it go further at the final learning rate) and refuses other changed settings (:data:`RESUME_FREE_KEYS`)
unless ``allow_resume_changes``; everything is checked before the run folder is written to.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .. import checkpoint as ckpt
from ..checkpoint import load_pretrained
from ..config import PEFT_STRATEGIES, FinetuneConfig
from ..data.finetune import EncodedExample, TaskData, collate, epoch_order, load_task_data, pad_id_of
from ..errors import CheckpointError, ConfigError, DataError
from ..evaluate.tasks import evaluate_task
from ..fsutil import write_json_atomic
from ..heads import forward_loss
from ..runtime import resolve_device
from ..train.metrics import LOSS_CURVE_FILE, METRICS_FILE, plot_loss_curve
from ..train.optim import lr_at
from ..train.signals import signal_name
from ..train.trainer import Trainer, check_resume_changes, clear_run_outputs, read_trainer_state, same_setting
from .strategies import apply_strategy, base_model, count_parameters, set_dropout

log = logging.getLogger(__name__)

REPORT_FILE = "report.json"
CONFUSION_MATRIX_FILE = "confusion_matrix.png"
BEST_DIR = "best"
MERGED_DIR = "merged"

# Settings that make the saved weights or optimizer state not fit: a resume never changes them.
RESUME_FIXED_KEYS = ("task", "strategy", "checkpoint", "train_file", "top_k_layers", "lora_rank", "lora_targets",
                     "adapter_bottleneck", "prefix_length")
RESUME_FREE_KEYS = frozenset({
    "out_dir", "max_steps", "epochs", "eval_interval", "checkpoint_interval", "keep_checkpoints", "device",
    "tensorboard", "overwrite", "evaluate_before", "merge", "max_nonfinite_steps", "allow_resume_changes",
})
"""Keys a resumed fine-tune may change freely (where it stops, how often it evaluates and saves, where it
runs); any other one (learning rate, patience, dropout, ...) needs ``allow_resume_changes``."""

# An evaluation hook: called with (step, validation metrics) after every evaluation during training.
EvalCallback = Callable[[int, dict[str, Any]], None]


class EarlyStopping:
    """Tracks the best value of a validation metric and says when to stop.

    ``update(value, step)`` returns True once ``patience`` evaluations in a row have failed to improve
    on the best by more than ``min_delta`` (never, when ``patience`` is None). ``improved`` tells whether
    the latest update set a new best.
    """

    def __init__(self, patience: Optional[int], mode: str = "min", min_delta: float = 0.0):
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.patience, self.mode, self.min_delta = patience, mode, min_delta
        self.best: Optional[float] = None
        self.best_step: Optional[int] = None
        self.bad_evals = 0
        self.improved = False

    def update(self, value: float, step: int) -> bool:
        if self.best is None:
            better = True
        elif self.mode == "min":
            better = value < self.best - self.min_delta
        else:
            better = value > self.best + self.min_delta
        self.improved = better
        if better:
            self.best, self.best_step, self.bad_evals = value, step, 0
        else:
            self.bad_evals += 1
        return self.should_stop

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad_evals >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_step, self.bad_evals = state["best"], state["best_step"], state["bad_evals"]


@dataclass
class FinetuneResult:
    """What a fine-tuning run reached. ``before`` / ``after`` are ``{"metrics", "report"}`` evaluations on
    the validation data of the starting model and of the best weights, which ``model`` holds."""

    task: str
    strategy: str
    labels: list[str]
    steps: int
    metric: str
    best_step: Optional[int]
    best_value: Optional[float]
    stopped_early: bool
    before: Optional[dict[str, Any]]
    after: Optional[dict[str, Any]]
    best_checkpoint: Path
    last_checkpoint: Path
    merged_checkpoint: Optional[Path]
    out_dir: Path
    trainable_parameters: int
    total_parameters: int
    tokens_seen: int
    tokens_per_s: float
    elapsed_s: float
    model: torch.nn.Module = dataclasses.field(repr=False)
    """The fine-tuned model with the best weights (merged, with merge), in eval mode; as trained so far
    when a signal stopped the run."""
    stopped_by: Optional[str] = None
    """``SIGTERM`` / ``SIGINT`` when a signal stopped the run after saving ``last_checkpoint``: there is then
    no final evaluation (``after`` is None) and no report; None when it ran to its end."""


def finetune(config: FinetuneConfig, *, resume: bool = False, progress: bool = True,
             on_eval: Optional[EvalCallback] = None, handle_signals: bool = False,
             retrieve: Optional[Callable] = None) -> FinetuneResult:
    """Fine-tune ``config.checkpoint`` on ``config.train_file`` for ``config.task``; write into ``config.out_dir``.

    With ``resume`` the run continues exactly from the latest checkpoint in out_dir (same batches, same
    dropout draws). ``on_eval(step, metrics)`` is called after each evaluation during training (the
    hyperparameter search reports to Optuna there, and may raise to end the run). ``handle_signals`` (the
    CLI's choice): SIGTERM / SIGINT while training save a checkpoint at the next step and return
    (``stopped_by``). ``retrieve`` (lm): fills the context slot of chat examples that have no ``context``
    (grounded fine-tuning; see :func:`gptforge.data.finetune.load_task_data`).
    """
    config.validate()
    return _Run(config, resume=resume, progress=progress, on_eval=on_eval, retrieve=retrieve).train(handle_signals)


# --------------------------------------------------------------------------------------------------
def load_trained_weights(model: torch.nn.Module, path: Path, strategy: str) -> None:
    """Copy the weights a run saved at ``path`` (best/ or a resumable checkpoint) into ``model`` in place,
    which was built the same way (same base, task and strategy)."""
    from ..heads import load_head

    base_state, head = ckpt.split_task_state(ckpt.load_state_dict(path / ckpt.MODEL_FILE))
    if strategy in PEFT_STRATEGIES:
        from ..peft import load_peft

        load_peft(model, path)  # already applied: copies the adapter tensors into place
    else:
        base = base_model(model)
        missing, unexpected = base.load_state_dict(base_state, strict=False)
        missing = [k for k in missing if not (base.config.tie_embeddings and k == "lm_head.weight")]
        if missing or unexpected:
            raise CheckpointError(f"weights in {path} do not fit the model being fine-tuned "
                                  f"(missing: {missing[:3]}, unexpected: {unexpected[:3]})")
    if head:
        load_head(model, head)


def save_finetuned(path: Path, model: torch.nn.Module, tokenizer, config: dict[str, Any], strategy: str,
                   **training_state: Any) -> Path:
    """Write ``model`` as a task checkpoint, or for lora / adapter / prefix as an adapter folder holding the
    adapter files, the head (``head.*`` in model.safetensors) and a config whose ``adapter`` section names
    the base model. ``training_state``: optimizer_state / trainer_state for a resumable checkpoint."""
    if strategy not in PEFT_STRATEGIES:
        return ckpt.save_checkpoint(path, model, tokenizer, config, state=ckpt.task_model_state(model),
                                    **training_state)
    from ..peft import save_peft

    def write_adapter(folder: Path) -> None:
        staging = folder / "adapter"
        save_peft(model, staging, config=config[ckpt.ADAPTER_SECTION])  # the base is recorded here too
        for f in staging.iterdir():
            f.rename(folder / f.name)
        staging.rmdir()

    return ckpt.save_checkpoint(path, model, tokenizer, config, state=ckpt.head_state(model), extra=write_adapter,
                                **training_state)


class EpochBatches:
    """Fine-tuning's :class:`~gptforge.train.trainer.BatchSource`: each epoch visits the examples in a
    permutation fixed by (seed, epoch), so (epoch, batch) is the whole data position."""

    def __init__(self, examples: list[EncodedExample], *, batch_size: int, grad_accum_steps: int, seed: int, pad_id: int):
        self.examples, self.batch_size, self.grad_accum_steps = examples, batch_size, grad_accum_steps
        self.seed, self.pad_id = seed, pad_id
        self.epoch = self.batch_in_epoch = 0
        self.order = epoch_order(len(examples), batch_size, seed, self.epoch)

    @property
    def batches_per_epoch(self) -> int:
        return len(self.order)

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        return [self._next_batch() for _ in range(self.grad_accum_steps)]

    def _next_batch(self) -> dict[str, torch.Tensor]:
        if self.batch_in_epoch >= len(self.order):
            self.epoch += 1
            self.batch_in_epoch = 0
            self.order = epoch_order(len(self.examples), self.batch_size, self.seed, self.epoch)
        indices = self.order[self.batch_in_epoch]
        self.batch_in_epoch += 1
        batch = collate([self.examples[i] for i in indices], self.pad_id)
        return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}

    def count_tokens(self, micro_batches: list[dict[str, torch.Tensor]]) -> int:
        """The real (unpadded) tokens of the step."""
        return sum(int(batch["attention_mask"].sum()) for batch in micro_batches)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.batch_in_epoch = state["epoch"], state["batch_in_epoch"]
        self.order = epoch_order(len(self.examples), self.batch_size, self.seed, self.epoch)


class _Run:
    """Fine-tuning's parts around the shared :class:`Trainer`: the task model and strategy, evaluation
    with the best checkpoint and early stopping, the before / after report. ``__init__`` sets up."""

    def __init__(self, config: FinetuneConfig, *, resume: bool, progress: bool, on_eval: Optional[EvalCallback],
                 retrieve: Optional[Callable] = None):
        self.config, self.progress, self.on_eval = config, progress, on_eval
        self.out_dir = Path(config.out_dir)
        self.device = resolve_device(config.device)
        resume_from = self._prepare_out_dir(resume)

        source = load_pretrained(config.checkpoint, device="cpu")
        self.tokenizer = source.tokenizer
        base = source.model
        self.data: TaskData = load_task_data(config, self.tokenizer, base.config.block_size, retrieve=retrieve)
        self.task = self.data.task
        for split, examples in (("training", self.data.train), ("validation", self.data.val)):
            if not examples:
                raise DataError(f"no {split} examples left to fine-tune on (check {config.train_file})")
        self.config_dict = {
            "model": dataclasses.asdict(base.config),
            ckpt.TASK_SECTION: self.task,
            "finetune": config.to_dict(),
        }
        if config.strategy in PEFT_STRATEGIES:
            # the base by path (absolute; save_checkpoint adds it relative to each adapter folder) and fingerprint
            self.config_dict[ckpt.ADAPTER_SECTION] = {
                "strategy": config.strategy, **ckpt.adapter_base_record(source, config.checkpoint)}

        torch.manual_seed(config.seed)  # the head's initialisation
        model = ckpt.build_task_model(base, self.task, dropout=config.dropout)
        set_dropout(model, config.dropout)  # before PEFT, whose own dropout (lora_dropout) is its own setting
        apply_strategy(model, config)
        self.model = model.to(self.device).train()
        self.trainable, self.total = count_parameters(model)
        self.pad_id = pad_id_of(self.tokenizer)
        batches = EpochBatches(self.data.train, batch_size=config.batch_size, grad_accum_steps=config.grad_accum_steps,
                               seed=config.seed, pad_id=self.pad_id)
        self.max_steps = (math.ceil(config.epochs * batches.batches_per_epoch / config.grad_accum_steps)
                          if config.epochs is not None else config.max_steps)
        # The schedule's length is fixed at the run's start; a resume reads it back (_restore).
        self.schedule_steps = self.max_steps
        self.early = EarlyStopping(config.patience, config.stop_mode, config.min_delta)
        self.train_time_before = 0.0
        self.before: Optional[dict[str, Any]] = None
        kind = self.task["type"]

        def loss_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            loss_sum, scored, _ = forward_loss(model, batch, kind)
            return loss_sum / scored.clamp(min=1)

        # Each step's loss is logged, quietly: the evaluations are a fine-tuning run's news.
        self.trainer = Trainer(self.model, config, device=self.device, batches=batches, loss_fn=loss_fn,
                               lr_at=self._lr, max_steps=self.max_steps, evaluate=self._evaluate_and_keep_best,
                               write_checkpoint=self._write_checkpoint, extra_state=self._extra_state,
                               step_log_level=logging.DEBUG)
        if resume_from is not None:
            self._restore(resume_from)
        else:
            torch.manual_seed(config.seed + 1)  # dropout draws, independent of the head's init
        self.trainer.start(config.to_dict(), resumed=resume_from is not None)

    # ----------------------------------------------------------------------------------------------
    def _prepare_out_dir(self, resume: bool) -> Optional[Path]:
        out = self.out_dir
        if resume:
            found = ckpt.find_resume_checkpoint(out, (ckpt.TRAINER_STATE_FILE, ckpt.OPTIMIZER_FILE))
            saved = ckpt.read_config(found).get("finetune", {})
            for key in RESUME_FIXED_KEYS:
                if key in saved and not same_setting(saved.get(key), getattr(self.config, key)):
                    raise ConfigError(f"{key} is {getattr(self.config, key)!r} but the run in {out} was started "
                                      f"with {saved.get(key)!r}; a resumed run must keep it")
            check_resume_changes(saved, self.config.to_dict(), free=RESUME_FREE_KEYS.union(RESUME_FIXED_KEYS),
                                 allow=self.config.allow_resume_changes, flag="--allow_resume_changes", run_dir=out)
            read_trainer_state(found, per_rank=False)  # a damaged one fails here, before the model is loaded
            log.info("resuming from %s", found)
            return found
        leftovers = [out / name for name in (ckpt.CHECKPOINTS_DIR, BEST_DIR, MERGED_DIR) if (out / name).exists()]
        if leftovers and not self.config.overwrite:
            raise ConfigError(f"out_dir {out} already holds a fine-tuning run; pass --resume to continue it or "
                              f"--overwrite=true to start afresh")
        for path in leftovers:
            log.info("overwrite: deleting %s", path)
            shutil.rmtree(path)
        clear_run_outputs(out, REPORT_FILE, CONFUSION_MATRIX_FILE)
        return None

    def _restore(self, path: Path) -> None:
        saved_task = ckpt.task_of(ckpt.read_config(path))
        if saved_task["labels"] != self.task["labels"]:
            raise DataError(f"the labels of {self.config.train_file} differ from those the run in {self.out_dir} "
                            f"was started with ({', '.join(saved_task['labels'])})")
        load_trained_weights(self.model, path, self.config.strategy)
        state = self.trainer.restore(path)
        try:
            self.train_time_before = float(state["train_time_s"])
            self.before = state["before"]
            self.early.load_state_dict(state["early_stopping"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {path}: {ckpt.TRAINER_STATE_FILE} is damaged or not a fine-tuning "
                                  f"run's ({type(exc).__name__}: {exc})") from None
        recorded = state.get("schedule_steps")
        self.schedule_steps = recorded if recorded is not None else self.max_steps
        if self.max_steps > self.schedule_steps:
            log.warning("the learning-rate schedule keeps the length it started with (%d steps): steps %d..%d run "
                        "at the final learning rate", self.schedule_steps, self.schedule_steps + 1, self.max_steps)

    def _extra_state(self) -> dict[str, Any]:
        return {"train_time_s": self._train_time(), "before": self.before, "early_stopping": self.early.state_dict(),
                "schedule_steps": self.schedule_steps}

    def _train_time(self) -> float:
        return self.train_time_before + self.trainer.train_time

    # ----------------------------------------------------------------------------------------------
    def train(self, handle_signals: bool = False) -> FinetuneResult:
        config, trainer = self.config, self.trainer
        if trainer.step == 0 and config.evaluate_before:
            self.before = self._evaluate()
            trainer.record({"step": 0, **_prefixed(self.before["metrics"])})
            log.info("before fine-tuning: %s", _brief(self.before["metrics"]))
        log.info("fine-tuning %s of %s parameters (%s) for steps %d..%d", f"{self.trainable:,}", f"{self.total:,}",
                 config.strategy, trainer.step + 1, self.max_steps)
        outcome = trainer.run(stopped=self.early.should_stop, progress=self.progress, handle_signals=handle_signals)
        if outcome.signal is not None:
            return self._stopped_by_signal(signal_name(outcome.signal))
        stopped_early = outcome.stopped
        if stopped_early:
            log.info("early stopping at step %d: %s has not improved on %.4f (step %s) for %d evaluations",
                     trainer.step, config.stop_metric, self.early.best, self.early.best_step, self.early.bad_evals)
        return self._finish(stopped_early)

    def _lr(self, step: int) -> float:
        c = self.config
        return lr_at(step, learning_rate=c.learning_rate, min_lr=c.learning_rate * c.min_lr_ratio,
                     warmup_steps=c.warmup_steps, decay_steps=self.schedule_steps)

    def _evaluate(self) -> dict[str, Any]:
        return evaluate_task(self.model, self.data.val, self.task, pad_id=self.pad_id,
                             batch_size=self.config.batch_size, device=self.device,
                             autocast_dtype=self.trainer.autocast_dtype)

    def _evaluate_and_keep_best(self) -> bool:
        """Evaluate, save best/ on improvement; True when early stopping says to stop."""
        step = self.trainer.step
        result = self._evaluate()
        metrics = result["metrics"]
        self.trainer.record({"step": step, **_prefixed(metrics)})
        log.info("step %d: %s", step, _brief(metrics))
        loss = metrics.get("val_loss")
        if loss is not None and not math.isfinite(loss):  # nothing (best/, a checkpoint) is written from it
            raise self.trainer.nonfinite_evaluation("loss", loss)
        if self.on_eval is not None:
            self.on_eval(step, metrics)
        value = metrics.get(self.config.stop_metric)
        if value is None:
            raise ConfigError(f"metric {self.config.stop_metric!r} cannot be computed on this validation data; "
                              "choose another (--metric=...)")
        stop = self.early.update(value, step)
        if self.early.improved:
            save_finetuned(self.out_dir / BEST_DIR, self.model, self.tokenizer,
                           {**self.config_dict, "best": {"step": step, self.config.stop_metric: value}},
                           self.config.strategy)
        return stop

    def _write_checkpoint(self, path: Path, **training_state: Any) -> None:
        save_finetuned(path, self.model, self.tokenizer, self.config_dict, self.config.strategy, **training_state)

    def _stopped_by_signal(self, name: str) -> FinetuneResult:
        """What a run stopped by a signal reached: its checkpoint is saved; no final evaluation, no report."""
        config, trainer = self.config, self.trainer
        best = self.out_dir / BEST_DIR
        train_time = self._train_time()
        return FinetuneResult(
            task=self.task["type"], strategy=config.strategy, labels=list(self.task["labels"]), steps=trainer.step,
            metric=config.stop_metric, best_step=self.early.best_step, best_value=self.early.best,
            stopped_early=False, before=self.before, after=None, best_checkpoint=best,
            last_checkpoint=trainer.last_checkpoint, merged_checkpoint=None, out_dir=self.out_dir,
            trainable_parameters=self.trainable, total_parameters=self.total, tokens_seen=trainer.tokens_seen,
            tokens_per_s=trainer.tokens_seen / train_time if train_time > 0 else 0.0,
            elapsed_s=trainer.elapsed_s, model=self.model.eval(), stopped_by=name,
        )

    def _finish(self, stopped_early: bool) -> FinetuneResult:
        config, out, trainer = self.config, self.out_dir, self.trainer
        best = out / BEST_DIR
        if not ckpt.is_complete(best):
            raise CheckpointError(f"the run in {out} has no best checkpoint ({best}); was it ever evaluated?")
        if self.early.best_step != trainer.step:
            load_trained_weights(self.model, best, config.strategy)
        after = self._evaluate()
        merged = None
        if config.merge:
            from ..peft import merge_lora

            merge_lora(self.model)
            merged_config = {k: v for k, v in self.config_dict.items() if k != ckpt.ADAPTER_SECTION}
            merged = ckpt.save_checkpoint(out / MERGED_DIR, self.model, self.tokenizer, merged_config,
                                          state=ckpt.task_model_state(self.model))
        report = {"task": self.task["type"], "strategy": config.strategy, "labels": self.task["labels"],
                  "metric": config.stop_metric, "best_step": self.early.best_step, "steps": trainer.step,
                  "before": self.before, "after": after}
        write_json_atomic(out / REPORT_FILE, report)
        if self.task["type"] == "classify":
            from ..evaluate.classification import plot_confusion_matrix

            plot_confusion_matrix(after["report"], out / CONFUSION_MATRIX_FILE)
        plot_loss_curve(out / METRICS_FILE, out / LOSS_CURVE_FILE)
        train_time = self._train_time()
        return FinetuneResult(
            task=self.task["type"], strategy=config.strategy, labels=list(self.task["labels"]), steps=trainer.step,
            metric=config.stop_metric, best_step=self.early.best_step, best_value=self.early.best,
            stopped_early=stopped_early, before=self.before, after=after, best_checkpoint=best,
            last_checkpoint=trainer.last_checkpoint, merged_checkpoint=merged, out_dir=out,
            trainable_parameters=self.trainable, total_parameters=self.total, tokens_seen=trainer.tokens_seen,
            tokens_per_s=trainer.tokens_seen / train_time if train_time > 0 else 0.0,
            elapsed_s=trainer.elapsed_s, model=self.model.eval(),
        )


def _prefixed(metrics: dict[str, Any]) -> dict[str, Any]:
    """Validation metrics as metrics.jsonl keys: ``val_loss`` stays, ``accuracy`` → ``val_accuracy``."""
    return {(k if k.startswith("val_") else f"val_{k}"): v for k, v in metrics.items()}


def _brief(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if v is not None)
