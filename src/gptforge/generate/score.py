"""Scoring given texts: how likely the model finds each candidate after a shared context.

    score_ids(model, context_ids, candidates_ids)   -> list[TokenScores]   (per candidate, per token)
    prompt_logprobs(model, ids)                     -> TokenScores         (every token given its prefix)
    score(model, tokenizer, context, candidates)    -> list[CandidateScore] (totals, normalised scores, ranks)

The context is prefilled once, with batch 1, through the model's KV-cache forward (the one the decode engine
runs); its keys and values are then copied into a cache of one row per candidate, and the candidates,
right-padded, run in one batched forward over it. Padding sits after a row's real tokens, so the causal mask
keeps it from touching them. A candidate's first token is read from the context's last position, each later
token from the candidate's previous position; the last candidate token is never fed in. Identical
candidates are scored once (so they tie exactly), and candidates run longest first, in chunks that keep the
cache and the logits under :data:`CHUNK_BYTES` (or ``batch_size`` rows).

Tokenization (:func:`encode_pair`) follows EleutherAI's lm-evaluation-harness: whitespace that ends the
context moves to the front of the candidate; the candidate's tokens are those of ``context + candidate``
beyond the context's own tokens; an empty context is the end-of-text token (as GPT-2 starts a text).

Ranks (:func:`rank_scores`): 1 is the best score; equal scores share the better rank and the next rank
skips (competition ranking: 1, 2, 2, 4).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from ..backends import decode_session
from ..config import SCORE_NORMALIZATIONS as NORMALIZATIONS
from ..errors import ConfigError
from ..fsutil import json_safe, jsonl_objects, read_utf8
from ..model import GPT
from ..tokenizer import Tokenizer, check_text

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 30
"""Without a ``batch_size``: as many candidates a forward as keep their KV cache and logits under 1 GiB."""

__all__ = ["CHUNK_BYTES", "NORMALIZATIONS", "CandidateScore", "TokenScores", "encode_pair", "format_scores",
           "prompt_logprobs", "rank_scores", "ranked", "read_candidates", "score", "score_ids", "score_report"]


@dataclass
class TokenScores:
    """The model's log-probabilities of one sequence's tokens."""

    token_ids: list[int]
    """The scored tokens."""
    logprobs: list[Optional[float]]
    """log p of each token given the context and the tokens before it (None only for the first token of
    :func:`prompt_logprobs`, which nothing predicts)."""
    top: Optional[list[Optional[list[tuple[int, float]]]]]
    """When asked for (``top_logprobs`` > 0): per position, the most likely (token_id, log-probability) pairs,
    best first; None at a position without a prediction."""
    greedy: list[Optional[bool]]
    """Whether each token is the model's most likely one there (any of several tied best counts)."""

    @property
    def total(self) -> float:
        """The sum of the log-probabilities (positions without a prediction left out)."""
        return math.fsum(lp for lp in self.logprobs if lp is not None)

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


@dataclass
class CandidateScore:
    """One candidate text of :func:`score`."""

    text: str
    """The candidate as given."""
    logprob: float
    """Total log-probability of its tokens after the context."""
    mean_logprob: float
    """``logprob`` per token."""
    tokens: int
    """How many tokens it was scored as."""
    bytes: int
    """Its length in UTF-8 bytes (the moved whitespace of the context not counted)."""
    score: float
    """The value ranked: ``logprob``, ``mean_logprob`` or ``logprob / bytes`` (normalize none, token, byte)."""
    rank: int
    """1 for the best score; equal scores share the better rank (1, 2, 2, 4)."""
    token_scores: Optional[TokenScores] = None
    """Per token: ids, log-probabilities, greedy flags and (when asked) the top alternatives."""

    def to_dict(self) -> dict:
        out = asdict(self)
        out["token_scores"] = None if self.token_scores is None else self.token_scores.to_dict()
        return out


# --------------------------------------------------------------------------------------------------
# Token level
def score_ids(model: GPT, context_ids: Sequence[int], candidates_ids: Sequence[Sequence[int]], *,
              top_logprobs: int = 0, batch_size: Optional[int] = None) -> list[TokenScores]:
    """Each candidate's per-token log-probabilities after ``context_ids`` (see the module docstring).

    The context needs at least one token (:func:`score` starts an empty context from the end-of-text token);
    every candidate needs one, and the context and a candidate together may feed at most ``block_size``
    tokens to the model (its last token is predicted, not fed: ``len(context) + len(candidate) - 1``).
    ``top_logprobs``: alternatives per position to report (0: none). ``batch_size``: most candidates per
    forward (None: as many as fit :data:`CHUNK_BYTES`)."""
    gpt = _language_model(model)
    vocab, block = gpt.config.vocab_size, gpt.config.block_size
    context = _token_list(context_ids, vocab, "the context")
    if not context:
        raise ConfigError("the context has no tokens: the first candidate token needs one to be predicted from "
                          "(score() starts an empty context from the end-of-text token)")
    if isinstance(candidates_ids, (str, bytes)) or not len(candidates_ids):
        raise ConfigError("there are no candidates to score")
    candidates = [_token_list(c, vocab, f"candidate {i}") for i, c in enumerate(candidates_ids)]
    for i, ids in enumerate(candidates):
        if not ids:
            raise ConfigError(f"candidate {i} has no tokens to score")
        if len(context) + len(ids) - 1 > block:
            raise ConfigError(f"candidate {i} ({len(ids)} tokens) after the context ({len(context)} tokens) "
                              f"needs {len(context) + len(ids) - 1} positions; the model's block_size is {block}")
    top_n = _check_top(top_logprobs, vocab)
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ConfigError(f"batch_size must be a positive integer or None, got {batch_size!r}")

    unique: dict[tuple[int, ...], int] = {}
    for ids in candidates:
        unique.setdefault(tuple(ids), len(unique))
    seqs = list(unique)
    found: list[Optional[TokenScores]] = [None] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda j: -len(seqs[j]))  # longest first: little padding a chunk
    with _inference(gpt):
        device = gpt.wte.weight.device
        prefix = gpt.new_kv_cache(1, len(context))
        hidden = gpt.hidden_states(torch.tensor([context], dtype=torch.long, device=device), kv_cache=prefix)
        first = gpt.logits(hidden[:, -1:]).float().log_softmax(-1)[0, 0]  # (V,): the first candidate token's
        first_best = first.max()
        first_top = _top_pairs(first, top_n) if top_n else None
        for chunk in _chunks(order, [len(seqs[j]) for j in order], gpt, len(context), batch_size):
            rows = [seqs[j] for j in chunk]
            for j, scores in zip(chunk, _score_chunk(gpt, prefix, rows, first, first_best, first_top, top_n)):
                found[j] = scores
    return [_copy(found[unique[tuple(ids)]]) for ids in candidates]


def prompt_logprobs(model: GPT, ids: Sequence[int], *, top_logprobs: int = 0) -> TokenScores:
    """The log-probability of each token of ``ids`` given the tokens before it: what OpenAI's ``echo`` with
    ``logprobs`` reports for a prompt. The first token has no prediction (None in ``logprobs``, ``top`` and
    ``greedy``); the others are :func:`score_ids` of ``ids[1:]`` after ``ids[:1]``."""
    gpt = _language_model(model)
    ids = _token_list(ids, gpt.config.vocab_size, "the text")
    if not ids:
        raise ConfigError("the text has no tokens to score")
    if len(ids) > gpt.config.block_size + 1:
        raise ConfigError(f"the text has {len(ids)} tokens; scoring it feeds {len(ids) - 1}, more than the "
                          f"model's block_size ({gpt.config.block_size})")
    top_n = _check_top(top_logprobs, gpt.config.vocab_size)
    if len(ids) == 1:
        return TokenScores([ids[0]], [None], [None] if top_n else None, [None])
    rest = score_ids(gpt, ids[:1], [ids[1:]], top_logprobs=top_n)[0]
    return TokenScores(ids, [None, *rest.logprobs], None if rest.top is None else [None, *rest.top],
                       [None, *rest.greedy])


def _score_chunk(gpt: GPT, prefix, rows: list[tuple[int, ...]], first: torch.Tensor, first_best: torch.Tensor,
                 first_top, top_n: int) -> list[TokenScores]:
    """Score ``rows`` (candidates, longest first) in one forward over copies of the context's cache."""
    device = first.device
    n, width = len(rows), len(rows[0])
    targets = torch.tensor([list(r) + [0] * (width - len(r)) for r in rows], dtype=torch.long, device=device)
    chosen = [first[targets[:, 0]]]  # each (n, ·) over the positions
    greedy = [first[targets[:, 0]] == first_best]
    tops = None
    if width > 1:
        start = prefix.length
        cache = gpt.new_kv_cache(n, start + width - 1, dtype=prefix.k.dtype)
        cache.k[:, :, :, :start] = prefix.k[:, :, :, :start]  # the one context row, into every row
        cache.v[:, :, :, :start] = prefix.v[:, :, :, :start]
        cache.length = start
        hidden = gpt.hidden_states(targets[:, :-1], kv_cache=cache)  # (n, width - 1, C); the last token not fed
        logp = gpt.logits(hidden).float().log_softmax(-1)  # (n, width - 1, V)
        rest = logp.gather(-1, targets[:, 1:].unsqueeze(-1)).squeeze(-1)
        chosen.append(rest)
        greedy.append(rest == logp.max(-1).values)
        if top_n:
            top = torch.topk(logp, top_n, dim=-1)
            tops = (top.indices.tolist(), top.values.tolist())
    chosen_list = torch.cat([c.reshape(n, -1) for c in chosen], 1).tolist()
    greedy_list = torch.cat([g.reshape(n, -1) for g in greedy], 1).tolist()
    out = []
    for r, ids in enumerate(rows):
        k = len(ids)
        top = None
        if top_n:
            top = [list(first_top)] + [list(zip(tops[0][r][p], tops[1][r][p])) for p in range(k - 1)]
        out.append(TokenScores(list(ids), chosen_list[r][:k], top, greedy_list[r][:k]))
    return out


def _chunks(order: list[int], lengths: list[int], gpt: GPT, context_len: int,
            batch_size: Optional[int]) -> Iterator[list[int]]:
    """``order`` cut into chunks (lengths falling): ``batch_size`` rows, or as many as fit CHUNK_BYTES."""
    c = gpt.config
    itemsize = (gpt.kv_cache_dtype or gpt.wte.weight.dtype).itemsize
    start = 0
    while start < len(order):
        if batch_size is not None:
            rows = batch_size
        else:
            width = lengths[start]  # the longest of the chunk: every row is padded to it
            kv = 2 * c.n_layer * c.n_head * c.head_dim * (context_len + width) * itemsize
            per_row = kv + 3 * (width - 1) * c.vocab_size * 4  # logits, float32 copy, log_softmax
            rows = max(1, CHUNK_BYTES // per_row)
        yield order[start:start + rows]
        start += rows


def _top_pairs(logp: torch.Tensor, n: int) -> list[tuple[int, float]]:
    top = torch.topk(logp, n)
    return list(zip(top.indices.tolist(), top.values.tolist()))


def _copy(scores: TokenScores) -> TokenScores:
    """A candidate's own lists (duplicates share a computation, never a list the caller may change)."""
    return TokenScores(list(scores.token_ids), list(scores.logprobs),
                       None if scores.top is None else [list(t) for t in scores.top], list(scores.greedy))


@contextlib.contextmanager
def _inference(gpt: GPT):
    """Inference mode, the model in eval mode (restored after), inside the engine's decode session."""
    was_training = gpt.training
    gpt.eval()
    try:
        with torch.inference_mode(), decode_session(gpt):
            yield
    finally:
        gpt.train(was_training)


def _language_model(model) -> GPT:
    if not isinstance(model, GPT):
        raise ConfigError(f"scoring needs a language model (a GPT with its LM head), not a {type(model).__name__}; "
                          "load the checkpoint as a language model")
    return model


def _token_list(ids, vocab_size: int, what: str) -> list[int]:
    if isinstance(ids, (str, bytes)):
        raise ConfigError(f"{what} must be a sequence of token ids, not text")
    try:
        out = [int(t) for t in ids]
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a sequence of integer token ids") from None
    bad = next((t for t in out if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ConfigError(f"{what} holds token id {bad}, outside the model's vocabulary (0..{vocab_size - 1})")
    return out


def _check_top(top_logprobs: int, vocab_size: int) -> int:
    if isinstance(top_logprobs, bool) or not isinstance(top_logprobs, int) or top_logprobs < 0:
        raise ConfigError(f"top_logprobs must be a non-negative integer, got {top_logprobs!r}")
    return min(top_logprobs, vocab_size)


# --------------------------------------------------------------------------------------------------
# Text level
def encode_pair(tokenizer: Tokenizer, context: str, candidate: str) -> tuple[list[int], list[int]]:
    """(context ids, candidate ids) as lm-evaluation-harness makes them: whitespace ending the context moves to
    the front of the candidate, the candidate's ids are those of ``context + candidate`` beyond the context's
    own ids, and an empty context is the end-of-text token. The candidate's ids may be empty (an empty
    candidate, or one a merge across the boundary swallowed): :func:`score_ids` refuses those."""
    stripped = context.rstrip()
    moved = context[len(stripped):]
    context_ids = tokenizer.encode(stripped)
    whole = tokenizer.encode(stripped + moved + candidate)
    candidate_ids = whole[len(context_ids):]
    if not context_ids:
        if tokenizer.eos_id is None:
            raise ConfigError("the context is empty and the tokenizer has no end-of-text token to start from")
        context_ids = [tokenizer.eos_id]
    return context_ids, candidate_ids


def score(model: GPT, tokenizer: Tokenizer, context: str, candidates: Sequence[str], *, normalize: str = "none",
          top_logprobs: int = 0, batch_size: Optional[int] = None) -> list[CandidateScore]:
    """Each candidate's log-probability after ``context``, in the given order, with its rank.

    ``normalize`` picks the value ranked (:attr:`CandidateScore.score`): ``none`` the total log-probability,
    ``token`` its mean per token, ``byte`` the total per UTF-8 byte of the candidate (lm-eval's acc_norm
    divides by the candidate's length in the same way). See the module docstring for the tokenization and
    the ranks."""
    if normalize not in NORMALIZATIONS:
        raise ConfigError(f"normalize must be one of {', '.join(NORMALIZATIONS)}, got {normalize!r}")
    if not isinstance(context, str):
        raise ConfigError(f"the context must be a string, got {type(context).__name__}")
    check_text(context, "the context")
    if isinstance(candidates, str) or not len(candidates):
        raise ConfigError("there are no candidates to score")
    context_ids: Optional[list[int]] = None
    candidates_ids = []
    for i, text in enumerate(candidates):
        if not isinstance(text, str):
            raise ConfigError(f"candidate {i} must be a string, got {type(text).__name__}")
        check_text(text, f"candidate {i}")
        if not text:
            raise ConfigError(f"candidate {i} is empty")
        context_ids, ids = encode_pair(tokenizer, context, text)
        if not ids:
            raise ConfigError(f"candidate {i} ({text!r}) has no tokens of its own after the context")
        candidates_ids.append(ids)
    per_token = score_ids(model, context_ids, candidates_ids, top_logprobs=top_logprobs, batch_size=batch_size)
    out = []
    for text, scores in zip(candidates, per_token):
        total, n, nbytes = scores.total, len(scores.token_ids), len(text.encode("utf-8"))
        value = total if normalize == "none" else total / n if normalize == "token" else total / nbytes
        out.append(CandidateScore(text, total, total / n, n, nbytes, value, 0, scores))
    for item, rank in zip(out, rank_scores([c.score for c in out])):
        item.rank = rank
    return out


def rank_scores(values: Sequence[float]) -> list[int]:
    """The rank of each value, higher better: 1 + how many values are strictly greater (competition ranking,
    so equal values share the better rank: 1, 2, 2, 4). NaN ranks last."""
    keyed = [-math.inf if math.isnan(v) else v for v in values]
    ordered = sorted(keyed, reverse=True)
    first = {}
    for i, v in enumerate(ordered):
        first.setdefault(v, i + 1)
    return [first[v] for v in keyed]


# --------------------------------------------------------------------------------------------------
# Reading candidates and showing results (what `gptforge score` prints)
def read_candidates(path: str | Path) -> list[str]:
    """The candidates of a UTF-8 file: one per line, taken as written (leading spaces kept, blank lines
    skipped), or, when the first non-blank line is a JSON object, JSON lines each with a string ``"text"``
    (for candidates that hold a newline). One :class:`~gptforge.errors.ConfigError` naming the file and the
    line otherwise."""
    path = Path(path)
    where = f"candidates file {path}"
    lines = read_utf8(path, "candidates file", ConfigError).splitlines()
    first = next((line for line in lines if line.strip()), None)
    if first is None:
        raise ConfigError(f"{where} has no candidates (one per line, or JSON lines with \"text\")")
    if _is_json_object(first):
        texts = []
        for number, record in jsonl_objects(lines, where, ConfigError):
            text = record.get("text")
            if not isinstance(text, str) or not text:
                got = "no \"text\"" if "text" not in record else f"\"text\" {json.dumps(text)}"
                raise ConfigError(f"{where} line {number} needs a non-empty string \"text\", got {got}")
            texts.append(check_text(text, f"{where} line {number}"))
        return texts
    return [check_text(line, f"{where} line {n}") for n, line in enumerate(lines, 1) if line.strip()]


def _is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


def ranked(results: Sequence[CandidateScore]) -> list[int]:
    """The candidates' indices, best rank first (ties in the order given)."""
    return sorted(range(len(results)), key=lambda i: (results[i].rank, i))


def score_report(results: Sequence[CandidateScore], *, context: str, normalize: str) -> dict:
    """JSON-ready: the context, the normalisation and the candidates best first, each with its ``index`` in
    the order given (non-finite numbers become null)."""
    return json_safe({"context": context, "normalize": normalize,
                      "candidates": [{"index": i, **results[i].to_dict()} for i in ranked(results)]})


def format_scores(results: Sequence[CandidateScore], tokenizer: Optional[Tokenizer] = None) -> str:
    """A table, best first: rank, score, logprob, mean, tokens, text (quoted, so spaces show). With a
    ``tokenizer`` and top alternatives recorded, each candidate's tokens follow on lines of their own."""
    lines = [f"{'rank':>4}  {'score':>10}  {'logprob':>10}  {'mean':>8}  {'tokens':>6}  text"]
    for i in ranked(results):
        c = results[i]
        lines.append(f"{c.rank:>4}  {c.score:>10.4f}  {c.logprob:>10.4f}  {c.mean_logprob:>8.4f}  {c.tokens:>6}  "
                     f"{json.dumps(c.text, ensure_ascii=False)}")
        s = c.token_scores
        if tokenizer is None or s is None or s.top is None:
            continue
        for token, lp, greedy, top in zip(s.token_ids, s.logprobs, s.greedy, s.top):
            alts = ", ".join(f"{_piece(tokenizer, t)} {v:.3f}" for t, v in top)
            lines.append(f"{'':>6}{_piece(tokenizer, token):>16} {lp:>9.4f}{' *' if greedy else '  '}  top: {alts}")
    return "\n".join(lines)


def _piece(tokenizer: Tokenizer, token: int) -> str:
    return json.dumps(tokenizer.decode([token]), ensure_ascii=False)
