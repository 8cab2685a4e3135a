"""Autoregressive decoding with a preallocated KV cache: prefill the prompts once, then one token a step.

Many prompts decode together, left-padded (see :class:`~gptforge.generate.batch.PromptBatch`); each row gives
the tokens it would give alone, because sampling draws every row from its own generator. A finished row is
no longer read; the loop ends when every row is finished. Per step the Python work is proportional to the
batch, never to the length generated so far.
"""

from __future__ import annotations

import logging
from typing import Iterator, Optional, Sequence

import torch

from ..backends import decode_session
from ..config import GenerateConfig
from ..errors import ConfigError
from ..model import GPT
from ..tokenizer import Tokenizer
from .batch import Completion, PromptBatch, check_context
from .beam import beam_search
from .processors import TokenHistory, argmax_only, process_logits, sample_only
from .sampling import choose_tokens, make_generators, token_logprobs
from .stopping import TextTracker

log = logging.getLogger(__name__)

__all__ = ["Completion", "Stream", "check_context", "encode_prompt", "generate", "generate_ids",
           "generate_tokens", "stream", "stream_ids"]


def encode_prompt(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """The prompt's ids; an empty prompt starts from the end-of-text token, as GPT-2 does."""
    ids = tokenizer.encode(prompt)
    if not ids:
        if tokenizer.eos_id is None:
            raise ConfigError("the prompt is empty and the tokenizer has no end-of-text token to start from")
        ids = [tokenizer.eos_id]
    return ids


# --------------------------------------------------------------------------------------------------
# Public API
def generate(model: GPT, tokenizer: Tokenizer, prompts: Sequence[str] | str,
             config: GenerateConfig) -> list[list[Completion]]:
    """Continue each prompt; for each, ``config.num_return_sequences`` completions (text and tokens)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    ids = [encode_prompt(tokenizer, p) for p in prompts]
    return generate_ids(model, ids, config, tokenizer.eos_id, tokenizer=tokenizer)


def generate_ids(model: GPT, prompts_ids: Sequence[Sequence[int]], config: GenerateConfig,
                 eos_id: Optional[int] = None, *, tokenizer: Optional[Tokenizer] = None) -> list[list[Completion]]:
    """Token-level :func:`generate`: completions per prompt; text only when a ``tokenizer`` is given."""
    config.validate()
    if config.stop and tokenizer is None:
        raise ConfigError("stop strings need a tokenizer to decode the output; pass tokenizer=")
    if config.num_beams > 1:
        return beam_search(model, prompts_ids, config, eos_id, tokenizer=tokenizer)
    n = config.num_return_sequences
    rows = [_Row(ids, config, eos_id, tokenizer) for ids in prompts_ids for _ in range(n)]
    for _ in _decode(model, rows, config, eos_id):
        pass
    results = [row.result() for row in rows]
    return [results[i:i + n] for i in range(0, len(results), n)]


def generate_tokens(model: GPT, prompt_ids: Sequence[int], config: GenerateConfig,
                    eos_id: Optional[int] = None) -> list[list[int]]:
    """New token ids for each returned sequence of one prompt (an ending EOS is dropped)."""
    return [c.token_ids for c in generate_ids(model, [prompt_ids], config, eos_id)[0]]


class Stream:
    """Text pieces of one completion as they are decided; afterwards :attr:`completion` holds the result.

    Pieces never split a multi-byte character and never show text that becomes part of a stop string;
    concatenated, they equal ``completion.text``.
    """

    def __init__(self, row: "_Row", steps: Iterator[list[str]]):
        self._row = row
        self._steps = steps
        self.completion: Optional[Completion] = None

    def __iter__(self) -> Iterator[str]:
        for pieces in self._steps:
            if pieces[0]:
                yield pieces[0]
        self.completion = self._row.result()


def stream(model: GPT, tokenizer: Tokenizer, prompt: str, config: GenerateConfig) -> Stream:
    """Generate one completion of ``prompt``, yielding its text piece by piece (see :class:`Stream`)."""
    return stream_ids(model, tokenizer, encode_prompt(tokenizer, prompt), config)


def stream_ids(model: GPT, tokenizer: Tokenizer, prompt_ids: Sequence[int], config: GenerateConfig) -> Stream:
    """:func:`stream` from token ids (a rendered chat prompt holds end-of-text ids no string can carry)."""
    config.validate()
    if config.num_beams > 1:
        raise ConfigError("streaming is not supported with beam search; use num_beams=1")
    if config.num_return_sequences != 1:
        raise ConfigError("streaming produces one sequence; set num_return_sequences to 1")
    row = _Row(prompt_ids, config, tokenizer.eos_id, tokenizer)
    return Stream(row, _decode(model, [row], config, tokenizer.eos_id))


# --------------------------------------------------------------------------------------------------
class _Row:
    """The output of one row: tokens, log-probabilities, text, and why it ended."""

    def __init__(self, prompt_ids: Sequence[int], config: GenerateConfig, eos_id: Optional[int],
                 tokenizer: Optional[Tokenizer]):
        self.prompt_ids = list(prompt_ids)
        self.eos_id = None if config.ignore_eos else eos_id
        self.token_ids: list[int] = []
        self.logprobs: Optional[list[float]] = [] if config.logprobs else None
        self.top_logprobs: Optional[list[list[tuple[int, float]]]] = [] if config.logprobs else None
        self.text = TextTracker(tokenizer, self.prompt_ids, config.stop) if tokenizer is not None else None
        self.finish_reason: Optional[str] = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def add(self, token: int, logprob: Optional[float] = None,
            top: Optional[list[tuple[int, float]]] = None) -> str:
        """Append a token; return the text it decides (possibly empty)."""
        if token == self.eos_id:
            return self.finish("eos")
        self.token_ids.append(token)
        if self.logprobs is not None:
            self.logprobs.append(logprob)
            self.top_logprobs.append(top)
        if self.text is None:
            return ""
        piece = self.text.push(token)
        if self.text.stopped:
            self.finish_reason = "stop"
        return piece

    def finish(self, reason: str) -> str:
        self.finish_reason = reason
        return self.text.finish() if self.text is not None else ""

    def result(self) -> Completion:
        return Completion(token_ids=self.token_ids, text=self.text.text if self.text is not None else "",
                          finish_reason=self.finish_reason or "length", prompt_tokens=len(self.prompt_ids),
                          logprobs=self.logprobs, top_logprobs=self.top_logprobs)


def _decode(model: GPT, rows: list[_Row], config: GenerateConfig, eos_id: Optional[int]) -> Iterator[list[str]]:
    """Greedy or sampled decoding of ``rows``; after each step, yield the text each row gained."""
    with decode_session(model):
        yield from _decode_steps(model, rows, config, eos_id)


@torch.inference_mode()  # as a decorator: the consumer's code between steps runs outside it
def _decode_steps(model: GPT, rows: list[_Row], config: GenerateConfig,
                  eos_id: Optional[int]) -> Iterator[list[str]]:
    batch = PromptBatch(model, [row.prompt_ids for row in rows], config)
    device = batch.idx.device
    history = TokenHistory([row.prompt_ids for row in rows], model.config.vocab_size, config, device)
    generators = make_generators(config.seed, len(rows), device)
    suppressible_eos = None if config.ignore_eos else eos_id
    # A screened LM head (prepared CPU float32 models, gptforge.inference.ArgmaxScreen) chooses plain greedy
    # and plain sampled tokens without forming the logits: the same argmax; draws from the same softmax
    # (the logits are formed besides only for log-probabilities).
    screened = "argmax" if batch.screened and argmax_only(config, history) else (
        "sample" if batch.screened and sample_only(config, history) else None)

    def pick(hidden: torch.Tensor, step: int) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        """(logits if log-probabilities need them, the tokens the screen chooses) from final hidden states."""
        suppress = suppressible_eos if step < config.min_new_tokens else None
        logits = model.logits(hidden.unsqueeze(1))[:, 0] if config.logprobs else None
        if screened == "argmax":
            return logits, model.greedy_tokens(hidden, suppress)
        return logits, model.sample_tokens(hidden, config.temperature, generators, suppress)

    logits: Optional[torch.Tensor] = None  # (B, V), when the step needs them
    chosen: Optional[torch.Tensor] = None  # (B,), when the screen chose
    if screened:
        logits, chosen = pick(batch.prefill_hidden(), 0)
    else:
        logits = batch.prefill()
    for step in range(config.max_new_tokens):
        if chosen is None:
            scores = process_logits(logits.float(), history, config, step=step, eos_id=suppressible_eos)
            tokens = choose_tokens(scores, config, generators)  # (B,)
        else:
            tokens = chosen
        token_list = tokens.tolist()
        pieces = _record(rows, token_list, tokens, logits, config.logprobs)
        if step + 1 == config.max_new_tokens:
            pieces = [p + row.finish("length") if not row.done else p for p, row in zip(pieces, rows)]
        yield pieces
        if all(row.done for row in rows):
            return
        history.append(tokens, token_list)
        if screened:
            logits, chosen = pick(batch.decode_hidden(tokens), step + 1)
        else:
            logits = batch.decode(tokens)


def _record(rows: list[_Row], token_list: list[int], tokens: torch.Tensor, logits: torch.Tensor,
            top_n: int) -> list[str]:
    """Hand each unfinished row its token (and log-probabilities); the text each row gained."""
    chosen: list = [None] * len(rows)
    tops: list = [None] * len(rows)
    if top_n:
        logp, top_ids, top_logp = token_logprobs(logits, tokens, top_n)
        chosen = logp.tolist()
        tops = [list(zip(i, v)) for i, v in zip(top_ids.tolist(), top_logp.tolist())]
    return [row.add(t, lp, top) if not row.done else ""
            for row, t, lp, top in zip(rows, token_list, chosen, tops)]
