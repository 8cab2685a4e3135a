"""Evaluating a task model on validation data, the before/after report, and inference for the CLI.

Each task reports a few headline metrics (the ones early stopping can follow) and a detailed report:

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
import torch.nn.functional as F

from ..checkpoint import TASK_NAMES, load_task_checkpoint
from ..errors import ConfigError
from ..runtime import resolve_device
from ..tokenizer import Tokenizer
from .data import Encoded, load_eval_data, make_batch

IGNORE_INDEX = -100
HEADLINE = {
    "lm": ("val_loss", "perplexity", "bits_per_byte"),
    "classify": ("val_loss", "accuracy", "macro_f1", "weighted_f1"),
    "tokens": ("val_loss", "entity_precision", "entity_recall", "entity_f1", "token_accuracy"),
}


def pad_id_of(tokenizer: Tokenizer) -> int:
    """Padding id: end-of-text when the tokenizer has one (padding is masked, so any id would do)."""
    return tokenizer.eos_id if tokenizer.eos_id is not None else 0


def forward_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], task: str
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(summed cross-entropy, number of scored targets, logits) of one batch.

    lm: next-token loss over the positions whose label is not -100 (prompt and padding score nothing);
    classify: one label per row, read at the row's last real token; tokens: one tag per first sub-word.
    """
    input_ids, labels = batch["input_ids"], batch["labels"]
    if task == "lm":
        logits = model(input_ids)  # (B, T, V); right padding needs no mask under causal attention
        targets = labels[:, 1:]  # the label of token t+1 is predicted at t
        scored = logits[:, :-1]
    else:
        logits = model(input_ids, attention_mask=batch["attention_mask"])  # (B, L) or (B, T, L)
        targets, scored = labels, logits
    flat = scored.float().reshape(-1, scored.size(-1))
    loss = F.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, (targets != IGNORE_INDEX).sum(), logits


@torch.no_grad()
def evaluate_task(model: torch.nn.Module, examples: Sequence[Encoded], task: dict[str, Any], *,
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
            batch = {k: v.to(device) for k, v in make_batch(chunk, pad_id).items()}
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
        from ..evaluate.classification import classification_report

        names = task["labels"]
        report = classification_report([names[i] for i in y_true], [names[i] for i in y_pred], names)
        metrics = {"val_loss": loss, "accuracy": report["accuracy"], "macro_f1": report["macro"]["f1"],
                   "weighted_f1": report["weighted"]["f1"]}
        return {"metrics": metrics, "report": report}
    from ..evaluate.ner import ner_report

    report = ner_report(tag_true, tag_pred)
    words = sum(len(t) for t in tag_true)
    correct = sum(a == b for t, p in zip(tag_true, tag_pred) for a, b in zip(t, p))
    metrics = {"val_loss": loss, "entity_precision": report["micro"]["precision"],
               "entity_recall": report["micro"]["recall"], "entity_f1": report["micro"]["f1"],
               "token_accuracy": correct / max(words, 1)}
    return {"metrics": metrics, "report": report}


def word_tags(predicted: torch.Tensor, word_starts: Sequence[int], n_words: int, labels: Sequence[str]) -> list[str]:
    """One tag per word, read at its first sub-word; words cut off by truncation get ``O``."""
    tags = [labels[int(predicted[i])] for i in word_starts[:n_words]]
    return tags + ["O"] * (n_words - len(tags))


# --------------------------------------------------------------------------------------------------
# Reports
def format_before_after(before: Optional[dict[str, Any]], after: dict[str, Any], task: str) -> str:
    """The headline metrics before and after fine-tuning, side by side."""
    rows = [("metric", "before", "after", "change")]
    for name in HEADLINE[task]:
        b = before.get(name) if before else None
        a = after.get(name)
        change = f"{a - b:+.4f}" if a is not None and b is not None else ""
        rows.append((name, _num(b), _num(a), change))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                               enumerate(zip(row, widths))) for row in rows)


def format_task_report(task: str, report: dict[str, Any]) -> str:
    """The detailed report of one evaluation (per-class or per-entity-type tables)."""
    if task == "classify":
        from ..evaluate.classification import format_report

        return format_report(report)
    if task == "tokens":
        from ..evaluate.ner import format_ner_report

        return format_ner_report(report)
    return "  ".join(f"{k} {_num(report.get(k))}" for k in HEADLINE["lm"]) + f"  ({report['tokens']:,} tokens)"


def _num(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.4f}"


# --------------------------------------------------------------------------------------------------
# Library calls behind `gptforge evaluate`, `classify` and `tag`
def load_for_task(checkpoint: str | Path, task: Optional[str], device: str = "auto"):
    """The task checkpoint at ``checkpoint``, refused with one line if it was made for another task."""
    ckpt = load_task_checkpoint(checkpoint, device=resolve_device(device))
    have = ckpt.config["task"]["type"]
    if task is not None and task != have:
        if have == "lm":
            raise ConfigError(f"checkpoint {ckpt.path} is a language model with no {TASK_NAMES[task]} head; "
                              f"fine-tune it first (gptforge finetune --task {task})")
        raise ConfigError(f"checkpoint {ckpt.path} was fine-tuned for {TASK_NAMES[have]} (task {have!r}), "
                          f"not {TASK_NAMES[task]} (task {task!r})")
    return ckpt


def evaluate_checkpoint(checkpoint: str | Path, data_file: str | Path, *, task: Optional[str] = None,
                        device: str = "auto", batch_size: int = 16, max_length: Optional[int] = None) -> dict[str, Any]:
    """Evaluate a checkpoint on a data file of its task: ``{"task", "checkpoint", "metrics", "report"}``."""
    ckpt = load_for_task(checkpoint, task, device)
    info = ckpt.config["task"]
    block = _block_size(ckpt.model)
    examples = load_eval_data(data_file, info, ckpt.tokenizer, min(max_length or block, block))
    result = evaluate_task(ckpt.model, examples, info, pad_id=pad_id_of(ckpt.tokenizer), batch_size=batch_size,
                           device=_device_of(ckpt.model))
    return {"task": info["type"], "checkpoint": str(ckpt.path), **result}


@torch.no_grad()
def classify_texts(model: torch.nn.Module, tokenizer: Tokenizer, texts: Sequence[str], labels: Sequence[str],
                   *, batch_size: int = 16) -> list[dict[str, Any]]:
    """For each text, the predicted label and every label's probability."""
    from ..data.finetune import encode_classification

    encoded = encode_classification(tokenizer, list(texts), [0] * len(texts), _block_size(model))
    examples = [Encoded(list(item["input_ids"]), 0) for item in encoded]
    results = []
    for start in range(0, len(examples), batch_size):
        batch = make_batch(examples[start:start + batch_size], pad_id_of(tokenizer))
        batch = {k: v.to(_device_of(model)) for k, v in batch.items()}
        probs = model(batch["input_ids"], attention_mask=batch["attention_mask"]).float().softmax(-1).cpu()
        for text, row in zip(texts[start:start + batch_size], probs):
            results.append({"text": text, "label": labels[int(row.argmax())],
                            "probabilities": {label: float(p) for label, p in zip(labels, row)}})
    return results


@torch.no_grad()
def tag_texts(model: torch.nn.Module, tokenizer: Tokenizer, texts: Sequence[str], labels: Sequence[str]
              ) -> list[dict[str, Any]]:
    """For each text (split into words at whitespace), one tag per word and the entities they spell."""
    from ..data.finetune import encode_words

    results = []
    for text in texts:
        words = text.split()
        if not words:
            results.append({"text": text, "words": [], "tags": [], "entities": []})
            continue
        input_ids, _, word_starts = encode_words(tokenizer, words, [0] * len(words), _block_size(model))
        ids = torch.tensor([list(input_ids)], device=_device_of(model))
        predicted = model(ids, attention_mask=torch.ones_like(ids))[0].argmax(-1).cpu()
        tags = word_tags(predicted, list(word_starts), len(words), labels)
        results.append({"text": text, "words": words, "tags": tags, "entities": bio_entities(words, tags)})
    return results


def bio_entities(words: Sequence[str], tags: Sequence[str]) -> list[dict[str, Any]]:
    """Entities from BIO tags: ``{"type", "text", "start", "end"}`` with word indices, end exclusive.

    An ``I-X`` that does not continue an ``X`` starts one (as seqeval reads it); a bare ``X`` counts as ``I-X``.
    """
    entities: list[dict[str, Any]] = []
    current: Optional[dict[str, Any]] = None
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, kind = _split_tag(tag)
        continues = current is not None and prefix == "I" and kind == current["type"]
        if current is not None and not continues:
            entities.append({**current, "end": i, "text": " ".join(words[current["start"]:i])})
            current = None
        if prefix != "O" and not continues:
            current = {"type": kind, "start": i}
    return entities


def _split_tag(tag: str) -> tuple[str, str]:
    if tag == "O":
        return "O", ""
    prefix, sep, kind = tag.partition("-")
    if sep and prefix in ("B", "I"):
        return prefix, kind
    return "I", tag


def _block_size(model: torch.nn.Module) -> int:
    base = getattr(model, "base", model)
    return base.config.block_size


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device
