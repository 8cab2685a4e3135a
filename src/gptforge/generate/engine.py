"""Autoregressive decoding with a preallocated KV cache: prefill the prompts once, then one token a step.

The one decode engine. A :class:`SequenceState` is one sequence being decoded (its parameters, penalties'
history, generator, tokens, log-probabilities, text and why it ended); :meth:`Decoder.step` chooses every
unfinished sequence's next token from the forward's last position (through :mod:`gptforge.generate.sampler`)
and records it. :func:`generate`, :func:`stream` (and so chat) run it over a left-padded
:class:`~gptforge.generate.batch.PromptBatch`; the server's scheduler (:mod:`gptforge.serve.scheduler`) runs it
over its continuous batch, and speculative decoding records its tokens in a :class:`SequenceState`.

Many prompts decode together; each row gives the tokens it would give alone, because sampling draws every
row from its own generator. A finished row is no longer read; the loop ends when every row is finished. Per
step the Python work is proportional to the batch, never to the length generated so far.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch

from ..backends import decode_session
from ..config import GenerateConfig
from ..errors import ConfigError
from ..model import GPT
from ..tokenizer import Tokenizer
from .batch import Completion, FinishReason, PromptBatch, check_context
from .beam import beam_search
from .processors import TokenHistory
from .sampler import make_generator, next_tokens, screened, token_logprobs
from .stopping import TextTracker

log = logging.getLogger(__name__)

__all__ = ["Completion", "Decoder", "FinishReason", "SequenceState", "Stream", "TokenChoice", "check_context",
           "encode_prompt", "generate", "generate_ids", "generate_tokens", "stream", "stream_ids"]


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
    if config.bad_words and tokenizer is None:
        raise ConfigError("banned phrases (bad_words) are matched on the text and need a tokenizer; pass tokenizer=")
    if prompts_ids:  # an unset max_new_tokens: what the longest prompt leaves (an empty prompt fails later)
        config = config.for_prompt(max(len(ids) for ids in prompts_ids), model.config.block_size)
    if config.num_beams > 1:
        return beam_search(model, prompts_ids, config, eos_id, tokenizer=tokenizer)
    n = config.num_return_sequences
    # Row r draws with seed + r: a row's tokens do not depend on the rows beside it.
    states = [SequenceState(ids, config, model, eos_id=eos_id, tokenizer=tokenizer,
                            seed=None if config.seed is None else config.seed + r)
              for r, ids in enumerate(ids for ids in prompts_ids for _ in range(n))]
    for _ in _decode(model, states, config):
        pass
    results = [state.result() for state in states]
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

    def __init__(self, state: "SequenceState", steps: Iterator[list[str]]):
        self._state = state
        self._steps = steps
        self.completion: Optional[Completion] = None

    def __iter__(self) -> Iterator[str]:
        for pieces in self._steps:
            if pieces[0]:
                yield pieces[0]
        self.completion = self._state.result()


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
    config = config.for_prompt(len(prompt_ids), model.config.block_size)  # fails here, before any output
    state = SequenceState(prompt_ids, config, model, eos_id=tokenizer.eos_id, tokenizer=tokenizer, seed=config.seed)
    return Stream(state, _decode(model, [state], config))


# --------------------------------------------------------------------------------------------------
@dataclass
class TokenChoice:
    """What one step decided for one sequence."""

    token_id: int
    """The chosen token (an end-of-text token too, though the sequence's tokens leave it out)."""
    text: str
    """The text it decides (possibly empty; see :class:`Stream`)."""
    logprob: Optional[float] = None
    """Its log-probability, when the sequence's config asks for log-probabilities."""
    top_logprobs: Optional[list[tuple[int, float]]] = None
    """The most likely (token_id, log-probability) pairs, as many as config.logprobs."""
    finish_reason: Optional[FinishReason] = None
    """Set when this token ended the sequence."""


class SequenceState:
    """One sequence being decoded: its parameters, the history its penalties read, its generator, and its
    output so far (tokens, log-probabilities, text) and why it ended. What :func:`~gptforge.generate.sampler.
    next_tokens` reads of a row. ``seed`` seeds its own generator (None: the global RNG); ``tokenizer``
    (optional) decodes its text and applies the stop strings."""

    def __init__(self, prompt_ids: Sequence[int], config: GenerateConfig, model: GPT, *,
                 eos_id: Optional[int] = None, tokenizer: Optional[Tokenizer] = None, seed: Optional[int] = None):
        device = model.wte.weight.device
        self.prompt_ids = list(prompt_ids)
        if config.max_new_tokens is None:  # as many as the context leaves this prompt
            config = config.for_prompt(len(self.prompt_ids), model.config.block_size)
        self.config = config
        self.eos_id = None if config.ignore_eos else eos_id
        self.history = TokenHistory([self.prompt_ids], model.config.vocab_size, config, device, tokenizer)
        self.generator = make_generator(seed, device)
        self.steps = 0  # tokens chosen, an ending end-of-text token included
        self.token_ids: list[int] = []
        self.logprobs: Optional[list[float]] = [] if config.logprobs else None
        self.top_logprobs: Optional[list[list[tuple[int, float]]]] = [] if config.logprobs else None
        self.text = TextTracker(tokenizer, self.prompt_ids, config.stop) if tokenizer is not None else None
        self.finish_reason: Optional[FinishReason] = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def add(self, token: int, logprob: Optional[float] = None,
            top: Optional[list[tuple[int, float]]] = None) -> TokenChoice:
        """Record the next token; what it decides (its text, and the finish reason when it ends the sequence:
        end-of-text, a stop string, or max_new_tokens)."""
        self.steps += 1
        if token == self.eos_id:
            return TokenChoice(token, self._finish(FinishReason.EOS), logprob, top, FinishReason.EOS)
        self.token_ids.append(token)
        if self.logprobs is not None:
            self.logprobs.append(logprob)
            self.top_logprobs.append(top)
        piece = self.text.push(token) if self.text is not None else ""
        if self.text is not None and self.text.stopped:
            self.finish_reason = FinishReason.STOP
        elif self.steps >= self.config.max_new_tokens:
            piece += self._finish(FinishReason.LENGTH)
        return TokenChoice(token, piece, logprob, top, self.finish_reason)

    def _finish(self, reason: FinishReason) -> str:
        """End the sequence; the text held back until now (an unfinished character, a partial stop string)."""
        self.finish_reason = reason
        return self.text.finish() if self.text is not None else ""

    def result(self) -> Completion:
        return Completion(token_ids=self.token_ids, text=self.text.text if self.text is not None else "",
                          finish_reason=self.finish_reason or FinishReason.LENGTH, prompt_tokens=len(self.prompt_ids),
                          logprobs=self.logprobs, top_logprobs=self.top_logprobs)


class Decoder:
    """Chooses and records the next token of many sequences, each under its own parameters, from one forward
    over all of them. The caller owns the batch layout (a :class:`~gptforge.generate.batch.PromptBatch`, or
    the server's continuous batch) and runs :meth:`forward` on it; :meth:`step` does the rest."""

    def __init__(self, model: GPT):
        self.model = model
        self.screened = screened(model)
        """Whether the forward stops at the final hidden states (a screened LM head chooses from them)."""

    def forward(self, idx: torch.Tensor, **kwargs) -> torch.Tensor:
        """The model on ``idx`` (B, T) (``kwargs``: kv_cache, attention_mask, position_ids), up to what
        :meth:`step` takes, at the last position: final hidden states (B, C) under a screened LM head, else
        logits (B, V)."""
        if self.screened:
            return self.model.hidden_states(idx, **kwargs)[:, -1]
        return self.model(idx, last_only=True, **kwargs)[:, -1]

    def step(self, states: Sequence[SequenceState], out: torch.Tensor) -> list[Optional[TokenChoice]]:
        """Choose, record and return each unfinished sequence's next token (None for a finished one) from
        ``out``, the forward's last position for each of ``states`` (see :meth:`forward`)."""
        active = [i for i, state in enumerate(states) if not state.done]
        rows = list(states) if len(active) == len(states) else [states[i] for i in active]
        if len(active) != len(states):
            out = out[active]
        tokens, logits, logit_rows = next_tokens(self.model, rows, out)
        token_list = tokens.tolist()
        logprobs = _logprobs(rows, tokens, logits, logit_rows)
        choices: list[Optional[TokenChoice]] = [None] * len(states)
        for j, (i, state) in enumerate(zip(active, rows)):
            if state.history.tracking:
                state.history.append(tokens[j:j + 1], token_list[j:j + 1])
            choices[i] = state.add(token_list[j], *logprobs[j])
        return choices


def _logprobs(rows: list[SequenceState], tokens: torch.Tensor, logits: Optional[torch.Tensor],
              logit_rows: list[int]) -> list[tuple[Optional[float], Optional[list[tuple[int, float]]]]]:
    """Each row's (log-probability, top alternatives) of its chosen token, (None, None) where its config does
    not ask for them; ``logits`` (r, V) are those of rows ``logit_rows``. Rows asking for as many alternatives
    are read in one call."""
    found: list = [(None, None)] * len(rows)
    groups: dict[int, list[int]] = {}
    for j, row in enumerate(rows):
        if row.config.logprobs:
            groups.setdefault(row.config.logprobs, []).append(j)
    if not groups:
        return found
    where = {j: k for k, j in enumerate(logit_rows)}
    for top_n, members in groups.items():
        index = [where[j] for j in members]
        some = logits if index == list(range(len(logit_rows))) else logits[index]
        chosen, top_ids, top_logp = token_logprobs(some, tokens if len(members) == len(rows) else tokens[members],
                                                   top_n)
        for j, lp, ids, values in zip(members, chosen.tolist(), top_ids.tolist(), top_logp.tolist()):
            found[j] = (lp, list(zip(ids, values)))
    return found


def _decode(model: GPT, states: list[SequenceState], config: GenerateConfig) -> Iterator[list[str]]:
    """Decode ``states`` (prompts of one config) together; after each step, yield the text each gained."""
    with decode_session(model):
        yield from _decode_steps(model, states, config)


@torch.inference_mode()  # as a decorator: the consumer's code between steps runs outside it
def _decode_steps(model: GPT, states: list[SequenceState], config: GenerateConfig) -> Iterator[list[str]]:
    batch = PromptBatch(model, [state.prompt_ids for state in states], config)
    decoder = Decoder(model)
    # Under a screened LM head the steps stop at the final hidden states, from which the sampler forms the
    # logits only for the rows that need them.
    out = batch.prefill_hidden() if decoder.screened else batch.prefill()
    while True:
        choices = decoder.step(states, out)
        yield [choice.text if choice is not None else "" for choice in choices]
        if all(state.done for state in states):
            return
        # A finished row's input no longer matters (no row's result depends on another's).
        tokens = torch.tensor([choice.token_id if choice is not None else 0 for choice in choices],
                              dtype=torch.long, device=batch.idx.device)
        out = batch.decode_hidden(tokens) if decoder.screened else batch.decode(tokens)
