"""Retrieval evaluation: recall@k and MRR computed from ranks, the data format, and bad data."""

import pytest

from gptforge.errors import DataError
from gptforge.evaluate.retrieval import (RetrievalQuestion, check_answers_exist, evaluate_retrieval,
                                         format_retrieval_report, read_retrieval_data)
from gptforge.knowledge.types import Hit, Passage


class FixedRetriever:
    """Returns a fixed ranking per question, to check the metrics against hand-computed values."""

    def __init__(self, rankings):
        self.rankings = rankings
        self.asked = []

    def search(self, query, k=5):
        self.asked.append(k)
        return [Hit(Passage(pid, pid.split("#")[0], "t", "x"), 1.0 / (i + 1))
                for i, pid in enumerate(self.rankings[query][:k])]


def test_recall_at_k_and_mrr_from_ranks():
    others = [f"o{i}#1" for i in range(12)]
    retriever = FixedRetriever({
        "first": ["a#1", *others],                # rank 1
        "third": [*others[:2], "a#1", *others],   # rank 3
        "seventh": [*others[:6], "a#2", *others],  # rank 7 (any passage of doc a counts)
        "missing": others,                       # not in the top 10
    })
    questions = [RetrievalQuestion("first", passage_id="a#1", line=1),
                 RetrievalQuestion("third", passage_id="a#1", line=2),
                 RetrievalQuestion("seventh", doc_id="a", line=3),
                 RetrievalQuestion("missing", passage_id="a#1", line=4)]
    result = evaluate_retrieval(retriever, questions)
    assert result["metrics"] == pytest.approx({"recall@1": 0.25, "recall@5": 0.5, "recall@10": 0.75,
                                              "mrr": (1 + 1 / 3 + 1 / 7) / 4})
    assert result["report"]["ranks"] == [1, 3, 7, None]
    assert set(retriever.asked) == {10}
    misses = result["report"]["misses"]
    assert [(m["line"], m["rank"]) for m in misses] == [(2, 3), (3, 7), (4, None)]
    assert misses[1]["expected"] == "a (any passage)" and misses[2]["retrieved"] == others[:3]
    text = format_retrieval_report(result["report"])
    assert "4 questions; answer not ranked first: 3" in text and "not in the top 10" in text


def test_reading_the_data(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text('\ufeff{"question": "q1", "passage_id": "a#1", "answer": "ignored"}\n\n'
                    '{"question": "q2", "doc_id": "b"}\n', encoding="utf-8")
    assert read_retrieval_data(path) == [RetrievalQuestion("q1", passage_id="a#1", line=1),
                                         RetrievalQuestion("q2", doc_id="b", line=3)]


@pytest.mark.parametrize("text,fragment", [
    ('{"question": "q"}\n', "line 1 names no answer"),
    ('{"passage_id": "a#1"}\n', "line 1 has no 'question'"),
    ('{"question": "  ", "passage_id": "a#1"}\n', "has no 'question'"),
    ('{"question": "q", "passage_id": 3}\n', "'passage_id' must be a string"),
    ('nope\n', "line 1 is not valid JSON"),
    ('[1]\n', "must be a JSON object"),
    ('\n\n', "holds no questions"),
])
def test_bad_data_is_one_clear_error(tmp_path, text, fragment):
    path = tmp_path / "qa.jsonl"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=fragment):
        read_retrieval_data(path)


def test_missing_and_non_utf8_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_retrieval_data(tmp_path / "nope.jsonl")
    (tmp_path / "bad.jsonl").write_bytes(b'{"question": "\xff"}')
    with pytest.raises(DataError, match="is not UTF-8"):
        read_retrieval_data(tmp_path / "bad.jsonl")


def test_answers_must_exist_in_the_knowledge_base():
    passages = [Passage("a#1", "a", "t", "x")]
    check_answers_exist([RetrievalQuestion("q", passage_id="a#1"), RetrievalQuestion("q", doc_id="a")], passages,
                        data="qa.jsonl", knowledge="kb")
    with pytest.raises(DataError, match="qa.jsonl line 5: passage 'a#2' is not in kb"):
        check_answers_exist([RetrievalQuestion("q", passage_id="a#2", line=5)], passages, data="qa.jsonl",
                            knowledge="kb")
    with pytest.raises(DataError, match="document 'b' is not in kb"):
        check_answers_exist([RetrievalQuestion("q", doc_id="b", line=1)], passages, data="qa.jsonl", knowledge="kb")
