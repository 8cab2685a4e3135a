"""Pure sampling functions: logits → filtered logits → probabilities → next token.

Each takes and returns tensors of shape (B, V) so they compose, batch, and can be tested one by one
against other implementations.
"""

from __future__ import annotations

from typing import Optional

import torch


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits / temperature if temperature != 1.0 else logits


def top_k_filter(logits: torch.Tensor, k: Optional[int]) -> torch.Tensor:
    """Keep the k largest logits of each row (ties at the k-th value are kept); the rest become -inf."""
    if k is None or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: Optional[float]) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probabilities add up to at least p."""
    if p is None or p >= 1.0:
        return logits
    sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    # Drop a token when the tokens before it already reach p; the most likely token always stays.
    drop_sorted = (cum - sorted_logits.softmax(-1)) >= p
    drop = drop_sorted.scatter(-1, sorted_idx, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def filter_logits(logits: torch.Tensor, *, temperature: float = 1.0, top_k: Optional[int] = None,
                  top_p: Optional[float] = None) -> torch.Tensor:
    """Temperature, then top-k, then top-p (the order Hugging Face applies them in)."""
    logits = apply_temperature(logits.float(), temperature)
    logits = top_k_filter(logits, top_k)
    return top_p_filter(logits, top_p)


def sample_next(logits: torch.Tensor, *, temperature: float, top_k: Optional[int] = None,
                top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One next token per row, (B,). Temperature 0 is greedy (argmax)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p).softmax(-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
