"""The server's scoring answers, as plain data: ``POST /v1/score`` and the prompt's log-probabilities of
OpenAI's legacy scoring form (``/v1/completions`` with ``echo`` and ``logprobs``).

The numbers come from :mod:`gptforge.generate.score` (the one scorer, run on the scheduler thread by the
app); this module only checks a request against the model's limits and lays the results out in OpenAI's
shapes. It holds no HTTP: :class:`ScoreRequestError` carries the field at fault, which the app answers
with a 400.
"""

from __future__ import annotations

from typing import Optional, Sequence

from ..errors import GptforgeError
from ..generate.score import encode_pair, prompt_logprobs, score
from ..tokenizer import IncrementalDecoder, Tokenizer

__all__ = ["MAX_SCORE_CANDIDATES", "ScoreRequestError", "check_candidates", "prompt_legacy_logprobs",
           "score_candidates"]

MAX_SCORE_CANDIDATES = 256
"""Most candidates one /v1/score request may carry (the limit /v1/classify has on its texts)."""


class ScoreRequestError(GptforgeError):
    """A scoring request the model cannot answer: too long, empty, too many candidates."""

    def __init__(self, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.param, self.code = param, code


def check_candidates(tokenizer: Tokenizer, context: str, candidates: Sequence[str], block_size: int) -> int:
    """Check a /v1/score request against the model, tokenized as the scorer tokenizes it
    (:func:`~gptforge.generate.score.encode_pair`); the tokens the model reads: the context's once (it is
    prefilled once) and each candidate's."""
    if len(candidates) > MAX_SCORE_CANDIDATES:
        raise ScoreRequestError(f"at most {MAX_SCORE_CANDIDATES} candidates per request, got {len(candidates)}",
                                param="candidates")
    n_context, total = 0, 0
    try:
        for i, text in enumerate(candidates):
            context_ids, ids = encode_pair(tokenizer, context, text)
            n_context = len(context_ids)
            if n_context > block_size:
                raise ScoreRequestError(f"this model's context is {block_size} tokens and the context alone has "
                                        f"{n_context}; shorten it", param="context", code="context_length_exceeded")
            if not ids:
                raise ScoreRequestError(f"candidate {i} ({text!r}) has no tokens of its own after the context; "
                                        "every candidate needs at least one", param="candidates")
            if n_context + len(ids) - 1 > block_size:  # the last token is predicted, never fed
                raise ScoreRequestError(f"this model's context is {block_size} tokens, but candidate {i} needs "
                                        f"{n_context} context tokens + {len(ids)}; shorten the context or the "
                                        "candidate", param="candidates", code="context_length_exceeded")
            total += len(ids)
    except ScoreRequestError:
        raise
    except GptforgeError as exc:  # no end-of-text token to start an empty context from
        raise ScoreRequestError(str(exc), param="context") from None
    return n_context + total


def score_candidates(model, tokenizer: Tokenizer, context: str, candidates: Sequence[str], *, normalize: str,
                     top_logprobs: Optional[int]) -> list[dict]:
    """/v1/score's ``data``: one entry per candidate, in the request's order, from
    :func:`~gptforge.generate.score.score`; with ``top_logprobs`` set (0..20), each entry's ``logprobs`` in the
    completions shape (tokens, token_logprobs, top_logprobs, text_offset into the candidate)."""
    results = score(model, tokenizer, context, candidates, normalize=normalize, top_logprobs=top_logprobs or 0)
    data = []
    for i, r in enumerate(results):
        entry = {"index": i, "object": "score", "text": r.text, "logprob": r.logprob,
                 "mean_logprob": r.mean_logprob, "tokens": r.tokens, "bytes": r.bytes, "score": r.score,
                 "rank": r.rank}
        if top_logprobs is not None:
            ts = r.token_scores
            entry["logprobs"] = _legacy(tokenizer, ts.token_ids, ts.logprobs, ts.top, top_logprobs)
        data.append(entry)
    return data


def prompt_legacy_logprobs(model, tokenizer: Tokenizer, ids: Sequence[int], top_n: int) -> dict:
    """OpenAI's legacy ``logprobs`` object for a prompt's tokens ``ids``, from
    :func:`~gptforge.generate.score.prompt_logprobs`: ``tokens`` (each token's text), ``token_logprobs``
    (the first null: nothing precedes it), ``top_logprobs`` (per position the ``top_n`` likeliest tokens'
    texts → log-probabilities; null at the first position, and everywhere when ``top_n`` is 0, as for
    generated tokens) and ``text_offset`` (where each token starts in the prompt's text, in characters; a
    multi-byte character split over tokens counts from the token that completes it)."""
    scores = prompt_logprobs(model, ids, top_logprobs=top_n)
    return _legacy(tokenizer, scores.token_ids, scores.logprobs, scores.top, top_n)


def _top_dict(tokenizer: Tokenizer, top) -> Optional[dict[str, float]]:
    if top is None:
        return None
    out: dict[str, float] = {}
    for token_id, logprob in top:
        out.setdefault(tokenizer.decode([token_id]), logprob)  # two ids with one text: the likelier one
    return out


def _legacy(tokenizer: Tokenizer, ids: Sequence[int], logprobs: Sequence[Optional[float]], top: Optional[Sequence],
            top_n: int) -> dict:
    decoder = IncrementalDecoder(tokenizer)
    offsets, offset = [], 0
    for token_id in ids:
        offsets.append(offset)
        offset += len(decoder.push(token_id))
    tops = [_top_dict(tokenizer, top[i][:top_n]) if top_n and top is not None and top[i] is not None else None
            for i in range(len(ids))]
    return {"tokens": [tokenizer.decode([t]) for t in ids], "token_logprobs": list(logprobs),
            "top_logprobs": tops, "text_offset": offsets}
