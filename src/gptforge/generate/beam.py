"""Beam search with Hugging Face's semantics (length_penalty, early_stopping), on the static KV cache.

Each prompt keeps ``num_beams`` running beams. A step scores every (beam, token) continuation by its summed
log-probability, takes the best ``2 * num_beams`` candidates (so that enough remain after some end), sends
those among the best ``num_beams`` that end (end-of-text, or the length limit) to the prompt's pool of
finished hypotheses, ranked by ``sum_logprob / length ** length_penalty``, and continues the best
``num_beams`` that did not end. A prompt is done when its pool is full and either ``early_stopping`` is set
or the best running beam can no longer beat the worst finished one (Hugging Face's heuristic). Tokens are
recovered at the end from per-step back-pointers, so no step copies the beams' histories.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..config import GenerateConfig
from ..errors import ConfigError
from ..model import GPT
from ..tokenizer import Tokenizer
from .batch import Completion, FinishReason, PromptBatch
from .processors import TokenHistory, process_logits

# Hugging Face marks impossible beams with this score rather than -inf; kept for identical tie-breaking.
_UNREACHABLE = -1.0e9


class Hypotheses:
    """The finished hypotheses of one prompt (at most ``num_beams``), best first."""

    def __init__(self, num_beams: int, early_stopping: bool):
        self.num_beams = num_beams
        self.early_stopping = early_stopping
        self.items: list[tuple[float, int, int]] = []  # (score, step, candidate index)
        self.improvable = True  # can a running beam still beat the worst finished one?

    @property
    def full(self) -> bool:
        return len(self.items) == self.num_beams

    @property
    def done(self) -> bool:
        return not self.improvable or (self.full and self.early_stopping)

    def add(self, new: list[tuple[float, int, int]]) -> None:
        # Stable sort: on equal scores the older hypothesis stays ahead, as in Hugging Face.
        merged = self.items + [item for item in new if item[0] > _UNREACHABLE]
        self.items = sorted(merged, key=lambda item: -item[0])[:self.num_beams]

    def update_improvable(self, best_running_score: float) -> None:
        """Hugging Face's stopping heuristic: the best running beam, scored at its current length."""
        if self.improvable and self.full:
            self.improvable = best_running_score > min(score for score, _, _ in self.items)


class _Trace:
    """Per-step candidates and the running beams kept, to recover each hypothesis's tokens at the end."""

    def __init__(self, with_logprobs: bool):
        self.tokens: list[list[list[int]]] = []  # [step][prompt][candidate]
        self.beams: list[list[list[int]]] = []  # the running beam (slot) each candidate extends
        self.kept: list[list[list[int]]] = []  # [step][prompt][slot] -> candidate continued in that slot
        self.logprobs: list[list[list[float]]] = []
        self.tops: list[list[list[list[tuple[int, float]]]]] = []
        self.with_logprobs = with_logprobs

    def backtrack(self, prompt: int, step: int, candidate: int):
        """Tokens (and log-probabilities) of the hypothesis ending at ``candidate`` of ``step``."""
        tokens, logprobs, tops = [], [], []
        while step >= 0:
            tokens.append(self.tokens[step][prompt][candidate])
            if self.with_logprobs:
                logprobs.append(self.logprobs[step][prompt][candidate])
                tops.append(self.tops[step][prompt][candidate])
            slot = self.beams[step][prompt][candidate]
            step -= 1
            if step >= 0:
                candidate = self.kept[step][prompt][slot]
        return tokens[::-1], logprobs[::-1], tops[::-1]


@torch.inference_mode()
def beam_search(model: GPT, prompts_ids: Sequence[Sequence[int]], config: GenerateConfig,
                eos_id: Optional[int] = None, *, tokenizer: Optional[Tokenizer] = None) -> list[list[Completion]]:
    """The ``config.num_return_sequences`` best beams of each prompt, best first."""
    P, K = len(prompts_ids), config.num_beams
    if config.max_new_tokens is None and prompts_ids:  # as many as the context leaves the longest prompt
        config = config.for_prompt(max(len(ids) for ids in prompts_ids), model.config.block_size)
    if 2 * K > model.config.vocab_size:
        raise ConfigError(f"num_beams ({K}) must be at most half the vocabulary ({model.config.vocab_size} tokens)")
    rows_ids = [ids for ids in prompts_ids for _ in range(K)]
    batch = PromptBatch(model, rows_ids, config)
    device = batch.idx.device
    history = TokenHistory(rows_ids, model.config.vocab_size, config, device, tokenizer)
    eos = None if config.ignore_eos else eos_id
    pools = [Hypotheses(K, config.early_stopping) for _ in range(P)]
    trace = _Trace(with_logprobs=config.logprobs > 0)
    row_offset = torch.arange(P, device=device).unsqueeze(1) * K  # (P, 1)
    # Only the first beam starts live, so the K identical beams do not pick the same tokens.
    running = torch.full((P, K), _UNREACHABLE, device=device)
    running[:, 0] = 0.0

    logits = batch.prefill()  # (P*K, V)
    for step in range(config.max_new_tokens):
        logp = logits.float().log_softmax(-1)
        scores = process_logits(logp, history, config, step=step, eos_id=eos)  # (P*K, V)
        V = scores.shape[-1]
        total = (scores.view(P, K, V) + running.unsqueeze(-1)).view(P, K * V)
        cand_scores, cand_index = torch.topk(total, 2 * K)  # (P, 2K), best first
        cand_beam, cand_token = cand_index // V, cand_index % V
        last = step + 1 == config.max_new_tokens
        ends = torch.ones_like(cand_token, dtype=torch.bool) if last else (
            cand_token == eos if eos is not None else torch.zeros_like(cand_token, dtype=torch.bool))

        # The best K candidates that go on become the running beams.
        open_scores = cand_scores + ends.float() * _UNREACHABLE
        kept = torch.topk(open_scores, K).indices  # (P, K)
        running = open_scores.gather(1, kept)
        parents = cand_beam.gather(1, kept)
        tokens = cand_token.gather(1, kept)

        _record_step(trace, logp, cand_beam, cand_token, kept, row_offset, config.logprobs)
        finished_scores = (cand_scores / ((step + 1) ** config.length_penalty)).tolist()
        ends_list = ends.tolist()
        for p, pool in enumerate(pools):
            if not pool.done:
                pool.add([(finished_scores[p][j], step, j) for j in range(K) if ends_list[p][j]])
        best_running = (running[:, 0] / ((step + 1) ** config.length_penalty)).tolist()
        for pool, best in zip(pools, best_running):
            pool.update_improvable(best)
        if last or all(pool.done for pool in pools):
            break

        rows = (parents + row_offset).view(-1)  # (P*K,) flat index of each new beam's parent row
        batch.reorder(rows)
        history.reorder(rows, rows.tolist())
        flat_tokens = tokens.view(-1)
        history.append(flat_tokens, flat_tokens.tolist())
        logits = batch.decode(flat_tokens)

    return [[_completion(trace, p, item, prompts_ids[p], eos, tokenizer)
             for item in pool.items[:config.num_return_sequences]] for p, pool in enumerate(pools)]


def _record_step(trace: _Trace, logp: torch.Tensor, cand_beam: torch.Tensor, cand_token: torch.Tensor,
                 kept: torch.Tensor, row_offset: torch.Tensor, top_n: int) -> None:
    trace.tokens.append(cand_token.tolist())
    trace.beams.append(cand_beam.tolist())
    trace.kept.append(kept.tolist())
    if top_n:
        rows = cand_beam + row_offset  # (P, 2K): the row each candidate extends
        trace.logprobs.append(logp[rows, cand_token].tolist())
        top = torch.topk(logp, min(top_n, logp.shape[-1]), dim=-1)  # (P*K, n)
        ids, values = top.indices[rows].tolist(), top.values[rows].tolist()  # (P, 2K, n)
        trace.tops.append([[list(zip(i, v)) for i, v in zip(pi, pv)] for pi, pv in zip(ids, values)])


def _completion(trace: _Trace, prompt: int, item: tuple[float, int, int], prompt_ids: Sequence[int],
                eos_id: Optional[int], tokenizer: Optional[Tokenizer]) -> Completion:
    score, step, candidate = item
    tokens, logprobs, tops = trace.backtrack(prompt, step, candidate)
    reason = FinishReason.LENGTH
    if eos_id is not None and tokens[-1] == eos_id:
        reason = FinishReason.EOS
        tokens, logprobs, tops = tokens[:-1], logprobs[:-1], tops[:-1]
    return Completion(
        token_ids=tokens, text=tokenizer.decode(tokens) if tokenizer is not None else "", finish_reason=reason,
        prompt_tokens=len(prompt_ids), logprobs=logprobs if trace.with_logprobs else None,
        top_logprobs=tops if trace.with_logprobs else None, score=score,
    )
