"""The examples of a fine-tuning run: read, split, encoded for the model, and drawn in batches.

Reading and encoding each task's files is :mod:`gptforge.data.finetune`'s job; this module picks the
right functions for the task, holds out validation examples when no validation file is given, and draws
batches in an order fixed by (seed, epoch) so that a resumed run sees the same batches.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from ..config import FinetuneConfig
from ..data import finetune as ft_data
from ..errors import DataError
from ..tokenizer import DEFAULT_CHAT_TEMPLATE, Tokenizer

log = logging.getLogger(__name__)


@dataclass
class Encoded:
    """One example ready for the model; ``words``/``tags`` are kept for token tagging's entity report,
    ``target_bytes`` (lm) for bits per byte."""

    input_ids: list[int]
    labels: Any  # list[int] (lm, tokens; -100 = not scored) or int (classify)
    word_starts: Optional[list[int]] = None
    tags: Optional[list[str]] = None
    target_bytes: int = 0

    def as_item(self) -> dict[str, Any]:
        return {"input_ids": self.input_ids, "labels": self.labels}


@dataclass
class TaskData:
    """A task's training and validation examples and its task section (type, labels, chat template)."""

    task: dict[str, Any]
    train: list[Encoded]
    val: list[Encoded] = field(default_factory=list)


def max_example_length(config: FinetuneConfig, block_size: int) -> int:
    """Longest encoded example: max_length, capped by the model's context."""
    return min(config.max_length, block_size)


def load_task_data(config: FinetuneConfig, tokenizer: Tokenizer, block_size: int) -> TaskData:
    """Read and encode ``config.train_file`` (and ``val_file``, or a held-out share of the training file)."""
    max_length = max_example_length(config, block_size)
    readers = {"lm": ft_data.load_lm_examples, "classify": ft_data.load_classification_examples,
               "tokens": ft_data.load_token_examples}
    read = readers[config.task]
    train_raw = read(config.train_file)
    if config.val_file is not None:
        val_raw = read(config.val_file)
    else:
        train_raw, val_raw = split_off_validation(train_raw, config.val_fraction, config.seed)
        log.info("holding out %d of %d examples of %s for validation", len(val_raw),
                 len(train_raw) + len(val_raw), config.train_file)
    val_source = config.val_file or config.train_file
    if config.task == "lm":
        template = config.chat_template or DEFAULT_CHAT_TEMPLATE
        task = {"type": "lm", "labels": [], "chat_template": template}
        return TaskData(task, encode_lm(tokenizer, train_raw, template, config.train_on_prompt, max_length),
                        encode_lm(tokenizer, val_raw, template, False, max_length))
    if config.task == "classify":
        labels = ft_data.build_label_map([label for _, label in train_raw])
        ft_data.check_labels([label for _, label in val_raw], labels, val_source)
        task = {"type": "classify", "labels": labels, "chat_template": None}
        return TaskData(task, encode_classify(tokenizer, train_raw, labels, max_length),
                        encode_classify(tokenizer, val_raw, labels, max_length))
    labels = ft_data.build_label_map([tag for _, tags in train_raw for tag in tags])
    ft_data.check_tags([tags for _, tags in val_raw], labels, val_source)
    task = {"type": "tokens", "labels": labels, "chat_template": None}
    return TaskData(task, encode_tokens(tokenizer, train_raw, labels, max_length),
                    encode_tokens(tokenizer, val_raw, labels, max_length))


def load_eval_data(path: str | Path, task: dict[str, Any], tokenizer: Tokenizer, max_length: int) -> list[Encoded]:
    """The examples of ``path`` encoded for a checkpoint's task (its labels must cover the file's)."""
    if task["type"] == "lm":
        template = task.get("chat_template") or DEFAULT_CHAT_TEMPLATE
        return encode_lm(tokenizer, ft_data.load_lm_examples(path), template, False, max_length)
    if task["type"] == "classify":
        raw = ft_data.load_classification_examples(path)
        ft_data.check_labels([label for _, label in raw], task["labels"], path)
        return encode_classify(tokenizer, raw, task["labels"], max_length)
    raw = ft_data.load_token_examples(path)
    ft_data.check_tags([tags for _, tags in raw], task["labels"], path)
    return encode_tokens(tokenizer, raw, task["labels"], max_length)


def split_off_validation(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, validation): a seeded random ``fraction`` (at least one example) held out."""
    if len(examples) < 2:
        raise DataError(f"{len(examples)} example cannot be split into training and validation data; "
                        "give a validation file (--val)")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = min(len(examples) - 1, max(1, round(fraction * len(examples))))
    held = set(order[:n_val])
    return ([ex for i, ex in enumerate(examples) if i not in held],
            [ex for i, ex in enumerate(examples) if i in held])


# --------------------------------------------------------------------------------------------------
# Encoding per task
def encode_lm(tokenizer: Tokenizer, examples: Sequence[Any], template: str, train_on_prompt: bool,
              max_length: int) -> list[Encoded]:
    """Encoded LM examples (those left with no trained token are dropped, with a warning)."""
    out = []
    for item in ft_data.encode_lm_examples(tokenizer, examples, template=template,
                                           train_on_prompt=train_on_prompt, max_length=max_length):
        labels = list(item["labels"])
        # Bits per byte counts the bytes of the text the model is scored on (labels[1:]: the first token
        # is never predicted).
        scored = [t for t in labels[1:] if t != ft_data.IGNORE_INDEX]
        out.append(Encoded(list(item["input_ids"]), labels, target_bytes=len(tokenizer.decode(scored).encode("utf-8"))))
    return out


def encode_classify(tokenizer: Tokenizer, pairs: Sequence[tuple[str, str]], labels: list[str],
                    max_length: int) -> list[Encoded]:
    index = {label: i for i, label in enumerate(labels)}
    texts = [text for text, _ in pairs]
    label_ids = [index[label] for _, label in pairs]
    encoded = ft_data.encode_classification(tokenizer, texts, label_ids, max_length)
    return [Encoded(list(item["input_ids"]), int(item["labels"])) for item in encoded]


def encode_tokens(tokenizer: Tokenizer, examples: Sequence[tuple[list[str], list[str]]], labels: list[str],
                  max_length: int) -> list[Encoded]:
    index = {label: i for i, label in enumerate(labels)}
    encoded = ft_data.encode_token_examples(tokenizer, [words for words, _ in examples],
                                            [[index[t] for t in tags] for _, tags in examples], max_length)
    return [Encoded(list(item["input_ids"]), list(item["labels"]), word_starts=list(item["word_starts"]),
                    tags=list(tags)) for item, (_, tags) in zip(encoded, examples)]


# --------------------------------------------------------------------------------------------------
# Batches
def batches_per_epoch(n_examples: int, batch_size: int) -> int:
    return math.ceil(n_examples / batch_size)


def epoch_order(n_examples: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches (lists of example indices) of one epoch: a permutation fixed by (seed, epoch)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n_examples, generator=generator).tolist()
    return [order[i:i + batch_size] for i in range(0, n_examples, batch_size)]


def make_batch(examples: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels tensors for a list of examples."""
    return ft_data.collate([ex.as_item() for ex in examples], pad_id)
