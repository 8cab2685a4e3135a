"""Prefix-tuning (Li & Liang, 2021): P learned key/value pairs in front of every layer's attention.

The GPT's attention has one hook for this, ``CausalSelfAttention.prefix`` (None by default): a callable
``prefix(batch_size) -> (k, v)``, each (B, H, P, D), prepended to the keys and values. Every query sees
all P prefix positions; the causal order of the real tokens, their positions, padding masks and the KV
cache (which holds only real tokens) are unchanged.

One :class:`PrefixEncoder` holds the prefixes of all layers and is registered on the GPT as
``prefix_encoder`` (keys ``prefix_encoder.*``); each layer's hook is a small view onto it. With
``reparameterize=True`` the prefixes are computed by an MLP from a (P, C) embedding, which Li & Liang
found trains more stably; :func:`fold_prefix` replaces the MLP by the table it computes once training is
done, so decoding does not pay for it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import CheckpointError, ConfigError
from ._common import (copy_into, find_gpt, freeze_base, needs_apply, peft_state_dict, read_folder,
                      save_folder, start_strategy)

log = logging.getLogger(__name__)

# The model's own init scale: near-zero keys score about 0 against every query and near-zero values add
# little, so a fresh prefix perturbs a trained model gently while still receiving gradients.
_INIT_STD = 0.02


class PrefixEncoder(nn.Module):
    """Key/value prefixes for ``n_layer`` layers: ``forward(layer, batch_size)`` → (k, v), each (B, H, P, D)."""

    def __init__(self, n_layer: int, n_head: int, head_dim: int, prefix_length: int, *,
                 reparameterize: bool = False, hidden_size: int = 512, device=None,
                 dtype: Optional[torch.dtype] = None):
        super().__init__()
        if not isinstance(prefix_length, int) or prefix_length < 1:
            raise ConfigError(f"prefix_length must be a positive integer, got {prefix_length!r}")
        if reparameterize and (not isinstance(hidden_size, int) or hidden_size < 1):
            raise ConfigError(f"prefix hidden_size must be a positive integer, got {hidden_size!r}")
        self.n_layer, self.n_head, self.head_dim, self.prefix_length = n_layer, n_head, head_dim, prefix_length
        factory = dict(device=device, dtype=dtype)
        if reparameterize:
            width = n_head * head_dim
            self.embedding = nn.Parameter(torch.randn(prefix_length, width, **factory) * _INIT_STD)
            self.mlp = nn.Sequential(nn.Linear(width, hidden_size, **factory), nn.Tanh(),
                                     nn.Linear(hidden_size, n_layer * 2 * width, **factory))
        else:
            self.table = nn.Parameter(
                torch.randn(n_layer, 2, n_head, prefix_length, head_dim, **factory) * _INIT_STD)

    @property
    def reparameterized(self) -> bool:
        return hasattr(self, "mlp")

    def layer_kv(self, layer: int) -> torch.Tensor:
        """Layer ``layer``'s keys and values, (2, H, P, D)."""
        if not self.reparameterized:
            return self.table[layer]
        # Only this layer's rows of the output projection: each layer's call costs 1/n_layer of the MLP head.
        hidden = self.mlp[1](self.mlp[0](self.embedding))  # (P, hidden)
        out = self.mlp[2]
        rows = slice(layer * 2 * self.n_head * self.head_dim, (layer + 1) * 2 * self.n_head * self.head_dim)
        kv = F.linear(hidden, out.weight[rows], out.bias[rows])  # (P, 2 * H * D)
        return kv.view(self.prefix_length, 2, self.n_head, self.head_dim).permute(1, 2, 0, 3)

    def forward(self, layer: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        kv = self.layer_kv(layer)
        shape = (batch_size, self.n_head, self.prefix_length, self.head_dim)
        return kv[0].unsqueeze(0).expand(shape), kv[1].unsqueeze(0).expand(shape)  # no copy per row

    @torch.no_grad()
    def fold(self) -> None:
        """Replace the reparameterisation MLP by the table it computes (same prefixes, no MLP at run time)."""
        if not self.reparameterized:
            return
        table = torch.stack([self.layer_kv(i) for i in range(self.n_layer)])  # (L, 2, H, P, D)
        del self.mlp, self.embedding
        self.table = nn.Parameter(table.contiguous())


class _LayerPrefix:
    """The hook one attention layer calls. A plain object, not a module, so the shared encoder is
    registered (and saved) once, on the GPT, rather than under every layer."""

    def __init__(self, encoder: PrefixEncoder, layer: int):
        self.encoder = encoder
        self.layer = layer

    def __call__(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(self.layer, batch_size)

    def __repr__(self) -> str:
        return f"PrefixHook(layer={self.layer}, prefix_length={self.encoder.prefix_length})"


def apply_prefix(model: nn.Module, prefix_length: int = 16, *, reparameterize: bool = False,
                 hidden_size: int = 512, trainable: Sequence[str] = ("head",)) -> int:
    """Install learned key/value prefixes of length ``prefix_length`` in every layer, in place; freeze the base.

    Parameters under ``trainable`` (dotted paths from ``model``, default a TaskModel's ``head``) stay
    trainable. Returns the number of prefix parameters added.
    """
    gpt = find_gpt(model)
    c = gpt.config
    weight = gpt.wte.weight
    encoder = PrefixEncoder(c.n_layer, c.n_head, c.head_dim, prefix_length, reparameterize=reparameterize,
                            hidden_size=hidden_size, device=weight.device, dtype=weight.dtype)
    start_strategy(gpt, "prefix", {"prefix_length": prefix_length, "reparameterize": reparameterize,
                                   "hidden_size": hidden_size})
    gpt.prefix_encoder = encoder
    for i, block in enumerate(gpt.blocks):
        block.attn.prefix = _LayerPrefix(encoder, i)
    freeze_base(model, trainable)
    n = sum(p.numel() for p in encoder.parameters())
    log.info("prefix-tuning: %d positions in %d layers, %d parameters", prefix_length, c.n_layer, n)
    return n


def fold_prefix(model: nn.Module) -> nn.Module:
    """Fold a reparameterised prefix into its table (see :meth:`PrefixEncoder.fold`), in place."""
    gpt = find_gpt(model)
    encoder = getattr(gpt, "prefix_encoder", None)
    if encoder is None:
        raise ConfigError("the model has no prefix to fold")
    encoder.fold()
    gpt.peft_config["reparameterize"] = False
    return model


def _is_prefix_key(name: str) -> bool:
    return name.split(".", 1)[0] == "prefix_encoder"


def prefix_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the prefix tensors (``prefix_encoder.*``), keyed relative to the GPT."""
    return peft_state_dict(model, _is_prefix_key)


def save_prefix(model: nn.Module, path: str | Path, config: Optional[dict[str, Any]] = None) -> Path:
    """Write the adapter folder (kind ``prefix``, its settings); ``config`` is extra metadata."""
    return save_folder(model, path, "prefix", prefix_state_dict(model), config)


def load_prefix(model: nn.Module, path: str | Path) -> nn.Module:
    """Install a prefix as recorded in the folder at ``path`` (unless already installed) and load it."""
    config, state = read_folder(path, "prefix")
    if needs_apply(model, "prefix"):
        if "prefix_length" not in config:
            raise CheckpointError(f"adapter config in {path} lacks 'prefix_length'")
        apply_prefix(model, int(config["prefix_length"]), reparameterize=bool(config.get("reparameterize", False)),
                     hidden_size=int(config.get("hidden_size", 512)))
    copy_into(model, prefix_state_dict(model), state, path)
    return model
