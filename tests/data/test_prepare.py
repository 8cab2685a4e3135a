"""prepare_corpus and the TokenData reader: contents, split, safety of the output folder, messages."""

from __future__ import annotations

import json
import tracemalloc
from collections import Counter

import numpy as np
import pytest

from gptforge.data import TokenData, load_meta, prepare_corpus, token_dtype
from gptforge.data import corpus as corpus_module
from gptforge.data import prepare as prepare_module
from gptforge.errors import ConfigError, DataError
from gptforge.tokenizer import EOS_TOKEN, CharTokenizer, load_tokenizer


def numbered_lines(n: int, width: int = 40) -> list[str]:
    # Every line is unique, so the split can be checked line by line.
    return [f"line {i:06d} " + "ünï☃ abc"[: i % 9] + "." * (i % width) + "\n" for i in range(n)]


@pytest.fixture
def text_corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    lines = numbered_lines(4000)
    path.write_text("".join(lines), encoding="utf-8")
    return path, lines


def split_text(data: TokenData, split: str) -> str:
    return data.tokenizer.decode(data.split(split).tolist())


def folder_snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# --------------------------------------------------------------------------------------------------
# What is written
def test_char_data_decodes_back_to_the_corpus(text_corpus, tmp_path):
    path, lines = text_corpus
    out = tmp_path / "prepared"
    meta = prepare_corpus(path, out, tokenizer="char", val_fraction=0.1)

    assert meta == load_meta(out)
    data = TokenData(out)
    train, val = split_text(data, "train"), split_text(data, "val")
    # One document, so exactly one end-of-text token, at the very end of the corpus.
    assert (train + val).count(EOS_TOKEN) == 1
    assert train.endswith(EOS_TOKEN) or val.endswith(EOS_TOKEN)
    train_lines = train.replace(EOS_TOKEN, "").splitlines(keepends=True)
    val_lines = val.replace(EOS_TOKEN, "").splitlines(keepends=True)
    # Chunks are cut at line ends: every line lands whole in one split, in corpus order.
    assert sorted(train_lines + val_lines) == sorted(lines)
    assert train_lines == [line for line in lines if line in set(train_lines)]
    assert 0.05 < len(val_lines) / len(lines) < 0.2


def test_counts_match_files_and_text(text_corpus, tmp_path):
    path, lines = text_corpus
    out = tmp_path / "prepared"
    meta = prepare_corpus(path, out, tokenizer="bpe", vocab_size=300)
    data = TokenData(out)
    assert meta["dtype"] == "uint16"
    for split in ("train", "val"):
        assert meta[split]["tokens"] > 0
        assert (out / f"{split}.bin").stat().st_size == meta[split]["tokens"] * 2
        assert len(data.split(split)) == data.num_tokens(split) == meta[split]["tokens"]
    assert meta["train"]["bytes"] + meta["val"]["bytes"] == len("".join(lines).encode("utf-8"))
    assert meta["documents"] == 1
    # BPE merges make tokens longer than a byte on average; a decoded split is that many bytes of text.
    assert data.bytes_per_token("train") > 1.0
    val_text = split_text(data, "val").replace(EOS_TOKEN, "")
    assert len(val_text.encode("utf-8")) == data.num_bytes("val")


def test_meta_describes_the_tokenizer_saved_beside_the_data(text_corpus, tmp_path):
    path, _ = text_corpus
    out = tmp_path / "prepared"
    meta = prepare_corpus(path, out, tokenizer="bpe", vocab_size=300)
    tok = load_tokenizer(out)
    assert meta["format_version"] == 1
    assert meta["tokenizer"] == {"kind": "bpe", "fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size,
                                 "eos_id": tok.eos_id}
    assert meta["corpus"] == str(path)
    assert int(np.asarray(TokenData(out).split("train")).max()) < tok.vocab_size


def test_end_of_text_separates_documents(tmp_path):
    corpus = tmp_path / "docs"
    corpus.mkdir()
    docs = [f"document {i}\n" + "words and more words\n" * (i + 1) for i in range(6)]
    for i, doc in enumerate(docs):
        (corpus / f"{i}.txt").write_text(doc, encoding="utf-8")
    out = tmp_path / "prepared"
    meta = prepare_corpus(corpus, out, tokenizer="char")
    data = TokenData(out)
    assert meta["documents"] == len(docs)
    ids = np.concatenate([data.split("train"), data.split("val")])
    assert int((ids == data.eos_id).sum()) == len(docs)
    # Each document is small enough to be one chunk, so it sits whole between end-of-text tokens.
    segments = split_text(data, "train").split(EOS_TOKEN)[:-1] + split_text(data, "val").split(EOS_TOKEN)[:-1]
    assert sorted(segments) == sorted(docs)


def test_jsonl_records_get_end_of_text_tokens(tmp_path):
    path = tmp_path / "docs.jsonl"
    records = [f"record {i}: " + "some text here. " * 20 for i in range(30)]
    path.write_text("".join(json.dumps({"text": r}) + "\n" for r in records), encoding="utf-8")
    meta = prepare_corpus(path, tmp_path / "prepared", tokenizer="bpe", vocab_size=320)
    data = TokenData(tmp_path / "prepared")
    assert meta["documents"] == len(records)
    eos_count = sum(int((data.split(s) == data.eos_id).sum()) for s in ("train", "val"))
    assert eos_count == len(records)
    assert meta["train"]["bytes"] + meta["val"]["bytes"] == sum(len(r.encode()) for r in records)


def test_shakespeare_with_char_tokenizer(tmp_path):
    meta = prepare_corpus("shakespeare", tmp_path / "shakespeare", tokenizer="char")
    assert meta["documents"] == 42
    assert meta["corpus"] == "shakespeare"
    total = meta["train"]["tokens"] + meta["val"]["tokens"]
    assert 0.07 < meta["val"]["tokens"] / total < 0.13
    assert "HAMLET" in split_text(TokenData(tmp_path / "shakespeare"), "train")


# --------------------------------------------------------------------------------------------------
# Split
@pytest.mark.parametrize("text", ["ab", "one line only\n", "a\nb\n", "x" * 300, "first\nsecond\nthird\n"])
@pytest.mark.parametrize("val_fraction", [0.01, 0.1, 0.5, 0.9])
def test_tiny_corpus_still_fills_both_splits(tmp_path, text, val_fraction):
    path = tmp_path / "tiny.txt"
    path.write_text(text, encoding="utf-8")
    meta = prepare_corpus(path, tmp_path / "out", tokenizer="char", val_fraction=val_fraction)
    assert meta["train"]["bytes"] > 0 and meta["val"]["bytes"] > 0
    assert meta["train"]["bytes"] + meta["val"]["bytes"] == len(text.encode())


def test_single_character_corpus_cannot_be_split(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("a", encoding="utf-8")
    with pytest.raises(DataError, match="too small to split"):
        prepare_corpus(path, tmp_path / "out", tokenizer="char")


@pytest.mark.parametrize("val_fraction", [0.02, 0.25, 0.75])
def test_val_share_follows_val_fraction(tmp_path, val_fraction):
    path = tmp_path / "corpus.txt"
    path.write_text("".join(numbered_lines(6000)), encoding="utf-8")
    meta = prepare_corpus(path, tmp_path / "out", tokenizer="char", val_fraction=val_fraction)
    share = meta["val"]["bytes"] / (meta["val"]["bytes"] + meta["train"]["bytes"])
    assert share == pytest.approx(val_fraction, abs=0.05)


def test_split_is_deterministic(text_corpus, tmp_path):
    path, _ = text_corpus
    first = prepare_corpus(path, tmp_path / "a", tokenizer="bpe", vocab_size=300)
    second = prepare_corpus(path, tmp_path / "b", tokenizer="bpe", vocab_size=300)
    assert first == second
    assert folder_snapshot(tmp_path / "a") == folder_snapshot(tmp_path / "b")


# --------------------------------------------------------------------------------------------------
# Token width
def test_dtype_chooser():
    assert token_dtype(257) == np.uint16
    assert token_dtype(65536) == np.uint16  # ids 0..65535 still fit
    assert token_dtype(65537) == np.uint32
    assert token_dtype(200_000) == np.uint32
    with pytest.raises(ConfigError):
        token_dtype(0)


def test_reader_follows_the_dtype_in_meta(text_corpus, tmp_path, monkeypatch):
    path, _ = text_corpus
    reference = prepare_corpus(path, tmp_path / "narrow", tokenizer="char")
    # A >65536-id tokenizer is too slow to train in a test; force the wide type instead.
    monkeypatch.setattr(prepare_module, "token_dtype", lambda vocab_size: np.dtype(np.uint32))
    meta = prepare_corpus(path, tmp_path / "wide", tokenizer="char")
    assert meta["dtype"] == "uint32"
    assert (tmp_path / "wide" / "train.bin").stat().st_size == meta["train"]["tokens"] * 4
    narrow, wide = TokenData(tmp_path / "narrow"), TokenData(tmp_path / "wide")
    assert wide.split("train").dtype == np.uint32
    assert reference["train"] == meta["train"]
    np.testing.assert_array_equal(wide.split("train"), narrow.split("train"))


# --------------------------------------------------------------------------------------------------
# Reusing a tokenizer
def test_tokenizer_from_reuses_the_vocabulary(text_corpus, tmp_path):
    path, _ = text_corpus
    first = prepare_corpus(path, tmp_path / "first", tokenizer="bpe", vocab_size=300)
    other = tmp_path / "other.txt"
    other.write_text("Completely different text, ünïcode ☃.\n" * 50, encoding="utf-8")
    meta = prepare_corpus(other, tmp_path / "second", tokenizer_from=tmp_path / "first")
    assert meta["tokenizer"] == first["tokenizer"]
    data = TokenData(tmp_path / "second")
    data.check_tokenizer(load_tokenizer(tmp_path / "first"))  # the same tokenizer passes


def test_check_tokenizer_rejects_another_tokenizer(text_corpus, tmp_path):
    path, _ = text_corpus
    prepare_corpus(path, tmp_path / "data", tokenizer="char")
    data = TokenData(tmp_path / "data")
    stranger = CharTokenizer.train(["something else"])
    with pytest.raises(DataError) as info:
        data.check_tokenizer(stranger, source="runs/demo/checkpoints/latest")
    message = str(info.value)
    assert data.fingerprint in message and stranger.fingerprint in message
    assert "the checkpoint's tokenizer" in message
    assert "--tokenizer-from runs/demo/checkpoints/latest" in message


def test_tokenizer_from_a_folder_without_tokenizer(text_corpus, tmp_path):
    path, _ = text_corpus
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no tokenizer"):
        prepare_corpus(path, tmp_path / "out", tokenizer_from=tmp_path / "empty")
    with pytest.raises(DataError, match="not found"):
        prepare_corpus(path, tmp_path / "out", tokenizer_from=tmp_path / "missing")


# --------------------------------------------------------------------------------------------------
# The output folder is never damaged
def test_failed_reprepare_keeps_the_old_data(text_corpus, tmp_path):
    path, _ = text_corpus
    out = tmp_path / "prepared"
    prepare_corpus(path, out, tokenizer="char")
    before = folder_snapshot(out)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    for tokenizer in ("char", "bpe"):
        with pytest.raises(DataError, match="is empty"):
            prepare_corpus(empty, out, tokenizer=tokenizer)
    with pytest.raises(DataError, match="is empty"):
        prepare_corpus(empty, out, tokenizer_from=out)  # fails in the second pass instead
    assert folder_snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "empty.txt", "prepared"]


def test_successful_reprepare_replaces_the_data(text_corpus, tmp_path):
    path, _ = text_corpus
    out = tmp_path / "prepared"
    prepare_corpus(path, out, tokenizer="char")
    meta = prepare_corpus(path, out, tokenizer="bpe", vocab_size=300)
    assert load_meta(out) == meta
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "tokenizer.json", "train.bin", "val.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "prepared"]


def test_refuses_to_replace_a_folder_of_other_files(text_corpus, tmp_path):
    path, _ = text_corpus
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("keep me", encoding="utf-8")
    with pytest.raises(DataError, match="not empty"):
        prepare_corpus(path, out, tokenizer="char")
    assert (out / "precious.txt").read_text(encoding="utf-8") == "keep me"


def test_fills_an_existing_empty_folder(text_corpus, tmp_path):
    path, _ = text_corpus
    (tmp_path / "out").mkdir()
    prepare_corpus(path, tmp_path / "out", tokenizer="char")
    assert (tmp_path / "out" / "meta.json").is_file()


# --------------------------------------------------------------------------------------------------
# Options and progress
@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(val_fraction=0.0), "val_fraction"),
        (dict(val_fraction=1.0), "val_fraction"),
        (dict(val_fraction=-0.1), "val_fraction"),
        (dict(val_fraction="0.1"), "val_fraction"),
        (dict(tokenizer="word"), "tokenizer must be one of"),
        (dict(vocab_size=100), "at least 257"),
        (dict(vocab_size=257, tokenizer="char"), "at least 258"),
        (dict(vocab_size=4096.0), "must be an integer"),
    ],
)
def test_bad_options_are_config_errors(text_corpus, tmp_path, options, message):
    path, _ = text_corpus
    with pytest.raises(ConfigError, match=message):
        prepare_corpus(path, tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


def test_missing_corpus(tmp_path):
    with pytest.raises(DataError, match="not found"):
        prepare_corpus(tmp_path / "missing.txt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_char_vocab_size_caps_the_characters(text_corpus, tmp_path):
    path, lines = text_corpus
    meta = prepare_corpus(path, tmp_path / "out", tokenizer="char", vocab_size=257 + 5)
    assert meta["tokenizer"]["vocab_size"] == 257 + 5  # the corpus has more than five characters
    data = TokenData(tmp_path / "out")
    # Characters beyond the cap fall back to bytes and still decode exactly.
    assert sorted((split_text(data, "train") + split_text(data, "val")).replace(EOS_TOKEN, "").splitlines(True)) \
        == sorted(lines)


def test_progress_bar_only_when_asked(text_corpus, tmp_path, capsys):
    path, _ = text_corpus
    prepare_corpus(path, tmp_path / "quiet", tokenizer="char")
    quiet = capsys.readouterr()
    assert quiet.out == "" and quiet.err == ""
    prepare_corpus(path, tmp_path / "loud", tokenizer="char", progress=True)
    loud = capsys.readouterr()
    assert loud.out == ""
    assert "encoding" in loud.err and "B" in loud.err


def test_logs_a_summary(text_corpus, tmp_path, caplog):
    path, _ = text_corpus
    with caplog.at_level("DEBUG", logger="gptforge.data.prepare"):
        prepare_corpus(path, tmp_path / "out", tokenizer="char")
    assert any("prepared" in r.getMessage() and "val tokens" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------------------------------
# Streaming
def write_one_line(path, n_bytes):
    path.write_text(("lorem ipsum dolor sit amet " * (n_bytes // 27 + 1))[:n_bytes], encoding="utf-8")
    return path


def test_one_huge_line_at_default_sizes(tmp_path):
    path = write_one_line(tmp_path / "one_line.txt", 3_000_000)
    meta = prepare_corpus(path, tmp_path / "out", tokenizer="char")
    assert meta["train"]["bytes"] + meta["val"]["bytes"] == 3_000_000
    assert meta["train"]["tokens"] + meta["val"]["tokens"] == 3_000_000 + 1  # one character each, one EOS


def test_memory_does_not_grow_with_the_corpus(tmp_path, monkeypatch):
    # Scaled-down buffers reach their steady state within a small corpus, and tracemalloc stays quick.
    monkeypatch.setattr(corpus_module, "PIECE_CHARS", 16 * 1024)
    monkeypatch.setattr(prepare_module, "CHUNK_CHARS", 4 * 1024)
    monkeypatch.setattr(prepare_module, "BATCH_CHARS", 16 * 1024)
    small = write_one_line(tmp_path / "small.txt", 200_000)
    large = write_one_line(tmp_path / "large.txt", 800_000)
    prepare_corpus(small, tmp_path / "warmup", tokenizer="char")  # imports and caches out of the way
    peaks = []
    for path in (small, large):
        tracemalloc.start()
        try:
            meta = prepare_corpus(path, tmp_path / path.stem, tokenizer="char")
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
        assert meta["train"]["bytes"] + meta["val"]["bytes"] == path.stat().st_size
    # Holding the larger corpus's text whole would add 600 kB; its ids as a Python list, several MB.
    assert peaks[1] - peaks[0] < 200_000, peaks


# --------------------------------------------------------------------------------------------------
# Reading
@pytest.fixture
def prepared(text_corpus, tmp_path):
    path, _ = text_corpus
    out = tmp_path / "prepared"
    prepare_corpus(path, out, tokenizer="char")
    return out


def test_split_is_a_read_only_memmap(prepared):
    data = TokenData(prepared)
    train = data.split("train")
    assert isinstance(train, np.memmap) and train.ndim == 1
    assert data.split("train") is train  # opened once
    with pytest.raises(ValueError):
        train[0] = 1
    assert data.tokenizer.fingerprint == data.fingerprint
    assert data.vocab_size == data.tokenizer.vocab_size
    assert data.bytes_per_token("val") == pytest.approx(data.num_bytes("val") / data.num_tokens("val"))


def test_require_tokens(prepared):
    data = TokenData(prepared)
    n = data.num_tokens("val")
    data.require_tokens("val", n)
    with pytest.raises(DataError, match=rf"val split of .* has {n} tokens but one block needs {n + 1}"):
        data.require_tokens("val", n + 1)


def test_unknown_split_name(prepared):
    with pytest.raises(ConfigError, match="unknown data split 'test'"):
        TokenData(prepared).split("test")


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda d: (d / "meta.json").unlink(), "has no meta.json"),
        (lambda d: (d / "meta.json").write_text("{oops", encoding="utf-8"), "cannot be read"),
        (lambda d: (d / "meta.json").write_text("[]", encoding="utf-8"), "not a JSON object"),
        (lambda d: _edit_meta(d, format_version=99), "format_version 99"),
        (lambda d: _edit_meta(d, dtype="float32"), "dtype 'float32'"),
        (lambda d: _edit_meta(d, val={"tokens": "many", "bytes": 1}), "no valid val entry"),
    ],
)
def test_broken_meta_is_not_a_prepared_folder(prepared, damage, reason):
    damage(prepared)
    with pytest.raises(DataError, match="is not a prepared data folder") as info:
        load_meta(prepared)
    assert reason in str(info.value) and "gptforge prepare" in str(info.value)


def _edit_meta(folder, **changes):
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    meta.update(changes)
    (folder / "meta.json").write_text(json.dumps(meta), encoding="utf-8")


def test_missing_folder_is_not_a_prepared_folder(tmp_path):
    with pytest.raises(DataError, match="is not a prepared data folder .*does not exist"):
        TokenData(tmp_path / "nowhere")


def test_truncated_token_file(prepared):
    path = prepared / "train.bin"
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(DataError, match="damaged"):
        TokenData(prepared).split("train")


def test_swapped_tokenizer_files_are_noticed(prepared):
    (prepared / "char_tokenizer.json").write_text(CharTokenizer.train(["xyz"])._canonical(), encoding="utf-8")
    with pytest.raises(DataError, match="not the ones the data was prepared with"):
        TokenData(prepared).tokenizer


def test_token_counts_match_counter_of_ids(prepared):
    # The reader and the raw file agree token for token.
    data = TokenData(prepared)
    raw = np.fromfile(prepared / "val.bin", dtype=np.uint16)
    assert Counter(raw.tolist()) == Counter(np.asarray(data.split("val")).tolist())
