"""Raw text → token files, and the reader that training and evaluation use.

- :mod:`.corpus`: corpus specs (the built-in ``shakespeare``, a text file, a folder, a JSONL file), streamed.
- :mod:`.prepare`: :func:`prepare_corpus` writes ``train.bin``, ``val.bin``, ``meta.json`` and the tokenizer.
- :mod:`.tokens`: :class:`TokenData` memory-maps a prepared folder and checks its tokenizer.
"""

from .corpus import Corpus, Piece, corpus_sources, iter_corpus, resolve_corpus
from .prepare import prepare_corpus, token_dtype
from .tokens import TokenData, load_meta

__all__ = [
    "Corpus",
    "Piece",
    "TokenData",
    "corpus_sources",
    "iter_corpus",
    "load_meta",
    "prepare_corpus",
    "resolve_corpus",
    "token_dtype",
]
