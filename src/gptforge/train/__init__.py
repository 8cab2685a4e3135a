"""Training: one core (:class:`Trainer`) for pretraining and fine-tuning, with accumulation, clipping,
evaluation, checkpoints, exact resume and DDP; and pretraining itself (:func:`pretrain`)."""

from .optim import build_optimizer, lr_at, param_groups, schedule_for
from .pretrain import TrainResult, pretrain
from .trainer import BatchSource, RunOutcome, Trainer

__all__ = ["BatchSource", "RunOutcome", "Trainer", "TrainResult", "pretrain", "build_optimizer", "lr_at",
           "param_groups", "schedule_for"]
