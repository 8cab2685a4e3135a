"""Logits processors: small pure functions on (B, V) logits, plus the running token history they read.

Each function matches the Hugging Face ``transformers`` processor of the same idea (tested against it), and
returns a new tensor. :class:`TokenHistory` keeps what the penalties need (which tokens were seen, how often
each was generated, the n-grams so far) up to date in O(1) work per step, so a step costs the same at token
10 and token 10,000.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch

from ..config import GenerateConfig
from ..errors import ConfigError

NEG_INF = float("-inf")


# --------------------------------------------------------------------------------------------------
# Warpers: reshape the distribution that sampling draws from.
def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits / temperature if temperature != 1.0 else logits


def top_k_filter(logits: torch.Tensor, k: Optional[int]) -> torch.Tensor:
    """Keep the k largest logits of each row (ties at the k-th value are kept); the rest become -inf."""
    if k is None or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p_filter(logits: torch.Tensor, p: Optional[float]) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probabilities add up to at least p."""
    if p is None or p >= 1.0:
        return logits
    # Ascending order: a token goes when it and every less likely token together hold at most 1 - p.
    sorted_logits, sorted_idx = torch.sort(logits, descending=False, dim=-1)
    drop_sorted = sorted_logits.softmax(-1).cumsum(-1) <= 1 - p
    drop_sorted[..., -1:] = False  # the most likely token always stays
    drop = drop_sorted.scatter(-1, sorted_idx, drop_sorted)
    return logits.masked_fill(drop, NEG_INF)


def min_p_filter(logits: torch.Tensor, min_p: Optional[float]) -> torch.Tensor:
    """Drop tokens whose probability is below ``min_p`` times the most likely token's."""
    if not min_p:
        return logits
    probs = logits.softmax(-1)
    drop = probs < min_p * probs.amax(-1, keepdim=True)
    drop.scatter_(-1, probs.argmax(-1, keepdim=True), False)
    return logits.masked_fill(drop, NEG_INF)


def warp_logits(logits: torch.Tensor, config: GenerateConfig) -> torch.Tensor:
    """Temperature, top-k, top-p, then min-p: the order Hugging Face applies them in."""
    logits = apply_temperature(logits, config.temperature)
    logits = top_k_filter(logits, config.top_k)
    logits = top_p_filter(logits, config.top_p)
    return min_p_filter(logits, config.min_p)


# --------------------------------------------------------------------------------------------------
# Penalties and bans: depend on the tokens so far.
def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL / Hugging Face: divide positive and multiply negative logits of ``seen`` tokens by ``penalty``."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def apply_presence_frequency_penalty(logits: torch.Tensor, counts: torch.Tensor, presence: float,
                                     frequency: float) -> torch.Tensor:
    """OpenAI: ``logit - frequency * count - presence * (count > 0)`` over the generated tokens."""
    if presence == 0 and frequency == 0:
        return logits
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def apply_logit_bias(logits: torch.Tensor, ids: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """OpenAI's logit_bias (transformers' SequenceBiasLogitsProcessor for one-token sequences): ``bias`` (n,)
    added to the logits of tokens ``ids`` (n,) in every row."""
    logits = logits.clone()
    logits[:, ids] += bias.to(logits.dtype)
    return logits


def ban_tokens(logits: torch.Tensor, banned: Sequence[Iterable[int]]) -> torch.Tensor:
    """Set ``banned[row]``'s tokens to -inf in each row."""
    rows, cols = [], []
    for row, tokens in enumerate(banned):
        for t in tokens:
            rows.append(row)
            cols.append(t)
    if not rows:
        return logits
    logits = logits.clone()
    logits[torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device)] = NEG_INF
    return logits


def suppress_token(logits: torch.Tensor, token_id: int) -> torch.Tensor:
    """Make ``token_id`` impossible in every row (end-of-text before min_new_tokens)."""
    logits = logits.clone()
    logits[:, token_id] = NEG_INF
    return logits


# --------------------------------------------------------------------------------------------------
class NGramTable:
    """The n-grams of one sequence, indexed by their first n - 1 tokens, grown one token at a time.

    Values are frozensets so that a copy (beam search duplicates a row) can share them safely.
    """

    def __init__(self, n: int, ids: Sequence[int] = ()):
        self.n = n
        self.table: dict[tuple[int, ...], frozenset[int]] = {}
        self.tail: tuple[int, ...] = ()
        for t in ids:
            self.append(t)

    def append(self, token: int) -> None:
        if len(self.tail) == self.n - 1:
            self.table[self.tail] = self.table.get(self.tail, frozenset()) | {token}
        self.tail = (self.tail + (token,))[-(self.n - 1):] if self.n > 1 else ()

    def banned(self) -> frozenset[int]:
        """Tokens that would complete an n-gram already present."""
        return self.table.get(self.tail, frozenset())

    def copy(self) -> "NGramTable":
        other = NGramTable.__new__(NGramTable)
        other.n, other.table, other.tail = self.n, dict(self.table), self.tail
        return other


class TokenHistory:
    """Per-row state the penalties and bans read, updated in place: seen tokens, generated counts, n-grams, the
    tail of the text (banned phrases); and the logit bias, prepared once. ``tokenizer``: needed for banned
    phrases (config.bad_words), which are matched on the text."""

    def __init__(self, rows_ids: Sequence[Sequence[int]], vocab_size: int, config: GenerateConfig,
                 device: torch.device, tokenizer=None):
        B = len(rows_ids)
        self.seen: Optional[torch.Tensor] = None  # (B, V) bool: in the prompt or output
        self.counts: Optional[torch.Tensor] = None  # (B, V) float: times generated
        self.ngrams: Optional[list[NGramTable]] = None
        self.bias: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # logit_bias: ids (n,), biases (n,)
        self.phrases = None  # a gptforge.generate.bans.PhraseBan when config.bad_words
        self.tails: Optional[list[bytes]] = None  # each row's text tail that a banned phrase could continue
        if config.logit_bias:
            config.check_vocab(vocab_size)
            self.bias = (torch.tensor(list(config.logit_bias), dtype=torch.long, device=device),
                         torch.tensor(list(config.logit_bias.values()), dtype=torch.float32, device=device))
        if config.bad_words:
            if tokenizer is None:
                raise ConfigError("banned phrases (bad_words) are matched on the text and need a tokenizer; "
                                  "pass tokenizer=")
            from .bans import phrase_ban

            self.phrases = phrase_ban(tokenizer, config.bad_words)
            self.tails = [self.phrases.tail(ids) for ids in rows_ids]
        if config.repetition_penalty != 1.0:
            self.seen = torch.zeros(B, vocab_size, dtype=torch.bool, device=device)
            for row, ids in enumerate(rows_ids):
                self.seen[row, torch.tensor(list(ids), dtype=torch.long, device=device)] = True
        if config.presence_penalty or config.frequency_penalty:
            self.counts = torch.zeros(B, vocab_size, device=device)
        if config.no_repeat_ngram_size:
            self.ngrams = [NGramTable(config.no_repeat_ngram_size, ids) for ids in rows_ids]
        # Decided once here, read every step: whether appending matters, whether the logits are changed.
        self.tracking = (self.seen is not None or self.counts is not None or self.ngrams is not None
                         or self.tails is not None)
        """Whether a penalty or ban reads this history (else appending to it does nothing)."""
        self.processed = self.tracking or self.bias is not None
        """Whether a penalty, bias or ban changes the logits (else a row's token is chosen from them as they are)."""

    def append(self, tokens: torch.Tensor, token_list: Sequence[int]) -> None:
        """Record one new token per row: ``tokens`` (B,) on the model's device, the same as a list."""
        column = tokens.unsqueeze(1)  # (B, 1)
        if self.seen is not None:
            self.seen.scatter_(1, column, True)
        if self.counts is not None:
            self.counts.scatter_add_(1, column, torch.ones_like(column, dtype=self.counts.dtype))
        if self.ngrams is not None:
            for table, t in zip(self.ngrams, token_list):
                table.append(t)
        if self.tails is not None:
            self.tails = [self.phrases.push(tail, t) for tail, t in zip(self.tails, token_list)]

    def reorder(self, index: torch.Tensor, index_list: Sequence[int]) -> None:
        """Row i becomes old row index[i] (beam search)."""
        if self.seen is not None:
            self.seen = self.seen.index_select(0, index)
        if self.counts is not None:
            self.counts = self.counts.index_select(0, index)
        if self.ngrams is not None:
            used: set[int] = set()
            tables = []
            for i in index_list:
                tables.append(self.ngrams[i] if i not in used else self.ngrams[i].copy())
                used.add(i)
            self.ngrams = tables
        if self.tails is not None:
            self.tails = [self.tails[i] for i in index_list]


def argmax_only(config: GenerateConfig, history: TokenHistory) -> bool:
    """Whether the next token under ``config`` is the logits' plain argmax: greedy, no log-probabilities,
    and no penalty, bias or ban in ``history`` (end-of-text before ``min_new_tokens`` aside: the caller's to
    exclude). What lets a screened LM head skip the logits (see gptforge.generate.sampler)."""
    return config.temperature == 0 and not config.logprobs and not history.processed


def sample_only(config: GenerateConfig, history: TokenHistory) -> bool:
    """Whether the next token under ``config`` is a plain draw from ``softmax(logits / temperature)``: sampling
    without top-k, top-p or min-p, penalties, bias or bans (end-of-text before ``min_new_tokens`` aside: the
    caller's to pass on). A screened LM head draws such tokens without the logits (see
    gptforge.generate.sampler), and always so, log-probabilities or not (they are read from
    the logits besides), so that asking for them never changes which tokens a seed gives."""
    return (config.temperature > 0 and config.top_k is None and (config.top_p is None or config.top_p >= 1.0)
            and not config.min_p and not history.processed)


def process_logits(logits: torch.Tensor, history: TokenHistory, config: GenerateConfig, *, step: int,
                   eos_id: Optional[int]) -> torch.Tensor:
    """Bias, penalties and bans in Hugging Face's order: logit bias (its SequenceBiasLogitsProcessor),
    repetition, n-grams, banned phrases (its NoBadWordsLogitsProcessor's place), then end-of-text before
    min_new_tokens.

    ``step`` is the number of tokens generated so far. OpenAI's presence / frequency penalties come last.
    """
    if history.bias is not None:
        logits = apply_logit_bias(logits, *history.bias)
    if history.seen is not None:
        logits = apply_repetition_penalty(logits, history.seen, config.repetition_penalty)
    if history.ngrams is not None:
        logits = ban_tokens(logits, [table.banned() for table in history.ngrams])
    if history.tails is not None:
        logits = history.phrases.apply(logits, history.tails, allow=eos_id)
    if eos_id is not None and step < config.min_new_tokens:
        logits = suppress_token(logits, eos_id)
    if history.counts is not None:
        logits = apply_presence_frequency_penalty(logits, history.counts, config.presence_penalty,
                                                  config.frequency_penalty)
    return logits
