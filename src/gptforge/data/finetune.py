"""Fine-tuning data for every task: instruction / chat LM, text classification and token classification.

Each task has a loader that reads and checks a file and gives plain Python values, and an encoder that
turns those into token ids and labels:

- ``lm`` (:func:`load_lm_examples`): JSONL, one object per line holding one of

  - ``{"text": "..."}``: every token is trained on, then an end-of-text token;
  - ``{"prompt": "...", "completion": "..."}``: only the completion and its end-of-text token are trained;
  - ``{"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}``: rendered with a
    chat template (see :data:`gptforge.tokenizer.DEFAULT_CHAT_TEMPLATE`); only assistant replies and their
    end markers are trained. A chat example may add ``"context"``: a passage (a string), or a list of
    passages (strings, or ``{"title": ..., "text": ...}`` objects), best first, rendered in the template's
    context slot before the last user message exactly as grounded chat renders retrieved passages
    (:data:`gptforge.tokenizer.CONTEXT_ROLE`); passages are cut before the conversation to fit
    ``max_length``. With a ``retrieve`` function (``gptforge finetune --knowledge kb/``), chat examples
    without a ``context`` field get theirs from the knowledge base.

- ``classify`` (:func:`load_classification_examples`): CSV with a header naming ``text`` and ``label``
  columns (others are ignored), or JSONL with ``text`` and ``label`` fields.
- ``tokens`` (:func:`load_token_examples`): CoNLL (one token per line, the token in the first
  whitespace-separated column and its tag in the last, a blank line between sentences, ``-DOCSTART-``
  lines skipped), or JSONL with ``tokens`` and ``tags`` lists of equal length.

A file whose name ends in ``.jsonl``, ``.json`` or ``.ndjson`` is read as JSONL; any other is CSV (classify)
or CoNLL (tokens). Files are strict UTF-8; a leading byte-order mark is dropped. Every problem a user can
cause raises :class:`~gptforge.errors.DataError` naming the file and the line.

Every task encodes to one example type, :class:`EncodedExample`. Its ``labels`` follow the Hugging Face
convention: for the LM and token tasks they are aligned with ``input_ids`` and hold :data:`IGNORE_INDEX`
(-100) where no loss is taken, so a causal LM loss compares ``logits[:, :-1]`` with ``labels[:, 1:]``; for
classification it is one class id. :func:`collate` right-pads a list of them into tensors;
:func:`iter_batches` groups them.

For a fine-tuning run, :func:`load_task_data` picks the task's functions, holds out validation examples
when no validation file is given, and gives a :class:`TaskData`; :func:`epoch_order` draws batches in an
order fixed by (seed, epoch), so that a resumed run sees the same batches. :func:`load_eval_data` encodes a
file for a fine-tuned checkpoint's task.
"""

from __future__ import annotations

import csv
import logging
import math
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence

import torch

from ..config import FinetuneConfig
from ..errors import ConfigError, DataError
from ..fsutil import jsonl_objects
from ..tokenizer import (DEFAULT_CHAT_TEMPLATE, EOS_TOKEN, ROLES, Tokenizer, encode_segment, fit_passages,
                         format_passage, render_chat, with_context)

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label of a position that takes no loss (PyTorch's ``cross_entropy`` default ``ignore_index``)."""

TASKS = ("lm", "classify", "tokens")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")

_LISTED_NAMES = 20  # how many known labels an "unknown label" message lists before eliding the rest


@dataclass
class EncodedExample:
    """One example ready for the model, whatever its task.

    ``labels``: a list aligned with ``input_ids`` (lm, tokens; IGNORE_INDEX where no loss is taken) or one
    class id (classify). The tokens task keeps ``word_starts`` (the position that carries each word's
    label) and ``tags`` (the words' tag names, for the entity report); lm keeps ``target_bytes``, the
    UTF-8 bytes of the scored text, for bits per byte.
    """

    input_ids: list[int]
    labels: list[int] | int
    word_starts: Optional[list[int]] = None
    tags: Optional[list[str]] = None
    target_bytes: int = 0


# --------------------------------------------------------------------------------------------------
# Reading files
def _open_text(path: Path, **kwargs):
    if not path.is_file():
        raise DataError(f"{path} not found" if not path.exists() else f"{path} is not a file")
    try:
        return open(path, encoding="utf-8-sig", errors="strict", **kwargs)
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None


def _is_jsonl(path: Path) -> bool:
    return path.suffix.lower() in JSONL_SUFFIXES


def _jsonl_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a JSONL file, read as it goes."""
    with _open_text(path) as f:
        try:
            yield from jsonl_objects(f, str(path), DataError)
        except UnicodeDecodeError:
            # Lines are decoded in blocks, so the failing line number is not known exactly.
            raise DataError(f"{path} is not valid UTF-8; convert it to UTF-8 first") from None

def _field(path: Path, lineno: int, record: Mapping[str, Any], name: str, *, allow_empty: bool = False) -> str:
    """A string field of a JSONL record, or a DataError naming the line and the field."""
    if name not in record:
        raise DataError(f"{path} line {lineno} has no \"{name}\" field")
    value = record[name]
    if not isinstance(value, str):
        raise DataError(f"{path} line {lineno}: \"{name}\" must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"{path} line {lineno}: \"{name}\" is empty")
    return value


def _no_examples(path: Path) -> DataError:
    return DataError(f"{path} holds no examples")


# --------------------------------------------------------------------------------------------------
# LM: text, prompt + completion, chat
@dataclass(frozen=True)
class LMExample:
    """One LM fine-tuning example: exactly one of ``text``, ``prompt`` + ``completion`` or ``messages``."""

    text: str | None = None
    prompt: str | None = None
    completion: str | None = None
    messages: tuple[Mapping[str, str], ...] | None = None
    context: tuple[str, ...] | None = None
    """Chat only: the passages of the context slot, formatted (title line, text), best first; None when the
    example gave none (retrieval may then fill it in), ``()`` for an explicit empty list."""

    @property
    def kind(self) -> str:
        """``text``, ``completion`` or ``chat``."""
        if self.messages is not None:
            return "chat"
        return "completion" if self.completion is not None else "text"

    def segments(self, template: str = DEFAULT_CHAT_TEMPLATE) -> list[tuple[str, bool]]:
        """The example as (text, trainable) segments; the segment ``EOS_TOKEN`` is the end-of-text token."""
        if self.messages is not None:
            return render_chat(with_context(self.messages, self.context or ()), template)
        if self.completion is not None:
            return [(self.prompt or "", False), (self.completion, True), (EOS_TOKEN, True)]
        return [(self.text or "", True), (EOS_TOKEN, True)]


def load_lm_examples(path: str | Path) -> list[LMExample]:
    """Every example of an LM fine-tuning JSONL file (see the module docstring for the three shapes)."""
    path = Path(path)
    examples = [_lm_example(path, lineno, record) for lineno, record in _jsonl_records(path)]
    if not examples:
        raise _no_examples(path)
    return examples


def _lm_example(path: Path, lineno: int, record: dict[str, Any]) -> LMExample:
    shapes = [name for name in ("text", "prompt", "messages") if name in record]
    if len(shapes) != 1:
        found = f"both \"{shapes[0]}\" and \"{shapes[1]}\"" if shapes else "none of them"
        raise DataError(f"{path} line {lineno} must have one of \"text\", \"prompt\" + \"completion\" or "
                        f"\"messages\", but has {found}")
    if "context" in record and shapes[0] != "messages":
        raise DataError(f"{path} line {lineno} has a \"context\" field, which only a \"messages\" example "
                        "takes (the passages go before its last user message)")
    if shapes[0] == "text":
        return LMExample(text=_field(path, lineno, record, "text"))
    if shapes[0] == "prompt":
        return LMExample(prompt=_field(path, lineno, record, "prompt", allow_empty=True),
                         completion=_field(path, lineno, record, "completion"))
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{path} line {lineno}: \"messages\" must be a non-empty list of "
                        "{\"role\": ..., \"content\": ...} objects")
    checked = []
    for i, message in enumerate(messages, 1):
        where = f"{path} line {lineno}, message {i}"
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{where} must be an object with \"role\" and \"content\" fields")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise DataError(f"{where} has role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{where}: \"content\" must be a string, got {type(content).__name__}")
        checked.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in checked):
        raise DataError(f"{path} line {lineno} has no assistant message, so there is nothing to train on")
    context = _context(path, lineno, record["context"], checked) if "context" in record else None
    return LMExample(messages=tuple(checked), context=context)


def _context(path: Path, lineno: int, value: Any, messages: list[dict[str, str]]) -> tuple[str, ...]:
    """The ``context`` field of a chat example as formatted passages."""
    shape = ("\"context\" must be a passage (a string) or a list of passages (strings or {\"title\": ..., "
             "\"text\": ...} objects)")
    if not any(m["role"] == "user" for m in messages):
        raise DataError(f"{path} line {lineno} has a \"context\" but no user message to put it before")
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise DataError(f"{path} line {lineno}: {shape}, got {type(value).__name__}")
    passages = []
    for i, item in enumerate(items, 1):
        if isinstance(item, dict) and isinstance(item.get("text"), str) and isinstance(item.get("title", ""), str):
            text, title = item["text"], item.get("title", "")
        elif isinstance(item, str):
            text, title = item, ""
        else:
            raise DataError(f"{path} line {lineno}, passage {i}: {shape}")
        if not text.strip():
            raise DataError(f"{path} line {lineno}, passage {i} of \"context\" is empty")
        passages.append(format_passage(text, title))
    return tuple(passages)


def _encode_segments(tokenizer: Tokenizer, segments: Sequence[tuple[str, bool]],
                     train_on_prompt: bool) -> tuple[list[int], list[int]]:
    # Each segment is tokenized on its own so that no token straddles a trained / untrained boundary.
    ids: list[int] = []
    labels: list[int] = []
    for text, trainable in segments:
        piece = encode_segment(tokenizer, text)
        ids.extend(piece)
        labels.extend(piece if trainable or train_on_prompt else [IGNORE_INDEX] * len(piece))
    return ids, labels


def _check_max_length(max_length: int) -> None:
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
        raise ConfigError(f"max_length must be a positive integer, got {max_length!r}")


def fit_example_context(tokenizer: Tokenizer, example: LMExample, template: str, max_length: int) -> LMExample:
    """``example`` with only the passages that let it fit ``max_length`` tokens (cut as grounded chat cuts
    them: :func:`gptforge.tokenizer.fit_passages`); unchanged when it has none or they all fit."""
    if not example.context:
        return example

    def fits(passages: list[str]) -> bool:
        ids, _ = _encode_segments(tokenizer, replace(example, context=tuple(passages)).segments(template), True)
        return len(ids) <= max_length

    if fits(list(example.context)):
        return example
    return replace(example, context=tuple(fit_passages(example.context, fits)))


def _encode_lm(tokenizer: Tokenizer, example: LMExample, template: str, train_on_prompt: bool,
               max_length: int) -> tuple[list[int], list[int], int]:
    example = fit_example_context(tokenizer, example, template, max_length)
    ids, labels = _encode_segments(tokenizer, example.segments(template), train_on_prompt)
    return ids[:max_length], labels[:max_length], len(ids)


def encode_lm_example(tokenizer: Tokenizer, example: LMExample, *, template: str = DEFAULT_CHAT_TEMPLATE,
                      train_on_prompt: bool = False, max_length: int) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one example; labels are IGNORE_INDEX on prompt, system and user tokens.

    With ``train_on_prompt`` every token is trained on. An example longer than ``max_length`` keeps its
    start (logged as a warning). :func:`encode_lm_examples` encodes many and warns once.
    """
    _check_max_length(max_length)
    ids, labels, full = _encode_lm(tokenizer, example, template, train_on_prompt, max_length)
    if full > max_length:
        log.warning("an example of %d tokens was cut to max_length=%d", full, max_length)
    return ids, labels


def encode_lm_examples(tokenizer: Tokenizer, examples: Sequence[LMExample], *,
                       template: str = DEFAULT_CHAT_TEMPLATE, train_on_prompt: bool = False,
                       max_length: int) -> list[EncodedExample]:
    """Encode every example; examples cut so short that no trained token is left are dropped.

    Logs one warning for all the truncated examples, and one for the dropped ones.
    """
    _check_max_length(max_length)
    encoded: list[EncodedExample] = []
    truncated = dropped = longest = 0
    for example in examples:
        ids, labels, full = _encode_lm(tokenizer, example, template, train_on_prompt, max_length)
        longest = max(longest, full)
        truncated += full > max_length
        # An example without one predicted label adds nothing but a NaN risk (a batch of them has mean loss
        # 0/0). labels[0] is never predicted: the loss compares logits[:, :-1] with labels[:, 1:].
        if all(label == IGNORE_INDEX for label in labels[1:]):
            dropped += 1
            continue
        # Bits per byte counts the bytes of the text the model is scored on (labels[1:]: the first token
        # is never predicted).
        scored = [t for t in labels[1:] if t != IGNORE_INDEX]
        encoded.append(EncodedExample(ids, labels, target_bytes=len(tokenizer.decode(scored).encode("utf-8"))))
    if truncated:
        log.warning("%d of %d examples are longer than max_length=%d tokens (the longest has %d) and keep only "
                    "their start", truncated, len(examples), max_length, longest)
    if dropped:
        log.warning("%d examples have no trained tokens within max_length=%d and are left out", dropped, max_length)
    return encoded


# --------------------------------------------------------------------------------------------------
# Classification
def load_classification_examples(path: str | Path) -> list[tuple[str, str]]:
    """``(text, label)`` pairs from a CSV file (``text`` and ``label`` columns) or a JSONL file.

    JSONL labels may be strings or integers; integers become their decimal string, so that a JSONL and a
    CSV spelling of the same data give the same label names.
    """
    path = Path(path)
    examples = _jsonl_classification(path) if _is_jsonl(path) else _csv_classification(path)
    if not examples:
        raise _no_examples(path)
    return examples


def _jsonl_classification(path: Path) -> list[tuple[str, str]]:
    examples = []
    for lineno, record in _jsonl_records(path):
        text = _field(path, lineno, record, "text")
        if "label" not in record:
            raise DataError(f"{path} line {lineno} has no \"label\" field")
        label = record["label"]
        if isinstance(label, int) and not isinstance(label, bool):
            label = str(label)
        if not isinstance(label, str) or not label.strip():
            raise DataError(f"{path} line {lineno}: \"label\" must be a non-empty string or an integer, "
                            f"got {label!r}")
        examples.append((text, label.strip()))
    return examples


def _csv_classification(path: Path) -> list[tuple[str, str]]:
    examples = []
    with _open_text(path, newline="") as f:
        reader = csv.reader(f, strict=True)
        try:
            header = next(reader, None)
            if header is None:
                raise _no_examples(path)
            names = [name.strip() for name in header]
            for column in ("text", "label"):
                if column not in names:
                    raise DataError(f"{path} has no \"{column}\" column (its header is: {', '.join(names)}); "
                                    "expected a header row naming text and label columns")
            text_at, label_at = names.index("text"), names.index("label")
            for row in reader:
                if not any(cell.strip() for cell in row):
                    continue  # a blank line
                line = reader.line_num
                if len(row) <= max(text_at, label_at):
                    missing = "text" if len(row) <= text_at else "label"
                    raise DataError(f"{path} line {line} has {len(row)} fields and no \"{missing}\" "
                                    f"(the header has {len(names)})")
                text, label = row[text_at], row[label_at].strip()
                for name, value in (("text", text), ("label", label)):
                    if not value.strip():
                        raise DataError(f"{path} line {line}: \"{name}\" is empty")
                examples.append((text, label))
        except csv.Error as exc:
            raise DataError(f"{path} line {reader.line_num} is not valid CSV: {exc}") from None
        except UnicodeDecodeError:
            raise DataError(f"{path} is not valid UTF-8; convert it to UTF-8 first") from None
    return examples


def build_label_map(labels: Iterable[str]) -> list[str]:
    """The distinct labels, sorted: a label's index is its class id (the same for the same label set)."""
    return sorted(set(labels))


def map_labels(labels: Sequence[str], label_map: Sequence[str]) -> list[int]:
    """Class ids of ``labels``; run :func:`check_labels` first to report unknown labels to the user."""
    index = {label: i for i, label in enumerate(label_map)}
    try:
        return [index[label] for label in labels]
    except KeyError as exc:
        raise ValueError(f"label {exc.args[0]!r} is not in the label map; call check_labels first") from None


def _known(label_map: Sequence[str]) -> str:
    shown = ", ".join(label_map[:_LISTED_NAMES])
    return shown + (f", … ({len(label_map)} in all)" if len(label_map) > _LISTED_NAMES else "")


def check_labels(val_labels: Sequence[str], label_map: Sequence[str], path: str | Path) -> None:
    """Raise DataError at the first label of ``path`` that the training data does not have.

    The row it names counts the file's examples from 1 (a CSV header and blank lines are not counted).
    """
    known = set(label_map)
    for row, label in enumerate(val_labels, 1):
        if label not in known:
            raise DataError(f"label {label!r} in {path} (row {row}) does not occur in the training data "
                            f"(labels: {_known(label_map)})")


def encode_classification(tokenizer: Tokenizer, texts: Sequence[str], label_ids: Sequence[int],
                          max_length: int) -> list[EncodedExample]:
    """One example per text, its ``labels`` the class id; longer texts keep their start (one warning)."""
    _check_max_length(max_length)
    if len(texts) != len(label_ids):
        raise ValueError(f"{len(texts)} texts but {len(label_ids)} labels")
    encoded: list[EncodedExample] = []
    truncated = longest = 0
    for ids, label in zip(tokenizer.encode_batch(list(texts)), label_ids):
        longest = max(longest, len(ids))
        truncated += len(ids) > max_length
        encoded.append(EncodedExample(ids[:max_length], int(label)))
    if truncated:
        log.warning("%d of %d texts are longer than max_length=%d tokens (the longest has %d) and keep only "
                    "their start", truncated, len(texts), max_length, longest)
    return encoded


# --------------------------------------------------------------------------------------------------
# Token classification
def load_token_examples(path: str | Path) -> list[tuple[list[str], list[str]]]:
    """``(tokens, tags)`` sentences from a CoNLL file or a JSONL file with ``tokens`` and ``tags`` lists."""
    path = Path(path)
    examples = _jsonl_tokens(path) if _is_jsonl(path) else _conll_tokens(path)
    if not examples:
        raise _no_examples(path)
    return examples


def _string_list(path: Path, lineno: int, record: Mapping[str, Any], name: str) -> list[str]:
    if name not in record:
        raise DataError(f"{path} line {lineno} has no \"{name}\" field")
    value = record[name]
    if not isinstance(value, list) or not value:
        raise DataError(f"{path} line {lineno}: \"{name}\" must be a non-empty list of strings")
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            raise DataError(f"{path} line {lineno}: \"{name}\" item {i + 1} must be a non-empty string, "
                            f"got {item!r}")
    return value


def _jsonl_tokens(path: Path) -> list[tuple[list[str], list[str]]]:
    examples = []
    for lineno, record in _jsonl_records(path):
        tokens = _string_list(path, lineno, record, "tokens")
        tags = _string_list(path, lineno, record, "tags")
        if len(tokens) != len(tags):
            raise DataError(f"{path} line {lineno} has {len(tokens)} tokens but {len(tags)} tags")
        examples.append((tokens, [tag.strip() for tag in tags]))
    return examples


def _conll_tokens(path: Path) -> list[tuple[list[str], list[str]]]:
    examples: list[tuple[list[str], list[str]]] = []
    tokens: list[str] = []
    tags: list[str] = []

    def end_sentence() -> None:
        nonlocal tokens, tags
        if tokens:
            examples.append((tokens, tags))
        tokens, tags = [], []

    with _open_text(path) as f:
        try:
            for lineno, line in enumerate(f, 1):
                columns = line.split()
                if not columns or columns[0] == "-DOCSTART-":
                    end_sentence()
                elif len(columns) < 2:
                    raise DataError(f"{path} line {lineno} has one column; expected a token and its tag "
                                    "separated by whitespace")
                else:
                    tokens.append(columns[0])
                    tags.append(columns[-1])
        except UnicodeDecodeError:
            raise DataError(f"{path} is not valid UTF-8; convert it to UTF-8 first") from None
    end_sentence()
    return examples


def check_tags(val_tags: Sequence[Sequence[str]], label_map: Sequence[str], path: str | Path) -> None:
    """Raise DataError at the first tag of ``path`` that the training data does not have.

    Sentences are counted from 1 in file order.
    """
    known = set(label_map)
    for sentence, tags in enumerate(val_tags, 1):
        for tag in tags:
            if tag not in known:
                raise DataError(f"tag {tag!r} in {path} (sentence {sentence}) does not occur in the training "
                                f"data (tags: {_known(label_map)})")


def _first_content_token(tokenizer: Tokenizer, piece: Sequence[int]) -> int:
    # " Paris" may come out as [" ", "Paris"] (a character tokenizer, or a BPE without that merge); the
    # label belongs on the first token that carries some of the word, not on the space.
    for j, token in enumerate(piece):
        if tokenizer.decode([token]).strip():
            return j
    return 0


def _encode_words(tokenizer: Tokenizer, words: Sequence[str], tag_ids: Sequence[int],
                  max_length: int) -> tuple[list[int], list[int], list[int], int]:
    if len(words) != len(tag_ids):
        raise ValueError(f"{len(words)} words but {len(tag_ids)} tags")
    ids: list[int] = []
    labels: list[int] = []
    word_starts: list[int] = []
    for i, (word, tag) in enumerate(zip(words, tag_ids)):
        # A leading space makes a word tokenize as it does inside running text ("Paris" → " Paris").
        piece = tokenizer.encode(word if i == 0 else " " + word)
        if not piece:
            raise DataError(f"word {i + 1} ({word!r}) encodes to no tokens")
        first = _first_content_token(tokenizer, piece)
        word_starts.append(len(ids) + first)
        labels.extend(int(tag) if j == first else IGNORE_INDEX for j in range(len(piece)))
        ids.extend(piece)
    full = len(ids)
    return ids[:max_length], labels[:max_length], [s for s in word_starts if s < max_length], full


def encode_words(tokenizer: Tokenizer, words: Sequence[str], tag_ids: Sequence[int],
                 max_length: int) -> tuple[list[int], list[int], list[int]]:
    """``(input_ids, labels, word_starts)`` of one sentence, labelling only each word's first sub-word.

    Each word is encoded on its own (every word after the first with a leading space), so labels line up
    with words exactly. ``word_starts[j]`` is the position that carries word ``j``'s label: per-word
    predictions are ``predictions[word_starts]``. A sentence longer than ``max_length`` keeps its start;
    words cut off have no entry in ``word_starts`` (so it can be shorter than ``words``).
    """
    _check_max_length(max_length)
    ids, labels, starts, full = _encode_words(tokenizer, words, tag_ids, max_length)
    if full > max_length:
        log.warning("a sentence of %d tokens was cut to max_length=%d; %d of its %d words are left out",
                    full, max_length, len(words) - len(starts), len(words))
    return ids, labels, starts


def encode_token_examples(tokenizer: Tokenizer, sentences: Sequence[Sequence[str]],
                          tag_ids: Sequence[Sequence[int]], max_length: int) -> list[EncodedExample]:
    """:func:`encode_words` for every sentence, with one warning for all the truncated ones."""
    _check_max_length(max_length)
    if len(sentences) != len(tag_ids):
        raise ValueError(f"{len(sentences)} sentences but {len(tag_ids)} tag lists")
    encoded: list[EncodedExample] = []
    truncated = lost_words = 0
    for words, tags in zip(sentences, tag_ids):
        ids, labels, starts, full = _encode_words(tokenizer, words, tags, max_length)
        truncated += full > max_length
        lost_words += len(words) - len(starts)
        encoded.append(EncodedExample(ids, labels, word_starts=starts))
    if truncated:
        log.warning("%d of %d sentences are longer than max_length=%d tokens and keep only their start "
                    "(%d words left out)", truncated, len(sentences), max_length, lost_words)
    return encoded


# --------------------------------------------------------------------------------------------------
# Batching
def pad_id_of(tokenizer: Tokenizer) -> int:
    """Padding id: end-of-text when the tokenizer has one (padding is masked, so any id would do)."""
    return tokenizer.eos_id if tokenizer.eos_id is not None else 0


def collate(batch: Sequence[EncodedExample], pad_id: int) -> dict[str, Any]:
    """Right-pad a batch into LongTensors: ``input_ids`` and ``attention_mask`` (B, T), and ``labels``.

    ``labels`` is (B, T) padded with IGNORE_INDEX for the LM and token tasks, (B,) for classification.
    ``word_starts``, when the examples have it, comes back as a list of lists (the only value that is
    not a tensor).
    """
    if not batch:
        raise ValueError("cannot collate an empty batch")
    length = max(len(example.input_ids) for example in batch)
    input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
    per_token = not isinstance(batch[0].labels, int)
    labels = (torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long) if per_token
              else torch.tensor([example.labels for example in batch], dtype=torch.long))
    for row, example in enumerate(batch):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids, dtype=torch.long)
        attention_mask[row, :n] = 1
        if per_token:
            labels[row, :n] = torch.tensor(example.labels, dtype=torch.long)
    out: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if batch[0].word_starts is not None:
        out["word_starts"] = [list(example.word_starts) for example in batch]
    return out


def iter_batches(encoded: Sequence[Any], batch_size: int, shuffle: bool = False,
                 generator: torch.Generator | None = None) -> Iterator[list[Any]]:
    """Lists of up to ``batch_size`` examples (the last may be shorter), in order or shuffled.

    Shuffling draws from ``generator`` so that a seeded generator gives the same order every run.
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    order = torch.randperm(len(encoded), generator=generator).tolist() if shuffle else list(range(len(encoded)))
    for start in range(0, len(order), batch_size):
        yield [encoded[i] for i in order[start:start + batch_size]]


def batches_per_epoch(n_examples: int, batch_size: int) -> int:
    return math.ceil(n_examples / batch_size)


def epoch_order(n_examples: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches (lists of example indices) of one epoch: a permutation fixed by (seed, epoch)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return list(iter_batches(range(n_examples), batch_size, shuffle=True, generator=generator))


# --------------------------------------------------------------------------------------------------
# A fine-tuning run's examples
@dataclass
class TaskData:
    """A task's training and validation examples and its task section (type, labels, chat template)."""

    task: dict[str, Any]
    train: list[EncodedExample]
    val: list[EncodedExample] = field(default_factory=list)


def max_example_length(config: FinetuneConfig, block_size: int) -> int:
    """Longest encoded example: max_length, capped by the model's context."""
    return min(config.max_length, block_size)


_READERS = {"lm": load_lm_examples, "classify": load_classification_examples, "tokens": load_token_examples}


Retrieve = Callable[[Sequence[Mapping[str, str]]], Sequence[str]]
"""Grounded fine-tuning: a chat's messages → the formatted passages of its context slot, best first."""


def add_retrieved_context(examples: Sequence[LMExample], retrieve: Retrieve) -> list[LMExample]:
    """Chat examples without a ``context`` field get the passages ``retrieve`` finds for their user turns;
    the others are kept as they are."""
    out, filled = [], 0
    for example in examples:
        if example.messages is not None and example.context is None:
            example = replace(example, context=tuple(retrieve(example.messages)))
            filled += bool(example.context)
        out.append(example)
    log.info("retrieved passages for %d of %d examples", filled, len(examples))
    return out


def load_task_data(config: FinetuneConfig, tokenizer: Tokenizer, block_size: int, *,
                   retrieve: Optional[Retrieve] = None) -> TaskData:
    """Read and encode ``config.train_file`` (and ``val_file``, or a held-out share of the training file).

    ``retrieve`` (lm only): fills in the context slot of chat examples without a ``context`` field
    (:func:`add_retrieved_context`); when it has a ``check_tokenizer`` method, that is called with
    ``tokenizer`` first, so that a knowledge base built for another tokenizer is one clear error.
    """
    max_length = max_example_length(config, block_size)
    read = _READERS[config.task]
    if retrieve is not None:
        if config.task != "lm":
            raise ConfigError(f"retrieved passages ground lm examples; task {config.task!r} takes none")
        check = getattr(retrieve, "check_tokenizer", None)
        if check is not None:
            check(tokenizer)
    train_raw = read(config.train_file)
    if retrieve is not None:
        train_raw = add_retrieved_context(train_raw, retrieve)
    if config.val_file is not None:
        val_raw = read(config.val_file)
        if retrieve is not None:
            val_raw = add_retrieved_context(val_raw, retrieve)
    else:
        train_raw, val_raw = split_off_validation(train_raw, config.val_fraction, config.seed)
        log.info("holding out %d of %d examples of %s for validation", len(val_raw),
                 len(train_raw) + len(val_raw), config.train_file)
    val_source = config.val_file or config.train_file
    if config.task == "lm":
        template = config.chat_template or DEFAULT_CHAT_TEMPLATE
        task = {"type": "lm", "labels": [], "chat_template": template}
        if retrieve is not None:  # for the record (config.json): a resume needs the same --knowledge flags
            task["grounding"] = dict(getattr(retrieve, "settings", None) or {})
        return TaskData(task, encode_lm_examples(tokenizer, train_raw, template=template,
                                                 train_on_prompt=config.train_on_prompt, max_length=max_length),
                        encode_lm_examples(tokenizer, val_raw, template=template, max_length=max_length))
    if config.task == "classify":
        labels = build_label_map([label for _, label in train_raw])
        check_labels([label for _, label in val_raw], labels, val_source)
        task = {"type": "classify", "labels": labels, "chat_template": None}
        return TaskData(task, _encode_classify_task(tokenizer, train_raw, labels, max_length),
                        _encode_classify_task(tokenizer, val_raw, labels, max_length))
    labels = build_label_map([tag for _, tags in train_raw for tag in tags])
    check_tags([tags for _, tags in val_raw], labels, val_source)
    task = {"type": "tokens", "labels": labels, "chat_template": None}
    return TaskData(task, _encode_tokens_task(tokenizer, train_raw, labels, max_length),
                    _encode_tokens_task(tokenizer, val_raw, labels, max_length))


def load_eval_data(path: str | Path, task: dict[str, Any], tokenizer: Tokenizer,
                   max_length: int) -> list[EncodedExample]:
    """The examples of ``path`` encoded for a checkpoint's task (its labels must cover the file's)."""
    if task["type"] == "lm":
        template = task.get("chat_template") or DEFAULT_CHAT_TEMPLATE
        return encode_lm_examples(tokenizer, load_lm_examples(path), template=template, max_length=max_length)
    if task["type"] == "classify":
        raw = load_classification_examples(path)
        check_labels([label for _, label in raw], task["labels"], path)
        return _encode_classify_task(tokenizer, raw, task["labels"], max_length)
    raw = load_token_examples(path)
    check_tags([tags for _, tags in raw], task["labels"], path)
    return _encode_tokens_task(tokenizer, raw, task["labels"], max_length)


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


def _encode_classify_task(tokenizer: Tokenizer, pairs: Sequence[tuple[str, str]], labels: list[str],
                          max_length: int) -> list[EncodedExample]:
    return encode_classification(tokenizer, [text for text, _ in pairs],
                                 map_labels([label for _, label in pairs], labels), max_length)


def _encode_tokens_task(tokenizer: Tokenizer, examples: Sequence[tuple[list[str], list[str]]], labels: list[str],
                        max_length: int) -> list[EncodedExample]:
    encoded = encode_token_examples(tokenizer, [words for words, _ in examples],
                                    [map_labels(tags, labels) for _, tags in examples], max_length)
    for example, (_, tags) in zip(encoded, examples):
        example.tags = list(tags)
    return encoded
