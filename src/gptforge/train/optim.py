"""AdamW with decay / no-decay parameter groups, and the learning-rate schedule."""

from __future__ import annotations

import inspect
import logging
import math
from typing import Optional

import torch

from ..config import OptimizerConfig, TrainConfig

log = logging.getLogger(__name__)


def lr_at(step: int, *, learning_rate: float, min_lr: float, warmup_steps: int, decay_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based).

    Linear warmup from 0 to ``learning_rate`` over ``warmup_steps`` steps, then cosine decay to ``min_lr``
    at ``decay_steps``, then ``min_lr``.
    """
    if step < warmup_steps:
        # (step + 1) so that the very first step already moves the weights.
        return learning_rate * (step + 1) / warmup_steps
    if step >= decay_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    coeff = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 → 0
    return min_lr + coeff * (learning_rate - min_lr)


def schedule_for(config: TrainConfig, *, decay_steps: Optional[int] = None):
    """The schedule of a TrainConfig as a function ``step -> lr``; ``decay_steps`` (a resumed run's recorded
    length) overrides the config's ``lr_decay_steps`` / ``max_steps``."""
    if decay_steps is None:
        decay_steps = config.lr_decay_steps if config.lr_decay_steps is not None else config.max_steps

    def lr(step: int) -> float:
        return lr_at(step, learning_rate=config.learning_rate, min_lr=config.min_lr,
                     warmup_steps=config.warmup_steps, decay_steps=decay_steps)

    return lr


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: weight matrices and embeddings decay; biases and LayerNorm gains do not.

    Every parameter with two or more dimensions decays, so tied weights (listed once by
    ``named_parameters``) land in exactly one group.
    """
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, config: OptimizerConfig,
                    device_type: str = "cpu", *, fused: Optional[bool] = None) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`, using the fused CUDA kernel when it is available."""
    if fused is None:
        fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
    groups = param_groups(model, config.weight_decay)
    n_decay = sum(p.numel() for p in groups[0]["params"])
    n_plain = sum(p.numel() for p in groups[1]["params"])
    log.debug("AdamW: %d decayed and %d non-decayed parameters (fused=%s)", n_decay, n_plain, fused)
    kwargs = {"fused": True} if fused else {}
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=(config.beta1, config.beta2), **kwargs)
