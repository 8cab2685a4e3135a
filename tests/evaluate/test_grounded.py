"""Grounded-answer metrics: SQuAD normalisation, exact match, token F1, source hits, the data file."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from gptforge.errors import DataError
from gptforge.evaluate.grounded import (GroundedExample, exact_match, load_grounded_examples, normalize_answer,
                                        score_grounded, source_ids, sources_include, token_f1)
from gptforge.knowledge.types import Hit, Passage


@pytest.mark.parametrize("text, expected", [
    ("The Central Station hub.", "central station hub"),
    ("  A   phone\tnumber ", "phone number"),
    ("2,400", "2400"),
    ("«Paris»!", "paris"),                # Unicode punctuation too
    ("ÉTÉ", "été"),                        # letters beyond ASCII are kept, lower-cased
    ("ﬁve", "five"),                       # NFKC folds the ligature
    ("theatre an anchor", "theatre anchor"),  # only whole-word articles go
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_ignores_case_punctuation_and_articles_and_takes_the_best_reference():
    assert exact_match("the Harbour station.", "Harbour Station") == 1.0
    assert exact_match("Harbour", "Harbour station") == 0.0
    assert exact_match("40 percent", ["forty percent", "40 percent"]) == 1.0
    with pytest.raises(ValueError):
        exact_match("x", [])


def test_token_f1_counts_shared_words_as_a_multiset():
    # all 4 words of the prediction are in the 5-word reference: precision 1, recall 4/5
    assert token_f1("5 to 7 days", "5 to 7 business days") == pytest.approx(2 * 1.0 * 0.8 / 1.8)
    # repeated words count only as often as the reference has them
    assert token_f1("euros euros euros", "20 euros") == pytest.approx(2 * (1 / 3) * 0.5 / (1 / 3 + 0.5))
    assert token_f1("nothing shared", "20 euros") == 0.0
    assert token_f1("The 20 euros", ["twenty", "20 euros"]) == 1.0
    # an answer that normalises to nothing matches only an empty reference
    assert token_f1("the", "20 euros") == 0.0
    assert token_f1("", "a") == 1.0


def _hit(pid: str, doc: str, score: float = 1.0) -> Hit:
    return Hit(Passage(id=pid, doc_id=doc, title=doc, text="..."), score)


def test_source_ids_of_hits_passages_and_dicts():
    hit = _hit("pricing.md#2", "pricing.md")
    assert source_ids(hit) == ("pricing.md#2", "pricing.md")
    assert source_ids(hit.passage) == ("pricing.md#2", "pricing.md")
    assert source_ids(hit.to_source()) == ("pricing.md#2", "pricing.md")   # doc id from the passage id
    assert source_ids({"id": "faq-7", "doc_id": "faq"}) == ("faq-7", "faq")
    assert source_ids({"id": "faq-7"}) == ("faq-7", None)


def test_sources_include_prefers_the_passage_id_over_the_document():
    found = [_hit("pricing.md#1", "pricing.md"), _hit("passes.md#3", "passes.md")]
    assert sources_include(found, passage_id="passes.md#3") is True
    # the right document but another passage of it: not a hit when the passage is named
    assert sources_include(found, passage_id="pricing.md#2", doc_id="pricing.md") is False
    assert sources_include(found, doc_id="pricing.md") is True
    assert sources_include(found, doc_id="refunds.md") is False
    assert sources_include([], doc_id="refunds.md") is False
    assert sources_include(found) is None


def test_score_grounded_averages_and_leaves_out_questions_without_ids():
    examples = [GroundedExample("q1", ("9 euros",), doc_id="passes.md"),
                GroundedExample("q2", ("the QR code",), passage_id="unlocking.md#1"),
                GroundedExample("q3", ("Finland",))]
    predictions = ["9 euros", "QR", "Sweden"]
    sources = [[_hit("passes.md#1", "passes.md")], [_hit("pricing.md#1", "pricing.md")], []]
    result = score_grounded(examples, predictions, sources)
    m = result["metrics"]
    assert m["exact_match"] == pytest.approx(1 / 3)
    assert m["f1"] == pytest.approx((1.0 + 2 * 1.0 * 0.5 / 1.5 + 0.0) / 3)
    assert m["source_hit"] == pytest.approx(1 / 2)        # q3 names no passage: left out
    report = result["report"]
    assert report["questions"] == 3 and report["with_source_ids"] == 2
    assert report["per_question"][1]["sources"] == ["pricing.md#1"]
    assert report["per_question"][2]["source_hit"] is None
    json.dumps(result)   # the report is written with --json
    assert score_grounded(examples[2:], ["x"], [[]])["metrics"]["source_hit"] is None
    with pytest.raises(ValueError):
        score_grounded(examples, predictions, sources[:2])


def _write(tmp_path, lines, name="qa.jsonl"):
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_load_grounded_examples(tmp_path):
    path = _write(tmp_path, [
        json.dumps({"question": "How much?", "answer": "9 euros", "doc_id": "passes.md", "note": "ignored"}),
        "",
        json.dumps({"question": "Où ?", "answer": ["Paris", "à Paris"], "passage_id": "cities.md#1"}),
    ])
    assert load_grounded_examples(path) == [
        GroundedExample("How much?", ("9 euros",), doc_id="passes.md"),
        GroundedExample("Où ?", ("Paris", "à Paris"), passage_id="cities.md#1"),
    ]


@dataclass
class Bad:
    lines: list
    message: str


@pytest.mark.parametrize("bad", [
    Bad([], "holds no questions"),
    Bad(["{not json"], "line 1 is not valid JSON"),
    Bad(["[1, 2]"], "line 1 must be a JSON object, got a JSON list"),
    Bad([json.dumps({"answer": "x"})], "line 1 has no \"question\""),
    Bad([json.dumps({"question": "q", "answer": "a"}), json.dumps({"question": "q"})], "line 2 has no \"answer\""),
    Bad([json.dumps({"question": " ", "answer": "a"})], "\"question\" must be a non-empty string"),
    Bad([json.dumps({"question": "q", "answer": []})], "\"answer\" must be a non-empty string or a list"),
    Bad([json.dumps({"question": "q", "answer": ["a", 3]})], "\"answer\" must be a non-empty string or a list"),
    Bad([json.dumps({"question": "q", "answer": "a", "doc_id": 7})], "\"doc_id\" must be a non-empty string"),
], ids=lambda b: b.message)
def test_bad_grounded_files_are_one_clear_error(tmp_path, bad):
    path = _write(tmp_path, bad.lines)
    with pytest.raises(DataError, match=bad.message.replace("[", r"\[")):
        load_grounded_examples(path)


def test_missing_and_undecodable_files(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl does not exist"):
        load_grounded_examples(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="is a folder, not a file"):
        load_grounded_examples(tmp_path)
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps({"question": "q", "answer": "x"}).encode().replace(b"x", b"\xe9") + b"\n")
    with pytest.raises(DataError, match="is not UTF-8: byte 0xe9 on line 1"):
        load_grounded_examples(path)
