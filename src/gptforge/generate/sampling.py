"""Pure sampling functions: logits → filtered logits → probabilities → next token.

Each takes and returns tensors of shape (B, V) or (B,) so they compose, batch, and can be tested one by one
against other implementations. Reproducible sampling uses one ``torch.Generator`` per row, so a row draws the
same tokens whether it is decoded alone or inside a batch.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..config import GenerateConfig
from ..model.sampling import sample
from .processors import apply_temperature, min_p_filter, top_k_filter, top_p_filter, warp_logits

__all__ = ["apply_temperature", "top_k_filter", "top_p_filter", "min_p_filter", "filter_logits",
           "logits_to_probs", "make_generators", "sample", "choose_tokens", "token_logprobs", "sample_next"]


def filter_logits(logits: torch.Tensor, *, temperature: float = 1.0, top_k: Optional[int] = None,
                  top_p: Optional[float] = None, min_p: Optional[float] = None) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p (the order Hugging Face applies them in)."""
    config = GenerateConfig(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    return warp_logits(logits.float(), config)


def logits_to_probs(logits: torch.Tensor, config: GenerateConfig) -> torch.Tensor:
    """The distribution sampling draws from, (B, V)."""
    return warp_logits(logits.float(), config).softmax(-1)


def make_generators(seed: Optional[int], rows: int, device: torch.device) -> Optional[list[torch.Generator]]:
    """One generator per row, seeded ``seed + row``; None (the global RNG) without a seed."""
    if seed is None:
        return None
    return [torch.Generator(device=device).manual_seed(seed + row) for row in range(rows)]


def choose_tokens(logits: torch.Tensor, config: GenerateConfig,
                  generators: Optional[Sequence[torch.Generator]] = None) -> torch.Tensor:
    """The next token of each row, (B,): argmax at temperature 0, else a sample from the warped distribution."""
    if config.temperature == 0:
        return logits.argmax(dim=-1)
    return sample(logits_to_probs(logits, config), generators)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor,
                   top_n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The model's log-probability of each chosen token (B,) and its ``top_n`` best alternatives (B, n) × 2.

    Read from the model's own distribution (before penalties and warpers), as OpenAI's API reports them.
    """
    logp = logits.float().log_softmax(-1)
    chosen = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    top = torch.topk(logp, min(top_n, logp.size(-1)), dim=-1)
    return chosen, top.indices, top.values


def sample_next(logits: torch.Tensor, *, temperature: float, top_k: Optional[int] = None,
                top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One next token per row, (B,), drawing every row from one generator. Temperature 0 is greedy (argmax)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p).softmax(-1)
    return sample(probs, None if generator is None else [generator] * probs.shape[0])
