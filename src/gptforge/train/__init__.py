"""Pretraining: a model-agnostic loop with accumulation, clipping, evaluation, checkpoints, exact resume and DDP."""

from .loop import TrainResult, pretrain
from .optim import build_optimizer, lr_at, param_groups, schedule_for

__all__ = ["TrainResult", "pretrain", "build_optimizer", "lr_at", "param_groups", "schedule_for"]
