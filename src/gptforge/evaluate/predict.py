"""Running a fine-tuned task model: loading it for its task, classifying texts, tagging words.

The library calls behind ``gptforge classify`` and ``gptforge tag``, and the server's ``/v1/classify``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from ..checkpoint import TASK_NAMES, Checkpoint, load_task_checkpoint
from ..data.finetune import collate, encode_classification, encode_words, pad_id_of
from ..errors import ConfigError
from ..runtime import resolve_device
from ..tokenizer import Tokenizer


def load_for_task(checkpoint: str | Path, task: Optional[str], device: str = "auto") -> Checkpoint:
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


@torch.no_grad()
def classify_texts(model: torch.nn.Module, tokenizer: Tokenizer, texts: Sequence[str], labels: Sequence[str],
                   *, batch_size: int = 16) -> list[dict[str, Any]]:
    """For each text, the predicted label and every label's probability."""
    examples = encode_classification(tokenizer, list(texts), [0] * len(texts), block_size_of(model))
    results = []
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start:start + batch_size], pad_id_of(tokenizer))
        batch = {k: v.to(device_of(model)) for k, v in batch.items()}
        probs = model(batch["input_ids"], attention_mask=batch["attention_mask"]).float().softmax(-1).cpu()
        for text, row in zip(texts[start:start + batch_size], probs):
            results.append({"text": text, "label": labels[int(row.argmax())],
                            "probabilities": {label: float(p) for label, p in zip(labels, row)}})
    return results


@torch.no_grad()
def tag_texts(model: torch.nn.Module, tokenizer: Tokenizer, texts: Sequence[str], labels: Sequence[str]
              ) -> list[dict[str, Any]]:
    """For each text (split into words at whitespace), one tag per word and the entities they spell."""
    results = []
    for text in texts:
        words = text.split()
        if not words:
            results.append({"text": text, "words": [], "tags": [], "entities": []})
            continue
        input_ids, _, word_starts = encode_words(tokenizer, words, [0] * len(words), block_size_of(model))
        ids = torch.tensor([list(input_ids)], device=device_of(model))
        predicted = model(ids, attention_mask=torch.ones_like(ids))[0].argmax(-1).cpu()
        tags = word_tags(predicted, list(word_starts), len(words), labels)
        results.append({"text": text, "words": words, "tags": tags, "entities": bio_entities(words, tags)})
    return results


def word_tags(predicted: torch.Tensor, word_starts: Sequence[int], n_words: int, labels: Sequence[str]) -> list[str]:
    """One tag per word, read at its first sub-word; words cut off by truncation get ``O``."""
    tags = [labels[int(predicted[i])] for i in word_starts[:n_words]]
    return tags + ["O"] * (n_words - len(tags))


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


def block_size_of(model: torch.nn.Module) -> int:
    """The context length of a GPT or of a TaskModel's base GPT."""
    base = getattr(model, "base", model)
    return base.config.block_size


def device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


__all__ = ["load_for_task", "classify_texts", "tag_texts", "word_tags", "bio_entities",
           "block_size_of", "device_of"]
