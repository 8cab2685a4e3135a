"""Retrieval evaluation: how often a retriever finds the passage that answers a question.

The data is JSON lines, one question each, naming what answers it:

- ``{"question": "...", "passage_id": "returns.md#2"}``: that passage must be retrieved;
- ``{"question": "...", "doc_id": "returns.md"}``: any passage of that document counts (handy when the
  passage numbering is not known, or a fact is repeated across a document's passages by the overlap).

Other fields (an ``answer`` for grounded evaluation, say) are ignored. Metrics, over all questions:
``recall@k`` for k = 1, 5, 10 (the share of questions whose answer is among the top k passages) and
``mrr`` (mean reciprocal rank of the first right passage among the top 10, 0 when it is not there).

This module needs only something with ``search(query, k) -> list[Hit]`` (the
:class:`~gptforge.knowledge.types.Retriever` protocol); ``gptforge evaluate --task retrieval`` passes it
the knowledge base of ``--knowledge``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from ..errors import DataError
from ..fsutil import jsonl_objects, read_utf8
from ..tokenizer import check_text

KS = (1, 5, 10)
HEADLINE = tuple(f"recall@{k}" for k in KS) + ("mrr",)
MAX_MISSES_REPORTED = 20


@dataclass(frozen=True)
class RetrievalQuestion:
    """A question and what answers it: a passage id, or (``doc_id``) any passage of a document."""

    question: str
    passage_id: Optional[str] = None
    doc_id: Optional[str] = None
    line: int = 0

    @property
    def expected(self) -> str:
        return self.passage_id if self.passage_id is not None else f"{self.doc_id} (any passage)"

    def answered_by(self, passage) -> bool:
        return passage.id == self.passage_id if self.passage_id is not None else passage.doc_id == self.doc_id


def read_retrieval_data(path: str | Path) -> list[RetrievalQuestion]:
    """The questions of a JSON-lines file (see the module's doc); DataError naming the file and line."""
    path = Path(path)
    questions = []
    for number, obj in jsonl_objects(read_utf8(path, "data file", DataError).splitlines(), f"data file {path}",
                                     DataError):
        where = f"{path} line {number}"
        question = obj.get("question")
        if not isinstance(question, str) or not question.strip():
            raise DataError(f"{where} has no 'question' (a non-empty string)")
        passage_id, doc_id = obj.get("passage_id"), obj.get("doc_id")
        if passage_id is None and doc_id is None:
            raise DataError(f"{where} names no answer: give 'passage_id' (e.g. \"returns.md#2\") or 'doc_id' "
                            "(any passage of that document counts)")
        for key, value in (("passage_id", passage_id), ("doc_id", doc_id)):
            if value is not None and not isinstance(value, str):
                raise DataError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
        check_text(question, f"{where}: the question")
        questions.append(RetrievalQuestion(question=question, passage_id=passage_id,
                                           doc_id=doc_id if passage_id is None else None, line=number))
    if not questions:
        raise DataError(f"data file {path} holds no questions (JSON lines with 'question' and 'passage_id')")
    return questions


def check_answers_exist(questions: Sequence[RetrievalQuestion], passages: Sequence[Any], *, data: str,
                        knowledge: str) -> None:
    """DataError for the first question whose passage or document is not among ``passages`` (a typo, or
    data written for another knowledge base): such a question could never count as found."""
    passage_ids = {p.id for p in passages}
    doc_ids = {p.doc_id for p in passages}
    for q in questions:
        if q.passage_id is not None and q.passage_id not in passage_ids:
            raise DataError(f"{data} line {q.line}: passage {q.passage_id!r} is not in {knowledge}")
        if q.passage_id is None and q.doc_id not in doc_ids:
            raise DataError(f"{data} line {q.line}: document {q.doc_id!r} is not in {knowledge}")


def evaluate_retrieval(retriever, questions: Sequence[RetrievalQuestion]) -> dict[str, Any]:
    """``{"metrics": {recall@1, recall@5, recall@10, mrr}, "report": {...}}`` of ``retriever`` on
    ``questions``. The report adds the number of questions, the rank of each question's answer (None when
    not in the top 10) and up to 20 misses (question, expected, the top 3 retrieved)."""
    depth = max(KS)
    ranks: list[Optional[int]] = []
    misses: list[dict[str, Any]] = []
    for q in questions:
        hits = retriever.search(q.question, k=depth)
        rank = next((i for i, hit in enumerate(hits, 1) if q.answered_by(hit.passage)), None)
        ranks.append(rank)
        if rank != 1 and len(misses) < MAX_MISSES_REPORTED:
            misses.append({"line": q.line, "question": q.question, "expected": q.expected, "rank": rank,
                           "retrieved": [h.passage.id for h in hits[:3]]})
    n = len(questions)
    metrics: dict[str, Any] = {f"recall@{k}": sum(r is not None and r <= k for r in ranks) / n for k in KS}
    metrics["mrr"] = sum(1.0 / r for r in ranks if r is not None) / n
    report = {**metrics, "questions": n, "ranks": ranks, "misses": misses}
    return {"metrics": metrics, "report": report}


def format_retrieval_report(report: dict[str, Any]) -> str:
    """The misses of a report (the headline metrics are printed by the caller)."""
    lines = [f"{report['questions']} questions; answer not ranked first: "
             f"{sum(r != 1 for r in report['ranks'])}"]
    for miss in report["misses"]:
        where = f"rank {miss['rank']}" if miss["rank"] is not None else f"not in the top {max(KS)}"
        got = ", ".join(miss["retrieved"]) or "nothing"
        lines.append(f"  line {miss['line']}: {miss['question']!r}: expected {miss['expected']} ({where}); "
                     f"top: {got}")
    return "\n".join(lines)
