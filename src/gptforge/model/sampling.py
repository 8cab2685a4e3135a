"""The draw itself: inverse-CDF sampling from probabilities, and a seeded draw from logits.

:mod:`gptforge.generate.sampler` is the one place that turns logits (or a screened LM head) into tokens and
re-exports these two; they sit here, below every layer that draws, because a prepared LM head's screen
(:mod:`gptforge.backends.cpu.screen`) falls back to :func:`draw_from_logits` for the rows it cannot settle and may not
import :mod:`gptforge.generate`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

__all__ = ["draw_from_logits", "sample"]


def sample(probs: torch.Tensor, generators: Optional[Sequence[torch.Generator]] = None) -> torch.Tensor:
    """One token per row drawn from ``probs`` (B, V), each row with its own generator if given, (B,).

    Inverse-CDF sampling: one uniform number per row against the running sum of the row (in float64).
    ``torch.multinomial`` draws from the same distribution but spends about 1.3 ms on a 50k-token row on a
    CPU (it generates one exponential variate per token); this takes about 0.1 ms. Rows need not sum to 1.
    """
    B, V = probs.shape
    cdf = probs.cumsum(-1, dtype=torch.float64)  # (B, V)
    if generators is None:
        u = torch.rand(B, 1, dtype=torch.float64, device=probs.device)
    else:
        u = torch.cat([torch.rand(1, 1, dtype=torch.float64, device=probs.device, generator=g) for g in generators])
    # The first index whose running sum exceeds u·total: a token of probability 0 never qualifies.
    tokens = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=V - 1).squeeze(-1)  # (B,)
    zero = probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) <= 0
    if bool(zero.any()):  # u·total rounded up to the total: take the row's last token of nonzero probability
        last = V - 1 - (probs.flip(-1) > 0).to(torch.uint8).argmax(-1)
        tokens = torch.where(zero, last, tokens)
    return tokens


def draw_from_logits(logits: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor,
                     suppress: torch.Tensor) -> torch.Tensor:
    """One draw a row from ``softmax(logits / temperature)``, (B,), with ``suppress[r]`` (>= 0) excluded, each
    row with a generator seeded by ``seeds[r]`` (how :func:`gptforge.generate.sampler.sample_tokens` draws
    from logits)."""
    logits = logits.float() / temperature.to(logits.device, torch.float32).unsqueeze(1)
    banned = suppress.to(logits.device)
    keep = banned >= 0
    logits[torch.arange(logits.shape[0], device=logits.device)[keep], banned[keep]] = float("-inf")
    generators = [torch.Generator(device=logits.device).manual_seed(int(seed)) for seed in seeds.tolist()]
    return sample(logits.softmax(-1), generators)
