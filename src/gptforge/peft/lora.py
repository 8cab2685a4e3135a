"""LoRA (Hu et al., 2021) as a module swap: ``y = x Wᵀ + b + (alpha / r) · B(A(dropout(x)))``.

:func:`apply_lora` replaces the chosen ``nn.Linear`` layers inside ``model.blocks`` with
:class:`LoRALinear` modules that adopt the original ``weight`` and ``bias`` parameters under the same
names, so the base's state-dict keys (``blocks.0.attn.qkv.weight``) do not change and a base checkpoint
still loads. ``A`` starts Kaiming-uniform and ``B`` at zero, so a fresh LoRA model computes exactly what
the base did; only ``A`` and ``B`` train.

:func:`merge_lora` folds ``B·A·alpha/r`` into the weights and swaps plain ``nn.Linear`` modules back in:
the result is an ordinary GPT with the original keys and no inference overhead.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import CheckpointError, ConfigError
from ._common import (check_no_strategy, copy_into, find_gpt, freeze_base, needs_apply, peft_state_dict,
                      read_folder, save_folder, start_strategy)

log = logging.getLogger(__name__)

DEFAULT_TARGETS = ("qkv", "proj", "fc")


class LoRALinear(nn.Module):
    """A frozen Linear layer (``weight``, ``bias`` as in ``nn.Linear``) plus a trainable low-rank update."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, rank: int = 8,
                 alpha: float = 16.0, dropout: float = 0.0, device=None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        _check_settings(rank, alpha, dropout)
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        factory = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, **factory), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_a = nn.Linear(in_features, rank, bias=False, **factory)
        self.lora_b = nn.Linear(rank, out_features, bias=False, **factory)
        self.merged = False
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        # A as nn.Linear's own init (the LoRA paper's), B zero: the update B·A starts at exactly zero.
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, rank: int = 8, alpha: float = 16.0,
                    dropout: float = 0.0) -> "LoRALinear":
        """Wrap ``linear``'s own weight and bias (no copy) with a fresh LoRA branch; they are frozen."""
        w = linear.weight
        module = cls(linear.in_features, linear.out_features, bias=False, rank=rank, alpha=alpha,
                     dropout=dropout, device="meta")  # placeholders: the real tensors are adopted below
        module.weight = w
        module.bias = linear.bias
        module.lora_a = nn.Linear(linear.in_features, rank, bias=False, device=w.device, dtype=w.dtype)
        module.lora_b = nn.Linear(rank, linear.out_features, bias=False, device=w.device, dtype=w.dtype)
        module.reset_lora_parameters()
        w.requires_grad_(False)
        if linear.bias is not None:
            linear.bias.requires_grad_(False)
        return module

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"rank={self.rank}, alpha={self.alpha}, merged={self.merged}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        return y + self.lora_b(self.lora_a(self.lora_dropout(x))) * self.scaling

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """The update ``B·A·scaling`` in the layout of ``weight``, (out, in)."""
        return (self.lora_b.weight @ self.lora_a.weight) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Add the update to ``weight`` in place and switch the branch off (idempotent)."""
        if not self.merged:
            self.weight.add_(self.delta_weight().to(self.weight.dtype))
            self.merged = True

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding the merged weight (the same parameter objects, no copy)."""
        self.merge()
        w = self.weight
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = w
        linear.bias = self.bias
        return linear


def _check_settings(rank: int, alpha: float, dropout: float) -> None:
    if not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"LoRA rank must be a positive integer, got {rank!r}")
    if not alpha > 0:
        raise ConfigError(f"LoRA alpha must be positive, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"LoRA dropout must be in [0, 1), got {dropout!r}")


def apply_lora(model: nn.Module, *, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               targets: Sequence[str] = DEFAULT_TARGETS, trainable: Sequence[str] = ("head",)) -> list[str]:
    """Swap LoRA into the ``nn.Linear`` layers of ``model.blocks`` named by ``targets``, in place.

    A target matches a layer whose dotted name ends with it: ``"proj"`` is both ``attn.proj`` and
    ``mlp.proj``; ``"mlp.proj"`` only the latter. The LM head and embeddings are never touched. Every
    other parameter is frozen except those under ``trainable`` (dotted paths from ``model``; the default
    keeps a TaskModel's ``head`` training). Returns the swapped layers' names, relative to the GPT.
    """
    _check_settings(rank, alpha, dropout)
    targets = tuple(targets)
    if not targets:
        raise ConfigError("LoRA targets must name at least one layer (e.g. qkv, proj, fc)")
    gpt = find_gpt(model)
    check_no_strategy(gpt)
    chosen = [(name, module) for name, module in gpt.blocks.named_modules()
              if type(module) is nn.Linear and any(name == t or name.endswith("." + t) for t in targets)]
    if not chosen:
        raise ConfigError(f"no Linear layer in model.blocks matches LoRA targets {list(targets)} "
                          f"(the layers are named {', '.join(DEFAULT_TARGETS)})")
    start_strategy(gpt, "lora", {"rank": rank, "alpha": alpha, "dropout": dropout, "targets": list(targets)})
    swapped = []
    for name, linear in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = gpt.blocks.get_submodule(parent_name)
        setattr(parent, child, LoRALinear.from_linear(linear, rank=rank, alpha=alpha, dropout=dropout))
        swapped.append(f"blocks.{name}")
    freeze_base(model, trainable)
    log.info("LoRA (rank %d, alpha %g) on %d layers", rank, alpha, len(swapped))
    return swapped


def _is_lora_key(name: str) -> bool:
    parts = name.split(".")
    return "lora_a" in parts or "lora_b" in parts


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the LoRA tensors (``blocks.0.attn.qkv.lora_a.weight`` …), keyed relative to the GPT."""
    return peft_state_dict(model, _is_lora_key)


def save_lora(model: nn.Module, path: str | Path, config: Optional[dict[str, Any]] = None) -> Path:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` (kind, rank, alpha, dropout, targets).

    ``config`` is extra JSON metadata to record (the base checkpoint, the task …); a key that names a
    LoRA setting must agree with the model's.
    """
    return save_folder(model, path, "lora", lora_state_dict(model), config)


def load_lora(model: nn.Module, path: str | Path) -> nn.Module:
    """Apply LoRA as recorded in the folder at ``path`` (unless already applied) and load its tensors."""
    config, state = read_folder(path, "lora")
    if needs_apply(model, "lora"):
        try:
            apply_lora(model, rank=int(config["rank"]), alpha=float(config["alpha"]),
                       dropout=float(config.get("dropout", 0.0)), targets=tuple(config["targets"]))
        except KeyError as exc:
            raise CheckpointError(f"adapter config in {path} lacks {exc.args[0]!r}") from None
    copy_into(model, lora_state_dict(model), state, path)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its weight and put plain ``nn.Linear`` modules back, in place.

    The GPT then has its original modules and state-dict keys; parameters stay as frozen as they were
    (``model.requires_grad_(True)`` to train it fully).
    """
    gpt = find_gpt(model)
    merged = [(name, m) for name, m in gpt.named_modules() if isinstance(m, LoRALinear)]
    for name, module in merged:
        parent_name, _, child = name.rpartition(".")
        setattr(gpt.get_submodule(parent_name), child, module.to_linear())
    if getattr(gpt, "peft_config", {}).get("kind") == "lora":
        del gpt.peft_config
    log.info("merged LoRA into %d layers", len(merged))
    return model
