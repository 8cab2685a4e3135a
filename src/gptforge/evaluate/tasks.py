"""Evaluating a task model on validation data: the metrics fine-tuning reports and early stopping follows.

Each task reports a few headline metrics and a detailed report:

- lm: ``val_loss`` (nats per scored token), ``perplexity``, ``bits_per_byte`` (bytes of the scored text);
- classify: ``val_loss``, ``accuracy``, ``macro_f1``, ``weighted_f1``; per-class precision / recall / F1
  and the confusion matrix (:func:`gptforge.evaluate.classification.classification_report`);
- tokens: ``val_loss``, ``entity_precision`` / ``entity_recall`` / ``entity_f1`` (exact-match entities,
  :func:`gptforge.evaluate.ner.ner_report`) and ``token_accuracy`` (per word, first sub-word's tag).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from ..data.finetune import EncodedExample, collate, load_eval_data, pad_id_of
from ..heads import forward_loss
from .classification import classification_report
from .ner import ner_report
from .predict import block_size_of, device_of, load_for_task, word_tags

HEADLINE = {
    "lm": ("val_loss", "perplexity", "bits_per_byte"),
    "classify": ("val_loss", "accuracy", "macro_f1", "weighted_f1"),
    "tokens": ("val_loss", "entity_precision", "entity_recall", "entity_f1", "token_accuracy"),
}


@torch.no_grad()
def evaluate_task(model: torch.nn.Module, examples: Sequence[EncodedExample], task: dict[str, Any], *,
                  pad_id: int, batch_size: int = 16, device: str | torch.device = "cpu",
                  autocast_dtype: Optional[torch.dtype] = None) -> dict[str, Any]:
    """``{"metrics": headline metrics, "report": the task's detailed report}`` on ``examples``."""
    device = torch.device(device)
    kind = task["type"]
    was_training = model.training
    model.eval()
    total_loss, total_scored, target_bytes = 0.0, 0, 0
    y_true: list[int] = []
    y_pred: list[int] = []
    tag_true: list[list[str]] = []
    tag_pred: list[list[str]] = []
    try:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items() if isinstance(v, torch.Tensor)}
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                loss, scored, logits = forward_loss(model, batch, kind)
            total_loss += loss.item()
            total_scored += int(scored)
            if kind == "lm":
                target_bytes += sum(ex.target_bytes for ex in chunk)
            elif kind == "classify":
                y_true.extend(ex.labels for ex in chunk)
                y_pred.extend(logits.argmax(-1).tolist())
            else:
                predicted = logits.argmax(-1).cpu()
                for row, ex in enumerate(chunk):
                    tag_true.append(list(ex.tags))
                    tag_pred.append(word_tags(predicted[row], ex.word_starts, len(ex.tags), task["labels"]))
    finally:
        model.train(was_training)
    loss = total_loss / max(total_scored, 1)
    if kind == "lm":
        bpb = total_loss / math.log(2) / target_bytes if target_bytes else None
        metrics = {"val_loss": loss, "perplexity": math.exp(min(loss, 700.0)), "bits_per_byte": bpb}
        return {"metrics": metrics, "report": {**metrics, "tokens": total_scored, "examples": len(examples)}}
    if kind == "classify":
        names = task["labels"]
        report = classification_report([names[i] for i in y_true], [names[i] for i in y_pred], names)
        metrics = {"val_loss": loss, "accuracy": report["accuracy"], "macro_f1": report["macro"]["f1"],
                   "weighted_f1": report["weighted"]["f1"]}
        return {"metrics": metrics, "report": report}
    report = ner_report(tag_true, tag_pred)
    words = sum(len(t) for t in tag_true)
    correct = sum(a == b for t, p in zip(tag_true, tag_pred) for a, b in zip(t, p))
    metrics = {"val_loss": loss, "entity_precision": report["micro"]["precision"],
               "entity_recall": report["micro"]["recall"], "entity_f1": report["micro"]["f1"],
               "token_accuracy": correct / max(words, 1)}
    return {"metrics": metrics, "report": report}


def evaluate_checkpoint(checkpoint: str | Path, data_file: str | Path, *, task: Optional[str] = None,
                        device: str = "auto", batch_size: int = 16, max_length: Optional[int] = None) -> dict[str, Any]:
    """Evaluate a checkpoint on a data file of its task: ``{"task", "checkpoint", "metrics", "report"}``.

    The library call behind ``gptforge evaluate``.
    """
    ckpt = load_for_task(checkpoint, task, device)
    info = ckpt.config["task"]
    block = block_size_of(ckpt.model)
    examples = load_eval_data(data_file, info, ckpt.tokenizer, min(max_length or block, block))
    result = evaluate_task(ckpt.model, examples, info, pad_id=pad_id_of(ckpt.tokenizer), batch_size=batch_size,
                           device=device_of(ckpt.model))
    return {"task": info["type"], "checkpoint": str(ckpt.path), **result}
