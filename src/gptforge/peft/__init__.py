"""Parameter-efficient fine-tuning: transforms applied to a built GPT (or a TaskModel wrapping one).

Three strategies, each of which adds a few trainable tensors, freezes the base and leaves the base's
state-dict keys unchanged (so a base checkpoint still loads under it):

``lora``     low-rank updates swapped into the blocks' Linear layers (:mod:`.lora`)
``adapter``  bottleneck MLPs after attention and after the MLP of every block (:mod:`.adapter`)
``prefix``   learned key/value prefixes in every layer's attention (:mod:`.prefix`)

Each saves to a small folder, ``adapter_model.safetensors`` + ``adapter_config.json`` whose ``kind``
names the strategy; :func:`load_peft` reads it and applies the same strategy before loading.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Optional

import torch.nn as nn

from ..errors import CheckpointError, ConfigError
from ._common import find_gpt, read_adapter_config
from .adapter import Adapter, adapter_state_dict, apply_adapters, load_adapters, save_adapters
from .lora import LoRALinear, apply_lora, load_lora, lora_state_dict, merge_lora, save_lora
from .prefix import PrefixEncoder, apply_prefix, fold_prefix, load_prefix, prefix_state_dict, save_prefix

STRATEGIES = ("lora", "adapter", "prefix")

_APPLY = {"lora": apply_lora, "adapter": apply_adapters, "prefix": apply_prefix}
_SAVE = {"lora": save_lora, "adapter": save_adapters, "prefix": save_prefix}
_LOAD = {"lora": load_lora, "adapter": load_adapters, "prefix": load_prefix}
_STATE = {"lora": lora_state_dict, "adapter": adapter_state_dict, "prefix": prefix_state_dict}


def apply_peft(model: nn.Module, strategy: str, **options: Any):
    """Apply ``strategy`` ("lora", "adapter" or "prefix") with its options, in place.

    Returns what the strategy's apply function returns (LoRA: the swapped layer names; adapter and
    prefix: the number of parameters added).
    """
    if strategy not in _APPLY:
        raise ConfigError(f"unknown PEFT strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    apply = _APPLY[strategy]
    accepted = [name for name in inspect.signature(apply).parameters if name != "model"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(f"PEFT strategy {strategy!r} takes no option {unknown[0]!r} "
                          f"(its options: {', '.join(accepted)})")
    return apply(model, **options)


def peft_kind(model: nn.Module) -> Optional[str]:
    """The strategy applied to the model's GPT, or None."""
    config = getattr(find_gpt(model), "peft_config", None)
    return None if config is None else config["kind"]


def peft_state_dict(model: nn.Module) -> dict:
    """The tensors of whichever strategy is applied, keyed relative to the GPT."""
    kind = peft_kind(model)
    if kind is None:
        raise ConfigError("the model has no PEFT applied")
    return _STATE[kind](model)


def save_peft(model: nn.Module, path: str | Path, config: Optional[dict[str, Any]] = None) -> Path:
    """Save the applied strategy's adapter folder (see the strategy's save function)."""
    kind = peft_kind(model)
    if kind is None:
        raise ConfigError("the model has no PEFT applied; nothing to save")
    return _SAVE[kind](model, path, config)


def load_peft(model: nn.Module, path: str | Path) -> nn.Module:
    """Apply and load the adapter folder at ``path``, whichever strategy its config names."""
    kind = read_adapter_config(path)["kind"]
    if kind not in _LOAD:
        raise CheckpointError(f"{path} holds an adapter of unknown kind {kind!r}")
    return _LOAD[kind](model, path)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights are counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


__all__ = [
    "STRATEGIES", "apply_peft", "save_peft", "load_peft", "peft_kind", "peft_state_dict", "trainable_parameters",
    "LoRALinear", "apply_lora", "lora_state_dict", "save_lora", "load_lora", "merge_lora",
    "Adapter", "apply_adapters", "adapter_state_dict", "save_adapters", "load_adapters",
    "PrefixEncoder", "apply_prefix", "fold_prefix", "prefix_state_dict", "save_prefix", "load_prefix",
]
