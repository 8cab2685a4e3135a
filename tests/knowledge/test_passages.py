"""Reading documents and cutting them into passages: headings, budgets, overlap, unicode, bad input."""

import json
import logging
import unicodedata

import pytest

from gptforge.errors import ConfigError, KnowledgeError
from gptforge.knowledge.passages import (Document, estimate_tokens, read_documents, slugify, split_documents,
                                         token_counter)
from gptforge.tokenizer import BPETokenizer, CharTokenizer

MANUAL = """# Widget manual

Intro paragraph about the widget.

## Setup

Plug the widget in. Press the blue button.

### Wi-Fi

Hold the button for five seconds to pair.

## Care

Wipe with a dry cloth.
"""


def long_text(n_sentences: int, word: str = "refund") -> str:
    return " ".join(f"Sentence {i} explains the {word} rules in plain words." for i in range(n_sentences))


def test_headings_make_sections_and_titles():
    passages = split_documents([Document("manual.md", "Widget manual", MANUAL)], max_passage_tokens=64)
    assert [(p.id, p.title, p.text) for p in passages] == [
        ("manual.md#1", "Widget manual", "Intro paragraph about the widget."),
        ("manual.md#2", "Widget manual > Setup", "Plug the widget in. Press the blue button."),
        ("manual.md#3", "Widget manual > Setup > Wi-Fi", "Hold the button for five seconds to pair."),
        ("manual.md#4", "Widget manual > Care", "Wipe with a dry cloth."),
    ]
    assert {p.doc_id for p in passages} == {"manual.md"}


def test_a_heading_inside_a_code_fence_is_text():
    text = "# Doc\n\n```\n# not a heading\n```\n\n## Real\n\nbody"
    passages = split_documents([Document("d.md", "Doc", text)])
    assert [p.title for p in passages] == ["Doc", "Doc > Real"]
    assert "# not a heading" in passages[0].text


def test_short_paragraphs_of_a_section_share_a_passage():
    text = "first paragraph.\n\nsecond paragraph.\n\nthird paragraph."
    (passage,) = split_documents([Document("d", "D", text)])
    assert passage.text == text


@pytest.mark.parametrize("budget,overlap", [(16, 0), (32, 8), (96, 16)])
def test_every_passage_fits_the_budget_and_nothing_is_lost(budget, overlap):
    text = "# Policy\n\n" + long_text(40) + "\n\n" + long_text(7, "exchange") + "\n\n## Other\n\n" + long_text(3)
    passages = split_documents([Document("p.md", "Policy", text)], max_passage_tokens=budget,
                               overlap_tokens=overlap)
    assert len(passages) > 3
    assert all(estimate_tokens(p.text) <= budget for p in passages)
    words = " ".join(p.text for p in passages).split()
    for i in range(40):  # every sentence is whole in some passage, once overlap is allowed for
        assert any(f"Sentence {i} explains the refund rules in plain words." in p.text for p in passages)
    assert [p.id for p in passages] == [f"p.md#{n}" for n in range(1, len(passages) + 1)]
    if overlap == 0:
        assert len(words) == len(text.replace("# Policy", "").replace("## Other", "").split())


def test_overlap_repeats_the_end_of_the_previous_passage():
    passages = split_documents([Document("d", "D", long_text(20))], max_passage_tokens=32, overlap_tokens=8)
    for prev, nxt in zip(passages, passages[1:]):
        words = nxt.text.split()
        shared = max((n for n in range(1, len(words)) if prev.text.endswith(" ".join(words[:n]))), default=0)
        assert 1 <= estimate_tokens(" ".join(words[:shared])) <= 8


def test_a_passage_never_spans_two_sections():
    text = "# T\n\n## A\n\nalpha words here.\n\n## B\n\nbeta words here."
    passages = split_documents([Document("d", "T", text)], max_passage_tokens=96, overlap_tokens=16)
    assert [p.text for p in passages] == ["alpha words here.", "beta words here."]


def test_a_sentence_longer_than_the_budget_is_cut_between_words():
    text = " ".join(f"word{i}" for i in range(200))  # no sentence end at all
    passages = split_documents([Document("d", "D", text)], max_passage_tokens=16, overlap_tokens=0)
    assert all(estimate_tokens(p.text) <= 16 for p in passages)
    assert " ".join(p.text for p in passages).split() == text.split()


def test_a_word_longer_than_the_budget_is_cut_between_whole_characters():
    decomposed = "e\u0301"  # e + combining acute: must stay together
    word = ("x" * 30 + decomposed.join("abc")) * 10
    doc = Document("d", "D", "start " + word + " end")
    tok = CharTokenizer(list("abcdefghijklmnopqrstuvwxyz "))
    passages = split_documents([doc], max_passage_tokens=10, overlap_tokens=0, tokenizer=tok)
    count = token_counter(tok)
    assert all(count(p.text) <= 10 for p in passages)
    assert "".join(p.text.replace(" ", "") for p in passages) == ("start" + word + "end")
    assert not any(unicodedata.combining(p.text[0]) for p in passages)


def test_unicode_is_nfc_and_survives_splitting(tmp_path):
    body = "Le cafe\u0301 est prêt. 日本語のテキスト。😀 emoji 👩\u200d👩\u200d👧 family."
    (tmp_path / "café.md").write_text(f"# Café\n\n{body}\n", encoding="utf-8")
    (doc,) = read_documents(tmp_path)
    assert doc.doc_id == "café.md" and doc.title == "Café"
    assert "café est prêt" in doc.text and unicodedata.is_normalized("NFC", doc.text)
    tok = BPETokenizer.train(iter([doc.text] * 3), vocab_size=280)
    passages = split_documents([doc], max_passage_tokens=8, overlap_tokens=0, tokenizer=tok)
    assert len(passages) > 3
    # Nothing lost or changed: the passages' pieces put back together are the text (spaces aside).
    assert "".join(p.text.replace(" ", "") for p in passages) == unicodedata.normalize("NFC", body).replace(" ", "")
    for p in passages:
        assert len(tok.encode(p.text)) <= 8 or len(p.text.split()) == 1  # only an unsplittable character is over
        assert not unicodedata.combining(p.text[0]) and not p.text.startswith("\u200d")
        assert not p.text.endswith("\u200d")
    assert any("👩\u200d👩\u200d👧" in p.text for p in passages)  # the joined emoji is never cut


def test_tokens_are_counted_with_the_tokenizer_when_given():
    tok = CharTokenizer(list("abcdefghijklmnopqrstuvwxyz. "))
    text = long_text(10).lower()
    by_chars = split_documents([Document("d", "D", text)], max_passage_tokens=40, overlap_tokens=0, tokenizer=tok)
    by_words = split_documents([Document("d", "D", text)], max_passage_tokens=40, overlap_tokens=0)
    assert all(len(tok.encode(p.text)) <= 40 for p in by_chars)
    assert len(by_chars) > len(by_words)  # a character tokenizer counts far more tokens per word


def test_estimate_counts_words_by_length_and_punctuation():
    assert estimate_tokens("a cat sat.") == 4
    assert estimate_tokens("customer") == 2  # 8 letters: ceil(8 / 4)
    assert estimate_tokens("refund") == 2 and estimate_tokens("card") == 1
    assert estimate_tokens("   ") == 0


def test_ids_are_stable_across_rebuilds_for_unchanged_documents(tmp_path):
    (tmp_path / "a.md").write_text("# A\n\n" + long_text(30), encoding="utf-8")
    (tmp_path / "b.md").write_text("# B\n\nshort", encoding="utf-8")
    first = split_documents(read_documents(tmp_path), max_passage_tokens=32)
    (tmp_path / "b.md").write_text("# B\n\nchanged and longer " + long_text(5), encoding="utf-8")
    (tmp_path / "0.md").write_text("# Zero\n\nnew doc sorted first", encoding="utf-8")
    second = split_documents(read_documents(tmp_path), max_passage_tokens=32)
    assert [p for p in first if p.doc_id == "a.md"] == [p for p in second if p.doc_id == "a.md"]


def test_folder_reading_is_recursive_sorted_and_skips_hidden_and_other_files(tmp_path):
    (tmp_path / "sub" / "deep").mkdir(parents=True)
    (tmp_path / ".git").mkdir()
    (tmp_path / "z.txt").write_text("zed text", encoding="utf-8")
    (tmp_path / "sub" / "deep" / "faq.markdown").write_text("no heading here", encoding="utf-8")
    (tmp_path / "sub" / "a.MD").write_text("\ufeff# Upper\r\n\r\ntext\r\n", encoding="utf-8")
    (tmp_path / ".git" / "x.md").write_text("hidden", encoding="utf-8")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    docs = read_documents(tmp_path)
    assert [d.doc_id for d in docs] == ["sub/a.MD", "sub/deep/faq.markdown", "z.txt"]
    assert [d.title for d in docs] == ["Upper", "faq", "z"]
    assert "\r" not in docs[0].text and not docs[0].text.startswith("\ufeff")


def test_jsonl_documents_and_faq_pairs(tmp_path):
    path = tmp_path / "kb.jsonl"
    lines = [{"id": "shipping", "title": "Shipping", "text": "We ship in 2 days."},
             {"id": 7, "text": "Numeric ids are read as text."},
             {"question": "How do I reset my password?", "answer": "Click 'Forgot password'."},
             {"id": "hours", "question": "When are you open?", "answer": "9 to 5."}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n", encoding="utf-8")
    docs = read_documents(path)
    assert [(d.doc_id, d.title) for d in docs] == [
        ("shipping", "Shipping"), ("7", "7"), ("how-do-i-reset-my-password", "How do I reset my password?"),
        ("hours", "When are you open?")]
    passages = split_documents(docs)
    faq = passages[2]
    assert faq.id == "how-do-i-reset-my-password#1"
    assert faq.text == "Q: How do I reset my password?\nA: Click 'Forgot password'."


def test_slugify():
    assert slugify("  What's the return window?? ") == "what-s-the-return-window"
    assert slugify("Où est ma commande ?") == "où-est-ma-commande"
    assert slugify("?!") .startswith("q-")


def test_empty_documents_are_skipped_with_a_warning(tmp_path, caplog):
    (tmp_path / "empty.md").write_text("   \n\n", encoding="utf-8")
    (tmp_path / "headings-only.md").write_text("# Title\n\n## Section\n", encoding="utf-8")
    (tmp_path / "ok.md").write_text("# OK\n\ncontent", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="gptforge"):
        passages = split_documents(read_documents(tmp_path))
    assert [p.doc_id for p in passages] == ["ok.md"]
    assert "empty.md" in caplog.text and "headings-only.md" in caplog.text


def write(path, text, encoding="utf-8"):
    path.write_text(text, encoding=encoding)
    return path


@pytest.mark.parametrize("setup,fragment", [
    (lambda d: d / "missing", "do not exist"),
    (lambda d: d, "holds no .md, .markdown or .txt files"),
    (lambda d: write(d / "empty.md", "\n\n") and d, "hold no document with text"),
    (lambda d: write(d / "docs.csv", "a,b"), "neither a folder nor"),
    (lambda d: (d / "bad.md").write_bytes(b"ok\n\xff\xfe") and d / "bad.md", "is not UTF-8: byte 0xff on line 2"),
    (lambda d: write(d / "x.jsonl", '{"id": "a", "text": "t"}\n{oops\n'), "line 2 is not valid JSON"),
    (lambda d: write(d / "x.jsonl", '["a"]\n'), "line 1 must be a JSON object"),
    (lambda d: write(d / "x.jsonl", '{"title": "no text"}\n'), "has neither a 'text' field"),
    (lambda d: write(d / "x.jsonl", '{"text": "no id"}\n'), "has no 'id' field"),
    (lambda d: write(d / "x.jsonl", '{"question": "q?"}\n'), "has no 'answer' field"),
    (lambda d: write(d / "x.jsonl", '{"id": "a", "text": 3}\n'), "'text' must be a string"),
    (lambda d: write(d / "x.jsonl", '{"id": "a", "text": "x\\ud800"}\n'), "lone surrogate U+D800"),
    (lambda d: write(d / "x.jsonl", '{"id": "a", "text": "t"}\n{"id": "a", "text": "u"}\n'), "also on line 1"),
    (lambda d: write(d / "x.jsonl", "\n\n"), "holds no JSON lines"),
    (lambda d: write(d / "x.jsonl", '{"question": "Hours?", "answer": "9"}\n{"question": "hours", "answer": "5"}\n'),
     "'hours' (made from the question: give one of them an 'id') is also on line 1"),
])
def test_bad_docs_are_one_clear_error(tmp_path, setup, fragment):
    source = setup(tmp_path)
    with pytest.raises(KnowledgeError) as info:
        read_documents(source)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("budget,overlap,fragment", [(4, 0, "at least 8"), (32, 17, "between 0 and half"),
                                                     (32, -1, "between 0 and half")])
def test_a_budget_out_of_range_is_a_config_error(budget, overlap, fragment):
    with pytest.raises(ConfigError, match=fragment):
        split_documents([Document("d", "D", "text")], max_passage_tokens=budget, overlap_tokens=overlap)
