"""A knowledge base for grounded answers: documents split into passages, a BM25 index (``bm25s``), and the
assembly of retrieved passages into a chat prompt within the model's context.

Layering: an application layer above ``generate`` and ``evaluate``, below ``serve``, ``chat`` and the CLI.
"""

from .types import Hit, Passage, Retriever

__all__ = ["Hit", "Passage", "Retriever"]
