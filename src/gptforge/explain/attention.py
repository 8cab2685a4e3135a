"""Attention of one token sequence: every layer's and head's probabilities, and attention rollout.

The probabilities come from the model's recorded eager attention (:func:`gptforge.model.recording.
recording_attention`), one full forward over the tokens; nothing here touches the normal path.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from ..model.recording import prefix_length, recording_attention


@torch.no_grad()
def attention_maps(model: nn.Module, ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(the model's output on ``ids``, the attention probabilities (L, H, T, T) in float32 on the CPU).

    ``model`` is a GPT (output: logits (1, T, V)) or a task model around one (its own output). A prefix-tuned
    model's learned prefix keys are left out of the maps (they are no tokens); their rows then sum to the
    share of attention the tokens got."""
    device = next(model.parameters()).device
    idx = torch.tensor([list(ids)], dtype=torch.long, device=device)
    with recording_attention(model) as layers:
        out = model(idx)
    P = prefix_length(model)
    maps = torch.stack([probs[0, :, :, P:].float().cpu() for probs in layers])  # (L, H, T, T)
    return out, maps


def attention_rollout(maps: torch.Tensor) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020) of maps (L, H, T, T): per layer the heads' mean plus the
    identity (the residual connection), rows normalised to sum to 1, multiplied through the layers from the
    first; entry (i, j) is how much of token i's last-layer state traces back to input token j."""
    L, _, T, _ = maps.shape
    eye = torch.eye(T, dtype=torch.float64)
    rollout = eye
    for layer in maps.double():
        a = layer.mean(dim=0) + eye  # (T, T)
        a = a / a.sum(dim=-1, keepdim=True)
        rollout = a @ rollout
    return rollout.float()


__all__ = ["attention_maps", "attention_rollout"]
