"""The one sampler: logits, or a screened LM head, → the next token of each row.

    logits → penalties and bans (processors) → temperature, top-k, top-p, min-p → probabilities → draw

Small pure functions on tensors of shape (B, V) or (B,) that compose, batch, and can be tested one by one
against other implementations; reproducible sampling uses one ``torch.Generator`` per row, so a row draws the
same tokens whether it is decoded alone or inside a batch. :func:`next_tokens` puts them together for the
decode engine (:mod:`gptforge.generate.engine`), which the CLI, chat and the server's scheduler share; beam
search and speculative decoding call the pieces.

A prepared LM head may carry an argmax screen (the CPU backend's, set up by ``prepare_for_inference``); the
sampler reads it through its duck-typed interface and never imports it: ``lm_head.screened`` (True),
``lm_head.argmax(x, suppress)`` (each row's argmax of the logits of final hidden states ``x``, ``suppress``
an id that must not win or None) and ``lm_head.sample(x, temperature, seeds, suppress)`` (each row's draw from
``softmax(logits / temperature)``, its uniforms from a stream seeded by ``seeds[r]``, ``suppress[r]`` an id it
must not draw or -1). Either gives its tokens without forming the logits.
"""

from __future__ import annotations

import math
from typing import Optional, Protocol, Sequence

import torch

from ..config import GenerateConfig
from ..model.sampling import draw_from_logits, sample
from .processors import (TokenHistory, apply_temperature, argmax_only, min_p_filter, process_logits, sample_only,
                         top_k_filter, top_p_filter, warp_logits)

__all__ = ["apply_temperature", "top_k_filter", "top_p_filter", "min_p_filter", "filter_logits",
           "logits_to_probs", "make_generator", "sample", "draw_from_logits", "choose_tokens", "token_logprobs",
           "screened", "greedy_tokens", "sample_tokens", "next_tokens", "SamplingRow"]


def filter_logits(logits: torch.Tensor, *, temperature: float = 1.0, top_k: Optional[int] = None,
                  top_p: Optional[float] = None, min_p: Optional[float] = None) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p (the order Hugging Face applies them in)."""
    config = GenerateConfig(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    return warp_logits(logits.float(), config)


def logits_to_probs(logits: torch.Tensor, config: GenerateConfig) -> torch.Tensor:
    """The distribution sampling draws from, (B, V) (or (V,) for one row)."""
    return warp_logits(logits.float(), config).softmax(-1)


def make_generator(seed: Optional[int], device: torch.device) -> Optional[torch.Generator]:
    """A generator on ``device`` seeded with ``seed``; None (the global RNG) without a seed."""
    return None if seed is None else torch.Generator(device=device).manual_seed(seed)


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


# --------------------------------------------------------------------------------------------------
# From final hidden states: through the LM head's screen when it has one.
def screened(model: torch.nn.Module) -> bool:
    """Whether ``model``'s LM head has an argmax screen, through which :func:`greedy_tokens` and
    :func:`sample_tokens` choose from final hidden states without forming the logits."""
    return bool(getattr(getattr(model, "lm_head", None), "screened", False))


def greedy_tokens(model: torch.nn.Module, x: torch.Tensor, suppress: Optional[int] = None) -> torch.Tensor:
    """The most likely next token of each row, (B,), from final hidden states ``x`` (B, C): the first argmax
    of the LM head's logits, with ``suppress`` (a token id, or None) excluded. A screened head gives the same
    tokens while reading a quarter of the head's bytes."""
    if screened(model):
        return model.lm_head.argmax(x, suppress)
    logits = model.logits(x.unsqueeze(1))[:, 0]
    if suppress is not None:
        logits[:, suppress] = float("-inf")
    return logits.argmax(dim=-1)


def sample_tokens(model: torch.nn.Module, x: torch.Tensor, temperature: float | Sequence[float],
                  generators: Optional[Sequence[Optional[torch.Generator]]] = None,
                  suppress: Optional[int] | Sequence[Optional[int]] = None) -> torch.Tensor:
    """Each row's next token drawn from ``softmax(logits / temperature)``, (B,), from final hidden states ``x``
    (B, C). ``temperature`` (> 0) and ``suppress`` (a token id a row must not draw, or None) are one value for
    all rows or one a row; ``generators``: one a row (None: the global generator), each giving one 63-bit seed
    per call, from which the row's draw follows (its tokens do not depend on the other rows). A screened head
    draws without forming the logits (the same distribution)."""
    B = x.shape[0]
    temps = [float(temperature)] * B if isinstance(temperature, (int, float)) else [float(t) for t in temperature]
    bans = [suppress] * B if suppress is None or isinstance(suppress, int) else list(suppress)
    gens = [None] * B if generators is None else list(generators)
    if len(temps) != B or len(bans) != B or len(gens) != B:
        raise ValueError(f"temperature, suppress and generators need one value per row ({B})")
    if not all(t > 0 and math.isfinite(t) for t in temps):
        raise ValueError(f"sampling needs finite temperatures > 0 (0 is greedy: greedy_tokens), got {temps}")
    seeds = torch.cat([torch.randint(0, 2 ** 63 - 1, (1,), generator=g, device=g.device if g is not None else "cpu")
                       .cpu() for g in gens])
    t = torch.tensor(temps, dtype=torch.float64)
    banned = torch.tensor([-1 if b is None else b for b in bans], dtype=torch.long)
    if screened(model):
        return model.lm_head.sample(x, t, seeds, banned).to(x.device)
    return draw_from_logits(model.logits(x.unsqueeze(1))[:, 0], t, seeds, banned).to(x.device)


# --------------------------------------------------------------------------------------------------
# Many rows, each under its own parameters: what a decode step runs.
class SamplingRow(Protocol):
    """What :func:`next_tokens` reads of a row (the engine's :class:`~gptforge.generate.engine.SequenceState`)."""

    config: GenerateConfig
    history: TokenHistory  # this row's alone (one row)
    generator: Optional[torch.Generator]  # None: the global RNG
    eos_id: Optional[int]  # banned before config.min_new_tokens; None when it may always come
    steps: int  # tokens chosen so far


def _banned_eos(row: SamplingRow) -> Optional[int]:
    """The end-of-text id when it may not come next (before min_new_tokens), else None."""
    return row.eos_id if row.eos_id is not None and row.steps < row.config.min_new_tokens else None


def _screen_kind(row: SamplingRow) -> Optional[str]:
    """How a screened head chooses ``row``'s next token without its logits: "argmax" (plain greedy, no
    log-probabilities), "sample" (a plain draw from the softmax, log-probabilities or not, so that asking for
    them never changes which tokens a seed gives), or None (the token comes from the logits: penalties,
    bans, warpers; greedy with log-probabilities). An end-of-text ban is passed on to the screen."""
    if argmax_only(row.config, row.history):
        return "argmax"
    if sample_only(row.config, row.history):
        return "sample"
    return None


def _take(x: torch.Tensor, index: list[int], n: int) -> torch.Tensor:
    """Rows ``index`` of ``x`` (n, ...): ``x`` itself when that is all of them."""
    return x if len(index) == n else x[index]


def next_tokens(model: torch.nn.Module, rows: Sequence[SamplingRow],
                out: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor], list[int]]:
    """Each row's next token, (n,), from the forward's last position ``out``: (n, C) final hidden states when
    the LM head is :func:`screened`, else (n, V) logits. Also the float logits of the rows that needed them
    (for log-probabilities), (r, V), and which rows those are.

    Under a screened head plain greedy rows are chosen through its argmax and plain sampled rows drawn through
    it (:func:`greedy_tokens`, :func:`sample_tokens`); only the other rows' logits are formed. Greedy rows, and
    rows whose distributions are warped alike (same temperature, top-k, top-p, min-p; seeded or not), are
    chosen in one batched call each: the warpers, softmax, running sum, search and argmax all work row by row,
    so every row gets the bits it gets alone, whatever shares the step.
    """
    n = len(rows)
    if not screened(model):
        logits = out.float()
        return _from_logits(rows, logits), logits, list(range(n))
    tokens = _Tokens(n)
    kinds = [_screen_kind(row) for row in rows]
    by_ban: dict[Optional[int], list[int]] = {}
    for i, kind in enumerate(kinds):
        if kind == "argmax":
            by_ban.setdefault(_banned_eos(rows[i]), []).append(i)
    for ban, members in by_ban.items():
        tokens.put(members, greedy_tokens(model, _take(out, members, n), ban))
    drawn = [i for i, kind in enumerate(kinds) if kind == "sample"]
    if drawn:
        tokens.put(drawn, sample_tokens(model, _take(out, drawn, n), [rows[i].config.temperature for i in drawn],
                                        [rows[i].generator for i in drawn], [_banned_eos(rows[i]) for i in drawn]))
    need = [i for i, kind in enumerate(kinds) if kind is None or rows[i].config.logprobs]
    if not need:
        return tokens.all, None, need
    logits = model.logits(_take(out, need, n).unsqueeze(1))[:, 0].float()  # (r, V): the forward's own head call
    rest = [j for j, i in enumerate(need) if kinds[i] is None]
    if rest:
        tokens.put([need[j] for j in rest], _from_logits([rows[need[j]] for j in rest], _take(logits, rest, len(need))))
    return tokens.all, logits, need


class _Tokens:
    """The (n,) tokens of a step, filled group by group; a group of all n rows is taken as it is."""

    def __init__(self, n: int):
        self.n = n
        self.all: Optional[torch.Tensor] = None

    def put(self, members: list[int], values: torch.Tensor) -> None:
        if len(members) == self.n:
            self.all = values
            return
        if self.all is None:
            self.all = torch.empty(self.n, dtype=torch.long, device=values.device)
        self.all[members] = values


def _from_logits(rows: Sequence[SamplingRow], logits: torch.Tensor) -> torch.Tensor:
    """Each row's next token, (n,), from its float logits (n, V), under its own parameters, history and
    generator: penalties row by row, then one :func:`choose_tokens` call per group of rows chosen alike."""
    n = len(rows)
    views = [logits[i:i + 1] for i in range(n)]
    scores = [process_logits(views[i], row.history, row.config, step=row.steps, eos_id=row.eos_id)
              for i, row in enumerate(rows)]
    groups: dict[tuple, list[int]] = {}
    for i, row in enumerate(rows):
        c = row.config
        key = ("greedy",) if c.temperature == 0 else (
            "sample", row.generator is not None, c.temperature, c.top_k, c.top_p, c.min_p)
        groups.setdefault(key, []).append(i)
    tokens = _Tokens(n)
    for key, members in groups.items():
        if len(members) == 1:
            batch = scores[members[0]]
        elif len(members) == n and all(scores[i] is views[i] for i in members):
            batch = logits  # no penalty changed any row: the rows as they came
        else:
            batch = torch.cat([scores[i] for i in members])
        generators = [rows[i].generator for i in members] if key[0] == "sample" and key[1] else None
        tokens.put(members, choose_tokens(batch, rows[members[0]].config, generators))  # (len(members),)
    return tokens.all
