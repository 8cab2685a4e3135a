"""Per-token probabilities of a text under a language model: how sure it was of each token, and of what else.

Token ``i`` (``i >= 1``) is predicted at position ``i - 1``: its probability is ``softmax(logits[i - 1])[token_i]``,
with the ``top_k`` most likely tokens there and the distribution's entropy (in nats). The first token has no
prediction. All of it is read from one full forward's logits (float32), the model's own.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from ..tokenizer import Tokenizer


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    """One token's text as the tokenizer decodes it alone (a byte-level piece of a character shows as U+FFFD)."""
    return tokenizer.decode([int(token_id)])


def token_probabilities(logits: torch.Tensor, ids: Sequence[int], tokenizer: Tokenizer, *, top_k: int,
                        n_prompt: int) -> list[dict[str, Any]]:
    """One entry per token of ``ids`` from ``logits`` (T, V) of a forward over them: ``index``, ``id``, ``text``,
    ``generated`` (after the first ``n_prompt`` tokens), and for every token but the first ``prob``,
    ``logprob``, ``rank`` (1 = the most likely), ``entropy`` (nats) and ``alternatives`` (top_k of
    ``{"id", "text", "prob"}``, most likely first)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (T, V)
    probs = logprobs.exp()
    k = min(top_k, probs.shape[-1])
    top_p, top_i = probs.topk(k, dim=-1)  # (T, k)
    entropy = -(probs * logprobs.clamp(min=-1e30)).nan_to_num().sum(-1)  # (T,); 0 * -inf counted as 0
    out = []
    for i, token in enumerate(ids):
        entry: dict[str, Any] = {"index": i, "id": int(token), "text": token_text(tokenizer, token),
                                 "generated": i >= n_prompt}
        if i > 0:
            row = i - 1
            lp = float(logprobs[row, token])
            entry.update({
                "prob": math.exp(lp), "logprob": lp,
                "rank": int((probs[row] > probs[row, token]).sum()) + 1,
                "entropy": float(entropy[row]),
                "alternatives": [{"id": int(t), "text": token_text(tokenizer, int(t)), "prob": float(p)}
                                 for p, t in zip(top_p[row], top_i[row])],
            })
        out.append(entry)
    return out


def sure_and_unsure(tokens: Sequence[dict[str, Any]], n: int = 3) -> dict[str, list[int]]:
    """Indices of the ``n`` tokens the model gave the highest and the lowest probability (first token left out)."""
    scored = sorted((t for t in tokens if "prob" in t), key=lambda t: (t["prob"], -t["index"]))
    return {"most_sure": [t["index"] for t in reversed(scored[-n:])], "least_sure": [t["index"] for t in scored[:n]]}


__all__ = ["sure_and_unsure", "token_probabilities", "token_text"]
