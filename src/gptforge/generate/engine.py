"""Autoregressive decoding with a preallocated KV cache: prefill the prompt once, then one token a step."""

from __future__ import annotations

import logging
from typing import Callable, Iterator, Optional, Sequence

import torch

from ..config import GenerateConfig
from ..errors import ConfigError
from ..model import GPT
from ..tokenizer import IncrementalDecoder, Tokenizer
from .sampling import sample_next

log = logging.getLogger(__name__)


def check_context(model: GPT, prompt_len: int, max_new_tokens: int) -> None:
    block = model.config.block_size
    if prompt_len + max_new_tokens > block:
        raise ConfigError(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) is longer than the model's "
            f"context of {block} tokens; shorten the prompt or lower max_new_tokens"
        )


def encode_prompt(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """The prompt's ids; an empty prompt starts from the end-of-text token, as GPT-2 does."""
    ids = tokenizer.encode(prompt)
    if not ids:
        if tokenizer.eos_id is None:
            raise ConfigError("the prompt is empty and the tokenizer has no end-of-text token to start from")
        ids = [tokenizer.eos_id]
    return ids


def _make_generator(device: torch.device, seed: Optional[int]) -> Optional[torch.Generator]:
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


@torch.inference_mode()
def iter_tokens(model: GPT, prompt_ids: Sequence[int], config: GenerateConfig,
                eos_id: Optional[int] = None) -> Iterator[torch.Tensor]:
    """Yield the next token of every sample, (num_samples,), one step at a time.

    A sample that has produced ``eos_id`` keeps yielding ``eos_id``; iteration ends when all have, or
    after ``max_new_tokens`` steps.
    """
    config.validate()
    if len(prompt_ids) == 0:
        raise ConfigError("the prompt has no tokens")
    check_context(model, len(prompt_ids), config.max_new_tokens)
    device = model.wte.weight.device
    B = config.num_samples
    idx = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device).expand(B, -1)
    cache = model.new_kv_cache(B, len(prompt_ids) + config.max_new_tokens)
    generator = _make_generator(device, config.seed)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    logits = model(idx, kv_cache=cache, last_only=True)[:, -1]  # prefill, (B, V)
    for step in range(config.max_new_tokens):
        token = sample_next(logits, temperature=config.temperature, top_k=config.top_k,
                            top_p=config.top_p, generator=generator)
        if eos_id is not None:
            token = token.masked_fill(done, eos_id)
            done |= token == eos_id
        yield token
        if step + 1 == config.max_new_tokens or (eos_id is not None and bool(done.all())):
            return
        logits = model(token.unsqueeze(1), kv_cache=cache)[:, -1]


def generate_tokens(model: GPT, prompt_ids: Sequence[int], config: GenerateConfig,
                    eos_id: Optional[int] = None) -> list[list[int]]:
    """New token ids for each of ``config.num_samples`` samples (EOS, if produced, ends a sample and is dropped)."""
    rows: list[list[int]] = [[] for _ in range(config.num_samples)]
    finished = [False] * config.num_samples
    for token in iter_tokens(model, prompt_ids, config, eos_id):
        for i, t in enumerate(token.tolist()):
            if finished[i]:
                continue
            if eos_id is not None and t == eos_id:
                finished[i] = True
            else:
                rows[i].append(t)
    return rows


def generate_text(model: GPT, tokenizer: Tokenizer, prompt: str, config: GenerateConfig) -> list[str]:
    """The generated continuation (without the prompt) for each sample."""
    ids = encode_prompt(tokenizer, prompt)
    return [tokenizer.decode(row) for row in generate_tokens(model, ids, config, tokenizer.eos_id)]


def stream_text(model: GPT, tokenizer: Tokenizer, prompt: str, config: GenerateConfig,
                on_token: Optional[Callable[[int], None]] = None) -> Iterator[str]:
    """Yield the continuation of one sample as text pieces, as soon as each piece is decided.

    Pieces never split a multi-byte character; concatenated they equal ``generate_text``'s result.
    """
    if config.num_samples != 1:
        raise ConfigError("streaming produces one sample; set num_samples to 1")
    ids = encode_prompt(tokenizer, prompt)
    decoder = IncrementalDecoder(tokenizer, ids)
    for token in iter_tokens(model, ids, config, tokenizer.eos_id):
        t = int(token[0])
        if t == tokenizer.eos_id:
            break
        if on_token is not None:
            on_token(t)
        piece = decoder.push(t)
        if piece:
            yield piece
    tail = decoder.flush()
    if tail:
        yield tail
