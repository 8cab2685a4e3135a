"""The values the knowledge base hands around: a passage, a scored hit, and what retrieves them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class Passage:
    """A piece of a document small enough to put into a prompt."""

    id: str
    """Unique within the knowledge base: the document's id and the passage's number, e.g. ``returns#2``."""
    doc_id: str
    """The document it was cut from (a file's path relative to the docs folder, or a JSON line's ``id``)."""
    title: str
    """The document's title, with the heading the passage sits under where there is one."""
    text: str

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "doc_id": self.doc_id, "title": self.title, "text": self.text}


@dataclass(frozen=True)
class Hit:
    """A passage retrieved for a query, with its BM25 score (higher is better)."""

    passage: Passage
    score: float

    def to_source(self) -> dict[str, Any]:
        """The JSON the API and the CLI report for a source: id, title, score, passage."""
        return {"id": self.passage.id, "title": self.passage.title, "score": round(float(self.score), 4),
                "passage": self.passage.text}


class Retriever(Protocol):
    """Anything that returns the best passages for a query, best first."""

    def search(self, query: str, k: int = 5) -> list[Hit]:
        ...
