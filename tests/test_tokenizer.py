"""Tokenizers: exact round trips, fingerprints, saving, GPT-2 files, incremental decoding and chat templates."""

from __future__ import annotations

import json
import re
from functools import cache

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptforge.errors import ConfigError, DataError, GptforgeError, InvalidTextError
from gptforge.tokenizer import (
    DEFAULT_CHAT_TEMPLATE,
    EOS_TOKEN,
    BPETokenizer,
    CharTokenizer,
    IncrementalDecoder,
    check_text,
    iter_pieces,
    load_tokenizer,
    render_chat,
)

TRAINING_TEXT = [
    "To be, or not to be, that is the question:\n",
    "Whether 'tis nobler in the mind to suffer\n",
    "The slings and arrows of outrageous fortune,\n",
    "naïve café, Ελληνικά, 中文文本, emoji 😀🎉 and more 😀\n",
] * 20

# st.text() never produces surrogates; the tokenizers promise exact round trips for everything else.
unicode_text = st.text(max_size=200)
# Weighted towards what tends to break decoders: multi-byte characters, combining marks, NUL, specials.
TRICKY_PARTS = ["a", " ", "\n", "\x00", "é", "e\u0301", "中", "😀", "👩\u200d👩\u200d👧", "\U0010ffff", EOS_TOKEN]
tricky_text = st.lists(st.sampled_from(TRICKY_PARTS), max_size=40).map("".join)
any_text = st.one_of(unicode_text, tricky_text)


@cache
def bpe() -> BPETokenizer:
    return BPETokenizer.train(iter(TRAINING_TEXT), vocab_size=320)


@cache
def char() -> CharTokenizer:
    # Trained on plain ASCII so that most generated characters take the UTF-8 byte fallback.
    return CharTokenizer.train(iter(["hello world, the quick brown fox\n"]))


def tokenizers():
    return [bpe(), char()]


def test_bpe_learned_merges():
    # Sanity: the corpus is large enough for real merges, so the round-trip tests exercise them.
    tok = bpe()
    assert tok.vocab_size > 257
    assert len(tok.encode("the question")) < len("the question".encode("utf-8"))
    assert tok.eos_id == tok.encode(EOS_TOKEN)[0]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=any_text)
def test_round_trip_of_any_text(text):
    for tok in tokenizers():
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text, tok.kind


@settings(max_examples=100, deadline=None)
@given(texts=st.lists(any_text, max_size=5))
def test_encode_batch_matches_encode(texts):
    for tok in tokenizers():
        assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


@pytest.mark.parametrize("make", [bpe, char], ids=["bpe", "char"])
def test_save_and_load_keep_fingerprint_and_ids(make, tmp_path):
    tok = make()
    written = tok.save(tmp_path)
    assert all(p.is_file() for p in written)
    loaded = load_tokenizer(tmp_path)
    assert type(loaded) is type(tok)
    assert loaded.fingerprint == tok.fingerprint
    assert loaded.vocab_size == tok.vocab_size and loaded.eos_id == tok.eos_id
    sample = "".join(TRAINING_TEXT[:4]) + " unseen: ☃ \x00"
    assert loaded.encode(sample) == tok.encode(sample)


def test_different_vocabularies_have_different_fingerprints():
    small = BPETokenizer.train(iter(TRAINING_TEXT), vocab_size=280)
    assert small.vocab_size != bpe().vocab_size
    assert small.fingerprint != bpe().fingerprint
    assert BPETokenizer.train(iter(TRAINING_TEXT), vocab_size=280).fingerprint == small.fingerprint
    assert CharTokenizer.train(["abc"]).fingerprint != CharTokenizer.train(["abd"]).fingerprint
    assert CharTokenizer.train(["abc"]).fingerprint == CharTokenizer.train(["cba"]).fingerprint


def test_char_tokenizer_keeps_most_frequent_characters():
    tok = CharTokenizer.train(["aaaabbbccd"], max_chars=2)
    assert sorted(tok.chars) == ["a", "b"]
    assert tok.decode(tok.encode("dcba")) == "dcba"
    assert len(tok.encode("d")) == 1 and tok.encode("d")[0] < 256  # byte fallback


def _decode_incrementally(tok, ids, prompt=()):
    decoder = IncrementalDecoder(tok, prompt)
    pieces = [decoder.push(i) for i in ids]
    pieces.append(decoder.flush())
    return [p for p in pieces if p]


@settings(max_examples=200, deadline=None)
@given(prompt=any_text, text=any_text)
def test_incremental_pieces_concatenate_to_decode(prompt, text):
    for tok in tokenizers():
        prompt_ids, ids = tok.encode(prompt), tok.encode(text)
        pieces = _decode_incrementally(tok, ids, prompt_ids)
        full = tok.decode(prompt_ids + ids)
        assert "".join(pieces) == full[len(tok.decode(prompt_ids)):], tok.kind
        if "\ufffd" not in prompt + text:
            # A piece that ends inside a multi-byte character would carry a replacement character.
            assert not any("\ufffd" in p for p in pieces), (tok.kind, pieces)


def test_incremental_decoder_waits_for_a_whole_emoji():
    tok = char()
    ids = tok.encode("a😀b")
    assert len(ids) == 6  # 'a', four UTF-8 bytes, 'b'
    decoder = IncrementalDecoder(tok)
    assert [decoder.push(i) for i in ids] == ["a", "", "", "", "😀", "b"]
    assert decoder.flush() == ""


def test_incremental_decoder_flushes_an_incomplete_character():
    tok = char()
    ids = tok.encode("😀")[:2]
    decoder = IncrementalDecoder(tok)
    assert [decoder.push(i) for i in ids] == ["", ""]
    assert decoder.flush() == "\ufffd"


def test_iter_pieces_round_trips():
    text = "naïve 😀 text\n中文"
    for tok in tokenizers():
        assert "".join(iter_pieces(tok, tok.encode(text))) == text


# --------------------------------------------------------------------------------------------------
# GPT-2's original file pair, in miniature: byte-level symbols, one merge per line after a version header.
GPT2_VOCAB = {"h": 0, "e": 1, "l": 2, "o": 3, "Ġ": 4, "w": 5, "r": 6, "d": 7, "he": 8, "ll": 9, "llo": 10,
              "Ġw": 11, EOS_TOKEN: 12}
GPT2_MERGES = "#version: 0.2\nh e\nl l\nll o\nĠ w\n"


def _write_gpt2_files(folder):
    (folder / "vocab.json").write_text(json.dumps(GPT2_VOCAB, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text(GPT2_MERGES, encoding="utf-8")


def test_gpt2_vocab_and_merges(tmp_path):
    _write_gpt2_files(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, BPETokenizer)
    ids = tok.encode("hello world")
    assert [tok.id_to_token(i) for i in ids] == ["he", "llo", "Ġw", "o", "r", "l", "d"]
    assert tok.decode(ids) == "hello world"
    assert tok.eos_id == GPT2_VOCAB[EOS_TOKEN]
    assert tok.vocab_size == len(GPT2_VOCAB)
    # The end-of-text marker is one special token, not spelled out from the merges.
    assert tok.encode(f"hello{EOS_TOKEN}") == tok.encode("hello") + [GPT2_VOCAB[EOS_TOKEN]]


@pytest.mark.parametrize("text, message", [
    ("\udcff", "the text holds a lone surrogate U+DCFF at character 0 (as Python reads the byte 0xff of input that "
                "is not UTF-8), which is not valid Unicode and cannot be tokenized"),
    ("ROMEO: \udc80!", "the text holds a lone surrogate U+DC80 at character 7 (as Python reads the byte 0x80 of "
                        "input that is not UTF-8), which is not valid Unicode and cannot be tokenized"),
    ("é\ud800", "the text holds a lone surrogate U+D800 at character 1, which is not valid Unicode and cannot be "
                "tokenized"),
    ("😀\udfff", "the text holds a lone surrogate U+DFFF at character 1,"),
])
@pytest.mark.parametrize("kind", ["bpe", "char", "gpt2-files"])
def test_every_tokenizer_refuses_lone_surrogates_with_one_sentence(kind, text, message, tmp_path):
    if kind == "gpt2-files":
        _write_gpt2_files(tmp_path)
        tok = load_tokenizer(tmp_path)
    else:
        tok = bpe() if kind == "bpe" else char()
    for encode in (tok.encode, lambda t: tok.encode_batch(["fine", t])[1]):
        with pytest.raises(InvalidTextError) as err:
            encode(text)
        assert isinstance(err.value, GptforgeError) and str(err.value).startswith(message)
        assert err.value.position == next(i for i, c in enumerate(text) if 0xD800 <= ord(c) <= 0xDFFF)


def test_check_text_names_the_text_and_passes_valid_text_through():
    assert check_text("naïve 😀") == "naïve 😀"
    with pytest.raises(InvalidTextError, match=r"^--prompt holds a lone surrogate U\+DCFE at character 2 "):
        check_text("ab\udcfe", "--prompt")


def test_gpt2_files_survive_save_and_load(tmp_path):
    _write_gpt2_files(tmp_path)
    tok = load_tokenizer(tmp_path)
    saved = tmp_path / "saved"
    saved.mkdir()
    tok.save(saved)
    again = load_tokenizer(saved)
    assert again.fingerprint == tok.fingerprint
    assert again.encode("hello world") == tok.encode("hello world")


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("tokenizer.json", "{not json"),
        ("tokenizer.json", '{"model": 3}'),
        ("char_tokenizer.json", "[1, 2]"),
        ("char_tokenizer.json", '{"type": "char", "chars": ["ab"]}'),
        ("char_tokenizer.json", '{"type": "bpe", "chars": ["a"]}'),
    ],
)
def test_malformed_tokenizer_file_is_a_data_error(tmp_path, name, content):
    (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=name):
        load_tokenizer(tmp_path)


def test_malformed_gpt2_files_are_a_data_error(tmp_path):
    (tmp_path / "vocab.json").write_text("{broken", encoding="utf-8")
    (tmp_path / "merges.txt").write_text(GPT2_MERGES, encoding="utf-8")
    with pytest.raises(DataError, match="vocab.json"):
        load_tokenizer(tmp_path)


def test_folder_without_tokenizer_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no tokenizer"):
        load_tokenizer(tmp_path)


def test_bpe_vocabulary_too_small_is_a_data_error():
    with pytest.raises(DataError, match="257"):
        BPETokenizer.train(iter(["abc"]), vocab_size=100)


# --------------------------------------------------------------------------------------------------
# Chat templates (their use in fine-tuning data is tested in tests/data/test_finetune_data.py)
CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital."},
]


def test_default_template_renders_role_tagged_text():
    segments = render_chat(CHAT)
    assert "".join(text for text, _ in segments) == (
        "<|system|>\nYou are a helpful assistant.\n<|user|>\nWhat is the capital of France?\n"
        "<|assistant|>\nParis is the capital.<|endoftext|>\n")
    assert [text for text, trainable in segments if trainable] == ["Paris is the capital.", EOS_TOKEN]


@pytest.mark.parametrize("template, message", [
    ("<|{role}|>\n{content}\n", "must hold {content} once, followed by {end} once"),
    ("{end}{content}", "must hold {content} once, followed by {end} once"),
    ("{content}{content}{end}", "must hold {content} once, followed by {end} once"),
    ("{name}: {content}{end}", "has field {name}; only {role}, {content} and {end} are allowed"),
    ("{role!r}: {content}{end}", "has field {role}"),
    ("{role: {content}{end}", "is not a valid format string"),
])
def test_bad_template_is_a_config_error(template, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        render_chat(CHAT, template)


def test_template_default_is_documented():
    assert "{role}" in DEFAULT_CHAT_TEMPLATE and "{content}{end}" in DEFAULT_CHAT_TEMPLATE
