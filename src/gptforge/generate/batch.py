"""What every decoding strategy shares: the result type and a left-padded batch with its KV cache."""

from __future__ import annotations

import dataclasses
import enum
import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..config import GenerateConfig, resolve_max_new_tokens
from ..errors import ConfigError
from ..model import GPT

log = logging.getLogger(__name__)


class FinishReason(str, enum.Enum):
    """Why a sequence ended: the one vocabulary of the engine, beam search and the server's scheduler (the
    server reports OpenAI's names, where an end-of-text token is "stop" too). Members are strings, and
    print as their values (``enum.StrEnum`` would do this, but needs Python 3.11)."""

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__

    EOS = "eos"
    """The end-of-text token came."""
    STOP = "stop"
    """A stop string came."""
    LENGTH = "length"
    """max_new_tokens were generated."""
    CANCELLED = "cancelled"
    """The server dropped it: its client went away, its deadline passed, or the server is stopping."""
    ERROR = "error"
    """The server could not run it (its prefill failed)."""


@dataclass
class Completion:
    """One generated sequence for one prompt."""

    token_ids: list[int]
    """The new tokens (an end-of-text token that ended the sequence is not included)."""
    text: str
    """The decoded continuation, cut before a stop string; empty when no tokenizer was given."""
    finish_reason: FinishReason
    """"eos" (end-of-text token), "stop" (a stop string) or "length" (max_new_tokens reached)."""
    prompt_tokens: int
    """Number of tokens in the prompt."""
    logprobs: Optional[list[float]] = None
    """The model's log-probability of each token in token_ids (when config.logprobs > 0)."""
    top_logprobs: Optional[list[list[tuple[int, float]]]] = None
    """For each token, the config.logprobs most likely (token_id, log-probability) pairs."""
    score: Optional[float] = None
    """Beam search only: the length-penalized sum of log-probabilities the beam was ranked by."""

    def to_dict(self) -> dict:
        """Plain JSON-ready fields (what `gptforge generate --json` prints)."""
        return dataclasses.asdict(self)


def check_context(model: GPT, prompt_len: int, max_new_tokens: Optional[int]) -> int:
    """The new tokens a prompt of ``prompt_len`` tokens gets in the model's context (None: as many as fit, at
    most DEFAULT_MAX_NEW_TOKENS); ConfigError when they do not fit (:func:`~gptforge.config.resolve_max_new_tokens`)."""
    return resolve_max_new_tokens(max_new_tokens, prompt_len, model.config.block_size)


class PromptBatch:
    """Rows of different lengths, left-padded into one tensor, with a KV cache sized for the whole generation.

    ``attention_mask`` (B, prompt + max_new) marks real tokens; it is None when no row is padded, so the model
    keeps its fused causal kernel. Position ids count real tokens only, so a padded row sees the positions it
    would see alone.
    """

    def __init__(self, model: GPT, rows_ids: Sequence[Sequence[int]], config: GenerateConfig):
        if not rows_ids or any(len(ids) == 0 for ids in rows_ids):
            raise ConfigError("every prompt needs at least one token")
        lengths = [len(ids) for ids in rows_ids]
        width = max(lengths)
        max_new_tokens = check_context(model, width, config.max_new_tokens)
        device = model.wte.weight.device
        self.model = model
        self.forward = _decode_forward(model, config.compile)
        self.cache = model.new_kv_cache(len(rows_ids), width + max_new_tokens)
        self.idx = torch.tensor([[0] * (width - n) + list(ids) for ids, n in zip(rows_ids, lengths)],
                                dtype=torch.long, device=device)  # (B, width)
        self.attention_mask: Optional[torch.Tensor] = None
        if min(lengths) != width:
            mask = torch.ones(len(rows_ids), width + max_new_tokens, dtype=torch.long, device=device)
            for row, n in enumerate(lengths):
                mask[row, :width - n] = 0
            self.attention_mask = mask
        self.positions = torch.tensor(lengths, device=device).unsqueeze(1)  # (B, 1): the next token's position

    def prefill(self) -> torch.Tensor:
        """Run the prompts through the model; the logits for each row's first new token, (B, V)."""
        return self.model(self.idx, kv_cache=self.cache, attention_mask=self._mask(self.idx.shape[1]),
                          last_only=True)[:, -1]

    def prefill_hidden(self) -> torch.Tensor:
        """:meth:`prefill` up to the final hidden state of each row's last position, (B, C)."""
        hidden = self.model.hidden_states(self.idx, kv_cache=self.cache, attention_mask=self._mask(self.idx.shape[1]))
        return hidden[:, -1]

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row, (B,); the logits for the next, (B, V)."""
        return self._step(self.forward, tokens)[:, -1]

    def decode_hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """:meth:`decode` up to the final hidden states, (B, C)."""
        return self._step(self.model.hidden_states, tokens)[:, -1]

    def _mask(self, width: int) -> Optional[torch.Tensor]:
        """The attention mask's first ``width`` columns; None when no row is padded."""
        return None if self.attention_mask is None else self.attention_mask[:, :width]

    def _step(self, run, tokens: torch.Tensor) -> torch.Tensor:
        """``run`` (the model's forward, or its hidden_states) on one new token a row, (B,); then the
        positions move on."""
        out = run(tokens.unsqueeze(1), kv_cache=self.cache, attention_mask=self._mask(self.cache.length + 1),
                  position_ids=self.positions)
        self.positions = self.positions + 1
        return out

    def reorder(self, index: torch.Tensor) -> None:
        """Row i continues old row index[i] (beam search keeps rows within their prompt, so masks agree)."""
        self.cache.reorder(index)


def _decode_forward(model: GPT, compile: bool):
    if not compile:
        return model
    if model.wte.weight.device.type != "cuda":
        log.warning("compile is only used on CUDA; decoding on %s without torch.compile", model.wte.weight.device)
        return model
    # The cache length and the mask width change every step; dynamic shapes avoid a recompile per step.
    return torch.compile(model, dynamic=True)
