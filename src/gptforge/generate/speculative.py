"""Speculative decoding: a small draft model proposes tokens, the target model checks them in one forward.

Each round the draft proposes ``k`` tokens one at a time with its own KV cache; the target then runs once
over the last accepted token and the ``k`` proposals (a multi-token step on its filled cache) and so
scores all ``k + 1`` positions. The longest acceptable prefix of the proposals is kept, followed by one
token of the target's own, so a round yields between 1 and ``k + 1`` tokens for one target forward.
Both caches are rolled back to the kept tokens with :meth:`KVCache.truncate`.

Greedy (temperature 0) accepts a proposal when it is the target's argmax, so the output is exactly the
target's greedy output. With sampling, proposal ``x ~ q`` is accepted with probability
``min(1, p(x) / q(x))`` and a rejection draws from ``max(0, p - q)`` renormalised (Leviathan et al. 2023,
Chen et al. 2023), so every token is distributed exactly as the target's ``p`` (after temperature, top-k
and top-p, which apply to both models alike).

Invariant between rounds: the target's cache holds every token but the last one of ``seq``; the draft's
cache holds a prefix of that (it lags by one token after a round that accepted every proposal) and is
caught up at the start of the next round.
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import torch

from ..config import GenerateConfig
from ..errors import ConfigError
from ..model import GPT
from .batch import FinishReason
from .engine import SequenceState
from .sampler import greedy_tokens, logits_to_probs, sample

log = logging.getLogger(__name__)


def check_draft(target: GPT, draft: GPT) -> int:
    """The context both models can hold; raises ConfigError when the draft cannot serve the target."""
    if target.config.vocab_size != draft.config.vocab_size:
        raise ConfigError(
            f"the draft model's vocabulary ({draft.config.vocab_size} ids) differs from the target's "
            f"({target.config.vocab_size}); speculative decoding needs models of the same tokenizer"
        )
    return min(target.config.block_size, draft.config.block_size)


@torch.inference_mode()
def speculative_generate(
    target: GPT,
    draft: GPT,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: Optional[int] = None,
    num_draft_tokens: int = 4,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
    eos_id: Optional[int] = None,
) -> tuple[list[int], dict[str, Any]]:
    """New token ids for one prompt (an ending EOS is dropped), and statistics of the run.

    Stats: ``drafted`` (proposals made), ``accepted`` (proposals kept), ``acceptance_rate``
    (accepted / drafted, 0.0 when nothing was drafted), ``target_forwards`` and ``draft_forwards``
    (forward passes, prompt prefill included), ``new_tokens``. Sampling draws come from ``generator``
    (on the target's device) when given, else from torch's global RNG. ``max_new_tokens`` None: as many as the
    models' shared context leaves the prompt, at most 256 (:func:`~gptforge.config.resolve_max_new_tokens`).
    """
    config = GenerateConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
    config.validate()
    if num_draft_tokens < 1:
        raise ConfigError(f"num_draft_tokens must be at least 1, got {num_draft_tokens}")
    if len(prompt_ids) == 0:
        raise ConfigError("the prompt has no tokens")
    context = check_draft(target, draft)
    if max_new_tokens is None:  # as many as the shared context leaves the prompt
        config = config.for_prompt(len(prompt_ids), context)
        max_new_tokens = config.max_new_tokens
    if len(prompt_ids) + max_new_tokens > context:
        raise ConfigError(
            f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) is longer than the "
            f"context of {context} tokens the target and draft models share; shorten the prompt or lower "
            f"max_new_tokens"
        )
    t_device, d_device = target.wte.weight.device, draft.wte.weight.device
    greedy = temperature == 0

    def probs(logits: torch.Tensor) -> torch.Tensor:  # (..., V) → the distribution sampling draws from
        return logits_to_probs(logits, config)

    def ids(tokens: Sequence[int], device: torch.device) -> torch.Tensor:
        return torch.tensor([list(tokens)], dtype=torch.long, device=device)  # (1, T)

    state = SequenceState(prompt_ids, config, target, eos_id=eos_id)  # the output, and when it ends
    seq = list(prompt_ids)
    total = len(seq) + max_new_tokens
    t_cache = target.new_kv_cache(1, total)
    d_cache = draft.new_kv_cache(1, total)
    stats = {"drafted": 0, "accepted": 0, "target_forwards": 0, "draft_forwards": 0}
    if len(seq) > 1:  # the prompt's last token is fed with the first round's proposals
        target(ids(seq[:-1], t_device), kv_cache=t_cache, last_only=True)
        draft(ids(seq[:-1], d_device), kv_cache=d_cache, last_only=True)
        stats["target_forwards"] += 1
        stats["draft_forwards"] += 1

    while not state.done:
        # A round yields at most k + 1 tokens, so k never overshoots max_new_tokens (nor the context).
        k = min(num_draft_tokens, max_new_tokens - state.steps - 1)
        proposals: list[int] = []
        q_rows: list[torch.Tensor] = []
        step = ids(seq[d_cache.length:], d_device)  # the draft's first step also catches its cache up
        for i in range(k):
            if greedy:
                token = _greedy(draft, step, d_cache)[-1]
            else:
                q = probs(draft(step, kv_cache=d_cache, last_only=True)[0, -1])
                token = _draw(q, _on(generator, d_device))
                q_rows.append(q.to(t_device))
            stats["draft_forwards"] += 1
            proposals.append(token)
            step = ids([token], d_device)

        n_before = len(seq)
        check = ids([seq[-1], *proposals], t_device)
        stats["target_forwards"] += 1
        if greedy:
            choice = _greedy(target, check, t_cache)  # the target's argmax at each of the k + 1 positions
            n_ok = 0
            while n_ok < k and proposals[n_ok] == choice[n_ok]:
                n_ok += 1
            kept = proposals[:n_ok] + [choice[n_ok]]
        else:
            kept = _accept_sampled(proposals, q_rows, probs(target(check, kv_cache=t_cache)[0]), generator)
            n_ok = len(kept) - 1
        stats["drafted"] += k
        stats["accepted"] += n_ok

        for token in kept:
            if state.add(token).finish_reason is FinishReason.EOS:
                break
            seq.append(token)
            if state.done:
                break
        # Keep what both caches computed for tokens that stayed: seq[:n_before + n_ok].
        t_cache.truncate(n_before + n_ok)
        d_cache.truncate(min(d_cache.length, n_before + n_ok))

    stats["new_tokens"] = len(state.token_ids)
    stats["acceptance_rate"] = stats["accepted"] / stats["drafted"] if stats["drafted"] else 0.0
    log.debug("speculative decoding: %s", stats)
    return state.token_ids, stats


def _greedy(model: GPT, idx: torch.Tensor, cache) -> list[int]:
    """Feed ``idx`` (1, T) through ``model`` on ``cache``; the argmax token at each of the T positions
    (through a prepared LM head's argmax screen when it has one: the same tokens, a quarter of its bytes)."""
    return greedy_tokens(model, model.hidden_states(idx, kv_cache=cache)[0]).tolist()


def _draw(weights: torch.Tensor, generator: Optional[torch.Generator]) -> int:
    """One index drawn in proportion to the 1-D ``weights``."""
    return int(sample(weights.unsqueeze(0), None if generator is None else [generator])[0])


def _on(generator: Optional[torch.Generator], device: torch.device) -> Optional[torch.Generator]:
    """``generator`` if it can draw on ``device`` (a draft on another device uses the global RNG)."""
    return generator if generator is None or generator.device.type == device.type else None


def _accept_sampled(proposals: list[int], q_rows: list[torch.Tensor], p: torch.Tensor,
                    generator: Optional[torch.Generator]) -> list[int]:
    """The kept tokens of one sampled round: accepted proposals, then a corrected or bonus sample.

    ``p`` (k + 1, V) holds the target's distributions, ``q_rows`` the draft's k distributions.
    """
    kept: list[int] = []
    for i, token in enumerate(proposals):
        u = torch.rand((), generator=generator, device=p.device)
        if u * q_rows[i][token] < p[i, token]:  # accept with probability min(1, p / q)
            kept.append(token)
            continue
        residual = (p[i] - q_rows[i]).clamp_(min=0)
        if not residual.sum() > 0:  # p == q up to rounding: the rejection was rounding noise
            residual = p[i]
        kept.append(_draw(residual, generator))
        return kept
    kept.append(_draw(p[len(proposals)], generator))
    return kept
