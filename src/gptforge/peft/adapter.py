"""Bottleneck adapters (Houlsby et al., 2019): a small residual MLP after attention and after the MLP.

Each block gets ``attn_adapter`` and ``mlp_adapter`` submodules, applied to the output of ``block.attn``
and ``block.mlp`` by forward hooks, so the block computes ``x + adapter(attn(ln_1(x)))`` (and the same for
the MLP) without its class or forward being touched. The base's state-dict keys do not change; the
adapters add ``blocks.N.attn_adapter.*`` / ``blocks.N.mlp_adapter.*``. The up-projection starts at zero,
so a fresh adapter is the identity and the model computes exactly what the base did.

The hook is a bound method of the adapter (not a closure), so ``copy.deepcopy(model)`` re-binds it to the
copied adapter.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

from ..errors import CheckpointError, ConfigError
from ._common import (copy_into, find_gpt, freeze_base, needs_apply, peft_state_dict, read_folder,
                      save_folder, start_strategy)

log = logging.getLogger(__name__)

SITES = ("attn", "mlp")  # the block sublayers an adapter follows


class Adapter(nn.Module):
    """``x + up(gelu(down(x)))`` with a ``bottleneck``-wide hidden layer; ``up`` starts at zero."""

    def __init__(self, n_embd: int, bottleneck: int, *, device=None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        if not isinstance(bottleneck, int) or bottleneck < 1:
            raise ConfigError(f"adapter bottleneck must be a positive integer, got {bottleneck!r}")
        self.down = nn.Linear(n_embd, bottleneck, device=device, dtype=dtype)
        self.act = nn.GELU()
        self.up = nn.Linear(bottleneck, n_embd, device=device, dtype=dtype)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.act(self.down(x)))

    def _after(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        """Forward hook on the sublayer: its output goes through the adapter before the residual add."""
        return self(output)


def apply_adapters(model: nn.Module, bottleneck: int = 16, *, trainable: Sequence[str] = ("head",)) -> int:
    """Install an adapter after attention and after the MLP of every block, in place; freeze the base.

    Parameters under ``trainable`` (dotted paths from ``model``, default a TaskModel's ``head``) stay
    trainable. Returns the number of adapter parameters added.
    """
    gpt = find_gpt(model)
    weight = gpt.wte.weight
    adapters = [Adapter(gpt.config.n_embd, bottleneck, device=weight.device, dtype=weight.dtype)
                for _ in range(len(gpt.blocks) * len(SITES))]  # built first: a bad bottleneck changes nothing
    start_strategy(gpt, "adapter", {"bottleneck": bottleneck})
    added = iter(adapters)
    for block in gpt.blocks:
        for site in SITES:
            adapter = next(added)
            block.add_module(f"{site}_adapter", adapter)
            getattr(block, site).register_forward_hook(adapter._after)
    freeze_base(model, trainable)
    n = sum(p.numel() for a in adapters for p in a.parameters())
    log.info("adapters (bottleneck %d) after attention and MLP in %d blocks: %d parameters",
             bottleneck, len(gpt.blocks), n)
    return n


def _is_adapter_key(name: str) -> bool:
    parts = name.split(".")
    return any(f"{site}_adapter" in parts for site in SITES)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors (``blocks.0.attn_adapter.down.weight`` …), keyed relative to the GPT."""
    return peft_state_dict(model, _is_adapter_key)


def save_adapters(model: nn.Module, path: str | Path, config: Optional[dict[str, Any]] = None) -> Path:
    """Write the adapter folder (kind ``adapter``, ``bottleneck``); ``config`` is extra metadata."""
    return save_folder(model, path, "adapter", adapter_state_dict(model), config)


def load_adapters(model: nn.Module, path: str | Path) -> nn.Module:
    """Install adapters as recorded in the folder at ``path`` (unless already installed) and load them."""
    config, state = read_folder(path, "adapter")
    if needs_apply(model, "adapter"):
        if "bottleneck" not in config:
            raise CheckpointError(f"adapter config in {path} lacks 'bottleneck'")
        apply_adapters(model, int(config["bottleneck"]))
    copy_into(model, adapter_state_dict(model), state, path)
    return model
