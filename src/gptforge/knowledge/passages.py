"""Documents in, passages out: reading a docs folder or a JSON-lines file, and cutting each document into
passages that fit a token budget.

Reading (:func:`read_documents`):

- a folder: every ``.md``, ``.markdown`` and ``.txt`` file under it, recursively, in sorted path order
  (hidden files and folders are skipped). A document's id is its path relative to the folder
  (``policies/returns.md``); its title is its first ``# `` heading, or the file name without extension;
- one ``.md`` / ``.txt`` file: the same, with the file name as the id;
- a ``.jsonl`` file, one JSON object a line, either a document ``{"id", "title", "text"}`` (``title``
  optional: the id stands in) or an FAQ pair ``{"question", "answer"}`` (``id`` optional: a slug of the
  question, e.g. ``how-do-i-reset-my-password``). An FAQ pair becomes one document whose title is the question
  and whose text is ``"Q: <question>\\nA: <answer>"``, so a passage always carries both.

Every text is NFC-normalised (so that ``é`` typed either way is the same word to the index and to the
tokenizer) and its line ends made ``\\n``. Files must be UTF-8 (a byte-order mark is skipped).

Splitting (:func:`split_documents`): a document is cut at its Markdown headings into sections (headings
inside fenced code blocks do not count); a passage never spans two sections, and its title is the
document's title followed by the headings it sits under (``Returns > Refunds > Timing``). Within a
section, paragraphs (blank-line separated) are packed into passages of at most ``max_passage_tokens``; a
paragraph too long for one is cut into sentences, a sentence too long into words, and a word too long into
pieces of whole characters (a combining mark stays with its base). Each passage after the first of a
section starts with up to ``overlap_tokens`` of the previous passage's last words, so that a sentence cut
at a passage's end reads on in the next. The budget counts the passage's text (its title is not counted).

Tokens are counted with a :class:`~gptforge.tokenizer.Tokenizer` when one is given (the model's, so that
passages fit its context), else by :func:`estimate_tokens`: each run of letters and digits counts one
token per 4 characters (rounded up) and each other non-space character one. A 4096-token byte-level BPE
trained on the bundled Shakespeare (the demo's kind) makes about 1.1 times this estimate of held-out
Shakespeare and 1.3 times of modern technical English (gptforge's docs); pass a tokenizer for exact budgets.

Passage ids are ``f"{doc_id}#{n}"`` with ``n`` counting from 1 in the document: the same document split
with the same settings gets the same ids in every build.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

from ..config import IndexConfig
from ..errors import InvalidTextError, KnowledgeError
from ..fsutil import jsonl_objects, read_utf8
from ..tokenizer import check_text
from .types import Passage

log = logging.getLogger(__name__)

DOC_SUFFIXES = (".md", ".markdown", ".txt")
JSONL_SUFFIXES = (".jsonl",)
TITLE_SEPARATOR = " > "
ESTIMATE_KIND = "estimate"
"""What an index records as its tokenizer's kind when tokens were counted by :func:`estimate_tokens`."""

_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$")
_FENCE = re.compile(r"^\s*(```|~~~)")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n+")
# A sentence ends at . ! ? (or their CJK forms), possibly followed by closing quotes or brackets.
_SENTENCE_END = re.compile(r"(?<=[.!?。！？])[\"'”’)\]]*\s+")
_ESTIMATE_PIECE = re.compile(r"\w+|[^\w\s]")
_ESTIMATE_WORD_CHARS = 4


@dataclass(frozen=True)
class Document:
    """A document as read: its id, title and whole text (NFC, ``\\n`` line ends)."""

    doc_id: str
    title: str
    text: str


# --------------------------------------------------------------------------------------------------
# Reading
def normalize_text(text: str) -> str:
    """NFC, ``\\n`` line ends, no byte-order mark."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").lstrip("\ufeff")
    return unicodedata.normalize("NFC", text)


def read_documents(source: str | Path) -> list[Document]:
    """The documents of a docs folder, one ``.md``/``.txt`` file, or a ``.jsonl`` file (see the module's doc).

    Raises KnowledgeError for a missing path, a file that is not UTF-8, a malformed JSON line, two documents
    with the same id, or a source that holds no documents at all. Documents with no text are skipped with a
    warning."""
    path = Path(source)
    if not path.exists():
        raise KnowledgeError(f"docs {path} do not exist (give a folder of .md/.txt files or a .jsonl file)")
    if path.is_dir():
        docs = _read_folder(path)
    elif path.suffix.lower() in JSONL_SUFFIXES:
        docs = _read_jsonl(path)
    elif path.suffix.lower() in DOC_SUFFIXES:
        text = _read_text(path)
        docs = [_file_document(path.name, path, text)]
    else:
        raise KnowledgeError(f"docs {path} is neither a folder nor a .md, .txt or .jsonl file")
    kept = []
    for doc in docs:
        if doc.text.strip():
            kept.append(doc)
        else:
            log.warning("skipping document %s: it has no text", doc.doc_id)
    if not kept:
        raise KnowledgeError(f"docs {path} hold no document with text "
                             "(expected .md/.txt files, or JSON lines with id/title/text or question/answer)")
    return kept


def _read_folder(folder: Path) -> list[Document]:
    files = sorted((f for f in folder.rglob("*")
                    if f.is_file() and f.suffix.lower() in DOC_SUFFIXES
                    and not any(part.startswith(".") for part in f.relative_to(folder).parts)),
                   key=lambda f: f.relative_to(folder).as_posix())
    if not files:
        raise KnowledgeError(f"docs folder {folder} holds no .md, .markdown or .txt files")
    return [_file_document(f.relative_to(folder).as_posix(), f, _read_text(f)) for f in files]


def _file_document(doc_id: str, path: Path, text: str) -> Document:
    title = None
    in_fence = False
    for line in text.split("\n"):
        if _FENCE.match(line):
            in_fence = not in_fence
            continue
        m = _HEADING.match(line)
        if m and not in_fence and len(m.group(1)) == 1:
            title = m.group(2).strip()
            break
    return Document(doc_id=doc_id, title=title or path.stem, text=text)


def _read_text(path: Path) -> str:
    return normalize_text(read_utf8(path, error=KnowledgeError))


def _read_jsonl(path: Path) -> list[Document]:
    docs: list[Document] = []
    seen: dict[str, int] = {}
    for number, obj in jsonl_objects(_read_text(path).split("\n"), str(path), KnowledgeError):
        where = f"{path} line {number}"
        doc = _jsonl_document(obj, where)
        if doc.doc_id in seen:
            hint = " (made from the question: give one of them an 'id')" if "id" not in obj else ""
            raise KnowledgeError(f"{where}: document id {doc.doc_id!r}{hint} is also on line {seen[doc.doc_id]}; "
                                 "ids must be unique")
        seen[doc.doc_id] = number
        docs.append(doc)
    if not docs:
        raise KnowledgeError(f"docs file {path} holds no JSON lines")
    return docs


def _string_field(obj: dict, key: str, where: str, required: bool) -> Optional[str]:
    value = obj.get(key)
    if value is None:
        if required:
            raise KnowledgeError(f"{where} has no {key!r} field")
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and key == "id":
        value = str(value)
    if not isinstance(value, str):
        raise KnowledgeError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    try:
        check_text(value, f"{where}: {key!r}")
    except InvalidTextError as exc:  # a docs-file error, like every other one read_documents raises
        raise KnowledgeError(str(exc)) from None
    return normalize_text(value)


def _jsonl_document(obj: dict, where: str) -> Document:
    if "question" in obj or "answer" in obj:
        question = _string_field(obj, "question", where, True).strip()  # type: ignore[union-attr]
        answer = _string_field(obj, "answer", where, True).strip()  # type: ignore[union-attr]
        doc_id = _string_field(obj, "id", where, False) or slugify(question)
        if not doc_id:
            raise KnowledgeError(f"{where}: the question is empty and there is no 'id'")
        text = f"Q: {question}\nA: {answer}" if answer else ""
        return Document(doc_id=doc_id, title=question, text=text)
    if "text" not in obj:
        raise KnowledgeError(f"{where} has neither a 'text' field (a document: id, title, text) nor "
                             "'question' and 'answer' (an FAQ pair)")
    doc_id = _string_field(obj, "id", where, True)
    if not doc_id or not doc_id.strip():
        raise KnowledgeError(f"{where}: 'id' is empty")
    text = _string_field(obj, "text", where, True)
    title = _string_field(obj, "title", where, False)
    return Document(doc_id=doc_id, title=(title or doc_id).strip(), text=text)  # type: ignore[arg-type]


def slugify(text: str, max_length: int = 60) -> str:
    """``How do I reset my password?`` → ``how-do-i-reset-my-password`` (letters and digits of any script)."""
    words = re.findall(r"\w+", text.lower())
    slug = ""
    for word in words:
        candidate = f"{slug}-{word}" if slug else word
        if len(candidate) > max_length:
            break
        slug = candidate
    if not slug and text.strip():  # no word characters, or one word longer than max_length
        slug = words[0][:max_length] if words else "q-" + hashlib.sha1(text.encode("utf-8")).hexdigest()[:10]
    return slug


# --------------------------------------------------------------------------------------------------
# Counting tokens
def estimate_tokens(text: str) -> int:
    """A tokenizer-free estimate: each run of letters/digits counts ``ceil(len / 4)``, each other non-space
    character 1."""
    return sum(math.ceil(len(p) / _ESTIMATE_WORD_CHARS) for p in _ESTIMATE_PIECE.findall(text))


def token_counter(tokenizer=None) -> Callable[[str], int]:
    """``text → number of tokens``: the tokenizer's count, or :func:`estimate_tokens` without one."""
    if tokenizer is None:
        return estimate_tokens
    return lambda text: len(tokenizer.encode(text))


# --------------------------------------------------------------------------------------------------
# Splitting
def split_documents(documents: Iterable[Document], *, max_passage_tokens: int = IndexConfig.max_passage_tokens,
                    overlap_tokens: int = IndexConfig.overlap_tokens, tokenizer=None) -> list[Passage]:
    """The passages of ``documents``, in order (see the module's doc). ``tokenizer``: a
    :class:`~gptforge.tokenizer.Tokenizer` to count tokens with, or None for :func:`estimate_tokens`.

    Raises ConfigError for a budget out of range, KnowledgeError when no document gives a passage."""
    IndexConfig(max_passage_tokens=max_passage_tokens, overlap_tokens=overlap_tokens).validate()
    count = token_counter(tokenizer)
    passages: list[Passage] = []
    for doc in documents:
        n = 0
        for title, text in split_document(doc, max_passage_tokens=max_passage_tokens,
                                          overlap_tokens=overlap_tokens, count=count):
            n += 1
            passages.append(Passage(id=f"{doc.doc_id}#{n}", doc_id=doc.doc_id, title=title, text=text))
        if n == 0:
            log.warning("skipping document %s: it has no text", doc.doc_id)
    if not passages:
        raise KnowledgeError("no passages: every document is empty")
    return passages


def split_document(doc: Document, *, max_passage_tokens: int, overlap_tokens: int,
                   count: Callable[[str], int]) -> list[tuple[str, str]]:
    """(title, text) of each passage of one document."""
    out = []
    for headings, body in _sections(doc):
        title = TITLE_SEPARATOR.join([doc.title, *headings]) if headings else doc.title
        for text in _pack_section(body, max_passage_tokens, overlap_tokens, count):
            out.append((title, text))
    return out


def _sections(doc: Document) -> list[tuple[list[str], str]]:
    """([headings the section sits under], its text) for each section. The level-1 heading that gave the
    document its title is left out of the titles; a deeper heading replaces those at its level and below."""
    sections: list[tuple[list[str], list[str]]] = []
    stack: list[tuple[int, str]] = []
    lines: list[str] = []
    in_fence = False
    title_heading_seen = False

    def close() -> None:
        sections.append(([h for _, h in stack], lines.copy()))
        lines.clear()

    for line in doc.text.split("\n"):
        if _FENCE.match(line):
            in_fence = not in_fence
            lines.append(line)
            continue
        m = None if in_fence else _HEADING.match(line)
        if m is None:
            lines.append(line)
            continue
        close()
        level, heading = len(m.group(1)), m.group(2).strip()
        if level == 1 and not title_heading_seen and heading == doc.title and not stack:
            title_heading_seen = True
            continue
        while stack and stack[-1][0] >= level:
            stack.pop()
        stack.append((level, heading))
    close()
    return [(headings, "\n".join(body).strip()) for headings, body in sections if "\n".join(body).strip()]


def _pack_section(body: str, budget: int, overlap: int, count: Callable[[str], int]) -> list[str]:
    """Passages of one section's text: paragraphs packed up to ``budget`` tokens, with ``overlap``."""
    units = []  # (text, joiner before it when it follows another unit in the same passage)
    for paragraph in _PARAGRAPH_BREAK.split(body):
        paragraph = paragraph.strip()
        if not paragraph:
            continue
        first = True
        for piece in _fit(paragraph, budget, count):
            units.append((piece, "\n\n" if first else " "))
            first = False
    passages: list[str] = []
    current = ""
    for piece, joiner in units:
        candidate = f"{current}{joiner}{piece}" if current else piece
        if not current or count(candidate) <= budget:
            current = candidate
            continue
        passages.append(current)
        tail = _tail(current, overlap, count)
        current = f"{tail} {piece}" if tail and count(f"{tail} {piece}") <= budget else piece
    if current:
        passages.append(current)
    return passages


def _fit(text: str, budget: int, count: Callable[[str], int]) -> list[str]:
    """``text`` as pieces of at most ``budget`` tokens: itself, else its sentences, else words, else characters."""
    if count(text) <= budget:
        return [text]
    pieces = []
    sentences = [s for s in _SENTENCE_END.split(text) if s.strip()]
    if len(sentences) > 1:
        for sentence in sentences:
            pieces.extend(_fit(sentence.strip(), budget, count))
        return pieces
    words = text.split()
    if len(words) > 1:
        return _pack_words(words, budget, count)
    return _split_characters(text, budget, count)


def _pack_words(words: Sequence[str], budget: int, count: Callable[[str], int]) -> list[str]:
    """Words packed greedily into pieces within the budget; a word longer than the budget alone is cut
    between characters and stands as pieces of its own."""
    pieces: list[str] = []
    run: list[str] = []
    for word in words:
        if count(word) > budget:
            pieces += _pack(run, " ", budget, count) + _split_characters(word, budget, count)
            run = []
        else:
            run.append(word)
    return pieces + _pack(run, " ", budget, count)


def _pack(units: Sequence[str], sep: str, budget: int, count: Callable[[str], int]) -> list[str]:
    """``units`` joined by ``sep`` into as few pieces as fit the budget, in order (greedy)."""
    pieces: list[str] = []
    current = ""
    for unit in units:
        candidate = f"{current}{sep}{unit}" if current else unit
        if current and count(candidate) > budget:
            pieces.append(current)
            current = unit
        else:
            current = candidate
    if current:
        pieces.append(current)
    return pieces


def _split_characters(word: str, budget: int, count: Callable[[str], int]) -> list[str]:
    """A word longer than the budget, cut between whole characters (never before a combining mark)."""
    clusters: list[str] = []
    for ch in word:
        if clusters and (unicodedata.combining(ch) or ch in "\u200d\ufe0f" or clusters[-1].endswith("\u200d")):
            clusters[-1] += ch
        else:
            clusters.append(ch)
    return _pack(clusters, "", budget, count)


def _tail(text: str, overlap: int, count: Callable[[str], int]) -> str:
    """The last words of ``text`` that make at most ``overlap`` tokens ("" when overlap is 0)."""
    if overlap <= 0:
        return ""
    words = text.split()
    tail = ""
    for word in reversed(words):
        candidate = f"{word} {tail}" if tail else word
        if count(candidate) > overlap:
            break
        tail = candidate
    return tail
