"""Scoring answers generated from a knowledge base: exact match, token F1 and whether the sources were right.

The answer metrics are SQuAD's: both texts are normalised (:func:`normalize_answer`: lower case, punctuation
and the articles *a*, *an*, *the* removed, white space collapsed); **exact match** is whether the normalised
texts are equal, **token F1** the harmonic mean of the precision and recall of the normalised words (as a
multiset). A question may have several reference answers: each metric takes the best of them.

The **source hit** of an answer is whether the passages it was given (its sources, best first) include the
one that answers the question: the reference's ``passage_id`` when the data names one, else any passage of
its ``doc_id``. Questions that name neither are left out of the share.

Data (:func:`load_grounded_examples`): JSON lines with ``question``, ``answer`` (a string, or a list of
acceptable strings) and optionally ``passage_id`` and ``doc_id``; other fields are ignored.

This module only scores; generating the answers (retrieval, prompt, decoding) is the knowledge layer's job
(:mod:`gptforge.knowledge.grounded_eval`, behind ``gptforge evaluate --task grounded``), which hands the
predictions and their sources to :func:`score_grounded`.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from ..errors import DataError
from ..fsutil import jsonl_objects, read_utf8

__all__ = ["GroundedExample", "normalize_answer", "exact_match", "token_f1", "source_ids", "sources_include",
           "load_grounded_examples", "score_grounded", "HEADLINE"]

HEADLINE = ("exact_match", "f1", "source_hit")
"""The headline metrics of :func:`score_grounded`, in the order reports print them."""

_ARTICLES = re.compile(r"\b(a|an|the)\b")


@dataclass(frozen=True)
class GroundedExample:
    """A question with its reference answers and, where known, the passage or document that answers it."""

    question: str
    answers: tuple[str, ...]
    passage_id: Optional[str] = None
    doc_id: Optional[str] = None


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces.

    Punctuation is every Unicode punctuation character (category P*), not only ASCII's, so that "«Paris»"
    and "Paris" agree; it is removed, not replaced by a space (so "2,400" is "2400" and "e-bike" "ebike",
    on both sides alike).
    """
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(ch for ch in text if not unicodedata.category(ch).startswith("P"))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _as_references(references: str | Sequence[str]) -> list[str]:
    refs = [references] if isinstance(references, str) else list(references)
    if not refs:
        raise ValueError("at least one reference answer is needed")
    return refs


def exact_match(prediction: str, references: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals a normalised reference, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(ref) for ref in _as_references(references)))


def _f1(pred_tokens: list[str], ref_tokens: list[str]) -> float:
    if not pred_tokens or not ref_tokens:
        # Two empty answers agree; an empty one against a non-empty one shares nothing (SQuAD 2.0's rule).
        return float(pred_tokens == ref_tokens)
    common = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    if common == 0:
        return 0.0
    precision = common / len(pred_tokens)
    recall = common / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, references: str | Sequence[str]) -> float:
    """The best token F1 of the prediction against any reference (normalised words, counted as a multiset)."""
    pred = normalize_answer(prediction).split()
    return max(_f1(pred, normalize_answer(ref).split()) for ref in _as_references(references))


def source_ids(source: Any) -> tuple[str, Optional[str]]:
    """(passage id, document id) of a source: a Hit, a Passage, or a mapping such as ``Hit.to_source()``.

    A mapping without ``doc_id`` takes the document id from the passage id, the part before its last ``#``
    (passage ids are ``DOC#N``), or None when there is no ``#``.
    """
    if isinstance(source, Mapping):
        pid = str(source["id"])
        doc = source.get("doc_id")
        if doc is None and "#" in pid:
            doc = pid.rpartition("#")[0]
        return pid, None if doc is None else str(doc)
    passage = getattr(source, "passage", source)
    return str(passage.id), getattr(passage, "doc_id", None)


def sources_include(sources: Sequence[Any], *, passage_id: Optional[str] = None,
                    doc_id: Optional[str] = None) -> Optional[bool]:
    """Whether the sources include the passage ``passage_id`` (if given), else a passage of ``doc_id``.

    None when neither is given: there is nothing to check against.
    """
    if passage_id is None and doc_id is None:
        return None
    for source in sources:
        pid, did = source_ids(source)
        if passage_id is not None:
            if pid == passage_id:
                return True
        elif did == doc_id:
            return True
    return False


def _optional_id(path: Path, lineno: int, record: Mapping[str, Any], name: str) -> Optional[str]:
    value = record.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{path} line {lineno}: \"{name}\" must be a non-empty string")
    return value


def load_grounded_examples(path: str | Path) -> list[GroundedExample]:
    """The questions of a grounded evaluation file (see the module docstring), checked line by line."""
    path = Path(path)
    lines = read_utf8(path, "data file", DataError).splitlines()
    examples = [_grounded_example(path, number, record)
                for number, record in jsonl_objects(lines, f"data file {path}", DataError)]
    if not examples:
        raise DataError(f"data file {path} holds no questions")
    return examples


def _grounded_example(path: Path, lineno: int, record: Mapping[str, Any]) -> GroundedExample:
    for name in ("question", "answer"):
        if name not in record:
            raise DataError(f"{path} line {lineno} has no \"{name}\" field")
    question, answer = record["question"], record["answer"]
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{path} line {lineno}: \"question\" must be a non-empty string")
    answers = [answer] if isinstance(answer, str) else answer
    if (not isinstance(answers, list) or not answers
            or not all(isinstance(a, str) and a.strip() for a in answers)):
        raise DataError(f"{path} line {lineno}: \"answer\" must be a non-empty string or a list of them")
    return GroundedExample(question=question, answers=tuple(answers),
                           passage_id=_optional_id(path, lineno, record, "passage_id"),
                           doc_id=_optional_id(path, lineno, record, "doc_id"))


def score_grounded(examples: Sequence[GroundedExample], predictions: Sequence[str],
                   sources: Sequence[Sequence[Any]]) -> dict[str, Any]:
    """``{"metrics": {exact_match, f1, source_hit}, "report": {..., "per_question": [...]}}``.

    ``sources[i]`` are the passages the i-th answer was given, best first. ``source_hit`` is the share of the
    questions naming a passage or document whose sources include it (None when no question names one).
    """
    if not (len(examples) == len(predictions) == len(sources)):
        raise ValueError(f"{len(examples)} examples, {len(predictions)} predictions and {len(sources)} source "
                         "lists; they must match one to one")
    if not examples:
        raise ValueError("nothing to score: no examples")
    rows = []
    for example, prediction, found in zip(examples, predictions, sources):
        hit = sources_include(found, passage_id=example.passage_id, doc_id=example.doc_id)
        rows.append({"question": example.question, "answers": list(example.answers), "prediction": prediction,
                     "exact_match": exact_match(prediction, example.answers),
                     "f1": token_f1(prediction, example.answers),
                     "source_hit": hit, "sources": [source_ids(s)[0] for s in found]})
    checked = [row["source_hit"] for row in rows if row["source_hit"] is not None]
    metrics = {"exact_match": sum(r["exact_match"] for r in rows) / len(rows),
               "f1": sum(r["f1"] for r in rows) / len(rows),
               "source_hit": sum(checked) / len(checked) if checked else None}
    return {"metrics": metrics,
            "report": {**metrics, "questions": len(rows), "with_source_ids": len(checked), "per_question": rows}}
