"""Attention probabilities on request: an eager attention step swapped in only inside :func:`recording_attention`.

The normal path never computes attention probabilities (SDPA and the backends' kernels fuse them away) and
this module adds no work to it: inside the context every block's ``attend`` (:class:`~gptforge.model.gpt.
Attention`, or whatever a backend swapped in) is replaced by :class:`RecordingAttention`, which computes
``softmax(q k^T / sqrt(D) + mask) v`` explicitly and keeps the probabilities; on exit (also on error) the
original modules go back. A backend's fused block stack (gptforge.backends.cpu.FusedDecodeBlocks) runs
only plain ``Attention`` / its own attention, so under recording it runs the model's own per-block loop.

Prefix-tuned models (gptforge.peft.prefix) are included as they compute: a layer's probabilities then cover
the ``P`` learned prefix keys first, then the tokens' keys, ``(B, H, T, P + S)``; :func:`prefix_length` says P.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .gpt import Attention, CausalSelfAttention
from .kv_cache import KVCache


class RecordingAttention(Attention):
    """Attention computed the textbook way, storing each call's probabilities (B, H, T, S) in
    ``store[slot]`` (detached, float32). Slower than SDPA; used only inside :func:`recording_attention`."""

    def __init__(self, store: list, slot: int):
        super().__init__()
        self.store = store
        self.slot = slot

    def forward(self, q, k, v, mask: Optional[torch.Tensor], kv_cache: Optional[KVCache], dropout_p: float):
        k, v = k.to(q.dtype), v.to(q.dtype)
        B, H, T, D = q.shape
        S = k.shape[2]
        scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(D)  # (B, H, T, S)
        allowed = _allowed(mask, kv_cache, B, T, S, q.device)
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        probs = scores.softmax(dim=-1)  # (B, H, T, S)
        self.store[self.slot] = probs.detach()
        if dropout_p > 0.0:
            probs = F.dropout(probs, dropout_p)
        return (probs.to(v.dtype) @ v).to(q.dtype)  # (B, H, T, D)


def _allowed(mask, kv_cache, B, T, S, device) -> Optional[torch.Tensor]:
    """Which keys each query may see, (B or 1, 1, T, S) bool, as :class:`Attention` reads its arguments."""
    if kv_cache is not None and kv_cache.row_starts is not None:  # ragged decode: row i sees keys from s_i on
        starts = torch.tensor(kv_cache.row_starts, device=device).view(B, 1, 1, 1)
        return torch.arange(S, device=device).view(1, 1, 1, S) >= starts
    if mask is not None:
        return mask
    if T == 1:
        return None  # one new token sees every key
    q_pos = torch.arange(S - T, S, device=device).view(T, 1)  # the T queries are the last T of the S keys
    return (torch.arange(S, device=device).view(1, S) <= q_pos).view(1, 1, T, S)


def attention_modules(model: nn.Module) -> list[CausalSelfAttention]:
    """The attention layers of ``model`` (a GPT or a model holding one, e.g. a TaskModel), in layer order."""
    return [m for m in model.modules() if isinstance(m, CausalSelfAttention)]


def prefix_length(model: nn.Module) -> int:
    """How many learned prefix keys each layer's recorded probabilities begin with (0 without prefix-tuning)."""
    for attn in attention_modules(model):
        if attn.prefix is not None:
            with torch.no_grad():
                k, _ = attn.prefix(1)
            return int(k.shape[2])
    return 0


@contextlib.contextmanager
def recording_attention(model: nn.Module) -> Iterator[list[Optional[torch.Tensor]]]:
    """Within the block, every forward of ``model`` records its attention probabilities: the yielded list
    holds one slot per layer, each the (B, H, T, S) probabilities of that layer's latest call (None before
    one). Run one full forward inside (``model(ids)``), then read the list. The model's own attention
    modules are put back on exit, also on error. Not for use while other threads run the same model."""
    layers = attention_modules(model)
    if not layers:
        raise ValueError("the model has no attention layers (CausalSelfAttention) to record")
    if any(isinstance(attn.attend, RecordingAttention) for attn in layers):
        raise RuntimeError("attention is already being recorded on this model")
    store: list[Optional[torch.Tensor]] = [None] * len(layers)
    originals = [attn.attend for attn in layers]
    try:
        for i, attn in enumerate(layers):
            attn.attend = RecordingAttention(store, i)
        yield store
    finally:
        for attn, original in zip(layers, originals):
            attn.attend = original


__all__ = ["RecordingAttention", "attention_modules", "prefix_length", "recording_attention"]
