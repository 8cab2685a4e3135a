"""Which tokens decided a classifier's label: integrated gradients and occlusion, both by captum.

- ``"ig"``: captum's :class:`~captum.attr.LayerIntegratedGradients` on the token embedding (``wte``), from a
  baseline in which every token is the padding token (end-of-text) at the same positions, to the text. A
  token's attribution is the sum over its embedding's dimensions. Completeness: the attributions add up to
  ``F(text) - F(baseline)``; ``delta`` reports what is left over (smaller with more ``steps``).
- ``"occlusion"``: captum's :class:`~captum.attr.Occlusion` over the token ids, one token at a time replaced
  by the padding token: a token's attribution is ``F(text) - F(text with it replaced)``.

``F`` is the predicted label's probability (the softmax of the classifier's logits), so attributions are in
units of probability. Gradients need the model's layers to have a backward: int8-quantized layers
(gptforge.backends.quant) do not, and integrated gradients are refused there (occlusion works).
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
import torch.nn as nn

from ..backends import Int8Linear
from ..config import EXPLAIN_METHODS
from ..data.finetune import pad_id_of
from ..errors import ConfigError, DataError
from ..heads import TaskModel
from ..tokenizer import Tokenizer
from .tokens import token_text

log = logging.getLogger(__name__)


def _probability_fn(model: nn.Module):
    def forward(ids: torch.Tensor) -> torch.Tensor:  # (N, T) -> (N, num_labels)
        return model(ids).float().softmax(dim=-1)
    return forward


def encode_for_classifier(model: nn.Module, tokenizer: Tokenizer, text: str) -> list[int]:
    """The ids the classifier reads for ``text`` (its start, if longer than the context), refusing an empty one."""
    ids = tokenizer.encode(text)
    if not ids:
        raise DataError("the text is empty; the classifier needs at least one token to explain")
    block = model.base.config.block_size
    if len(ids) > block:
        log.warning("the text is %d tokens, longer than the model's context; explaining its first %d, as the "
                    "classifier reads them", len(ids), block)
    return ids[:block]


def attribute(model: TaskModel, tokenizer: Tokenizer, text: str, labels: Sequence[str], *, method: str = "ig",
              steps: int = 64) -> dict[str, Any]:
    """The classifier's prediction for ``text`` and each token's attribution to it by ``method``.

    Returns ``{"text", "label", "probabilities", "method", "target", "tokens": [{"index", "id", "text",
    "attribution"}], "baseline_prob", "delta"}``; ``delta`` (integrated gradients only) is the attributions'
    sum minus ``F(text) - F(baseline)``."""
    if method not in EXPLAIN_METHODS:
        raise ConfigError(f"explain method must be {' or '.join(EXPLAIN_METHODS)}, got {method!r}")
    if not isinstance(model, TaskModel) or model.task != "classify":
        raise ConfigError("token attributions explain a classifier (a checkpoint fine-tuned with --task classify)")
    if method == "ig" and any(isinstance(m, Int8Linear) for m in model.modules()):
        raise ConfigError("integrated gradients need gradients through the model, which int8-quantized layers do "
                          "not have; use the occlusion method or a model that is not quantized")
    from captum.attr import LayerIntegratedGradients, Occlusion

    ids = encode_for_classifier(model, tokenizer, text)
    device = next(model.parameters()).device
    pad = pad_id_of(tokenizer)
    forward = _probability_fn(model)
    # The server's scheduler runs jobs under inference_mode: attributions need autograd (IG) or at least
    # ordinary tensors, so both leave it here, and make their tensors here.
    with torch.inference_mode(False), torch.enable_grad():
        idx = torch.tensor([ids], dtype=torch.long, device=device)
        baseline = torch.full_like(idx, pad)
        was_training = model.training
        model.eval()
        try:
            probs = forward(idx)[0].detach()
            target = int(probs.argmax())
            base_prob = float(forward(baseline)[0, target].detach())
            if method == "ig":
                lig = LayerIntegratedGradients(forward, model.base.wte)
                attributions, delta = lig.attribute(idx, baselines=baseline, target=target, n_steps=steps,
                                                    return_convergence_delta=True)
                scores = attributions.sum(dim=-1)[0]  # (T,)
                delta_value = float(delta.reshape(-1)[0])
            else:
                scores = Occlusion(forward).attribute(idx, sliding_window_shapes=(1,), baselines=pad,
                                                      target=target)[0]
                delta_value = None
        finally:
            model.train(was_training)
    return {
        "text": text, "label": labels[target],
        "probabilities": {label: float(p) for label, p in zip(labels, probs)},
        "method": method, "target": labels[target], "baseline_prob": base_prob, "delta": delta_value,
        "tokens": [{"index": i, "id": t, "text": token_text(tokenizer, t), "attribution": float(a)}
                   for i, (t, a) in enumerate(zip(ids, scores.detach().float().cpu()))],
    }


def classify_with_attributions(model: TaskModel, tokenizer: Tokenizer, texts: Sequence[str], labels: Sequence[str],
                               *, method: str = "ig", steps: int = 64) -> list[dict[str, Any]]:
    """:func:`gptforge.evaluate.predict.classify_texts`' results, each with its ``attributions``
    (:func:`attribute`'s ``method``, ``tokens`` and ``delta``); what ``/v1/classify`` with ``explain`` answers."""
    results = []
    for text in texts:
        a = attribute(model, tokenizer, text, labels, method=method, steps=steps)
        results.append({"text": text, "label": a["label"], "probabilities": a["probabilities"],
                        "attributions": {"method": a["method"], "target": a["target"], "delta": a["delta"],
                                         "tokens": [{"text": t["text"], "id": t["id"], "attribution": t["attribution"]}
                                                    for t in a["tokens"]]}})
    return results


__all__ = ["attribute", "classify_with_attributions", "encode_for_classifier"]
