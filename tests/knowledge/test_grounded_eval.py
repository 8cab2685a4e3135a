"""`gptforge evaluate --task grounded`: answers are what grounded chat replies, sources are what it retrieved."""

from __future__ import annotations

import json

import pytest

from gptforge.chat import ChatSession
from gptforge.checkpoint import load_pretrained
from gptforge.config import GenerateConfig, GroundingConfig
from gptforge.errors import ConfigError
from gptforge.knowledge.grounded_eval import answer_questions, evaluate_grounded
from gptforge.knowledge.grounding import Grounding
from gptforge.knowledge.index import KnowledgeBase, build_knowledge_base
from tests.cli_utils import assert_one_line_error, run, save_tiny_bpe_checkpoint

DOCS = {
    "refunds.md": ("# Refunds\n\n## Timing\n\nRefunds reach your card in 5 days.\n\n"
                   "## Passes\n\nPasses are refunded within 2 days.\n"),
    "helmets.md": "# Helmets\n\n## Borrowing\n\nHelmets can be borrowed at the Central hub.\n",
    "weather.md": "# Weather\n\n## Wind\n\nRides stop when the wind is strong.\n",
}
QUESTIONS = [
    {"question": "How long until refunds reach my card?", "answer": "5 days", "passage_id": "refunds.md#1"},
    {"question": "Where are helmets borrowed?", "answer": "the Central hub", "doc_id": "helmets.md"},
    # names a passage that retrieval does not put first, nor among the passages that fit
    {"question": "When do rides stop?", "answer": "strong wind", "passage_id": "refunds.md#2"},
]
ANSWER_TOKENS = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("grounded")
    ckpt = save_tiny_bpe_checkpoint(root / "ckpt")
    docs = root / "docs"
    docs.mkdir()
    for name, text in DOCS.items():
        (docs / name).write_text(text, encoding="utf-8")
    build_knowledge_base(docs, root / "kb", checkpoint=ckpt)
    qa = root / "qa.jsonl"
    qa.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS), encoding="utf-8")
    return ckpt, root / "kb", qa


def _chat_replies(ckpt, grounding):
    """What `gptforge chat` replies at temperature 0 to each question, as the first turn, and its sources."""
    loaded = load_pretrained(ckpt)
    replies, sources = [], []
    for q in QUESTIONS:
        config = GenerateConfig(temperature=0.0, max_new_tokens=ANSWER_TOKENS)
        session = ChatSession(loaded.model, loaded.tokenizer, config, grounding=grounding)
        replies.append("".join(session.send(q["question"])).strip())
        sources.append([hit.passage.id for hit in session.sources])
    return replies, sources


def test_grounded_answers_and_sources_are_those_of_grounded_chat(setup):
    ckpt, kb, qa = setup
    result = evaluate_grounded(ckpt, qa, grounding=GroundingConfig(knowledge=str(kb)), max_new_tokens=ANSWER_TOKENS)
    replies, sources = _chat_replies(ckpt, Grounding.load(GroundingConfig(knowledge=str(kb))))
    rows = result["report"]["per_question"]
    assert [r["prediction"] for r in rows] == replies
    assert [r["sources"] for r in rows] == sources
    assert sources[0] and sources[0][0] == "refunds.md#1"   # retrieval put the answering passage first
    # Source hits follow from the sources: q1 names a passage that is in them, q2 a document that is,
    # q3 a passage that is not.
    expected = [q.get("passage_id") in s if "passage_id" in q else any(p.startswith(q["doc_id"] + "#") for p in s)
                for q, s in zip(QUESTIONS, sources)]
    assert [r["source_hit"] for r in rows] == expected
    assert expected[:2] == [True, True] and expected[2] is False
    assert result["metrics"]["source_hit"] == pytest.approx(2 / 3)
    assert result["task"] == "grounded" and result["knowledge"] == str(kb)
    assert result["report"]["questions"] == 3 and result["report"]["refused"] == 0
    json.dumps(result)


def test_without_a_knowledge_base_the_plain_chat_answers_and_no_source_is_scored(setup):
    ckpt, _, qa = setup
    result = evaluate_grounded(ckpt, qa, max_new_tokens=ANSWER_TOKENS)
    replies, sources = _chat_replies(ckpt, None)
    assert [r["prediction"] for r in result["report"]["per_question"]] == replies
    assert sources == [[], [], []]
    assert result["metrics"]["source_hit"] is None and result["knowledge"] is None
    assert all(r["source_hit"] is None for r in result["report"]["per_question"])


def test_batches_give_the_same_answers_as_one_question_at_a_time(setup):
    ckpt, kb, _ = setup
    loaded = load_pretrained(ckpt)
    grounding = Grounding.load(GroundingConfig(knowledge=str(kb)))
    questions = [q["question"] for q in QUESTIONS]
    together = answer_questions(loaded.model, loaded.tokenizer, questions, grounding=grounding,
                                max_new_tokens=ANSWER_TOKENS, batch_size=3)
    alone = answer_questions(loaded.model, loaded.tokenizer, questions, grounding=grounding,
                             max_new_tokens=ANSWER_TOKENS, batch_size=1)
    assert together.answers == alone.answers


def test_knowledge_only_refuses_questions_the_knowledge_base_has_nothing_on(setup, tmp_path):
    ckpt, kb, _ = setup
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"question": "Quixotic zebras?", "answer": "no", "doc_id": "refunds.md"}) + "\n"
                  + json.dumps(QUESTIONS[0]) + "\n", encoding="utf-8")
    config = GroundingConfig(knowledge=str(kb), knowledge_only=True, refusal="Not in my documents.")
    result = evaluate_grounded(ckpt, qa, grounding=config, max_new_tokens=ANSWER_TOKENS)
    rows = result["report"]["per_question"]
    assert rows[0]["prediction"] == "Not in my documents." and rows[0]["refused"] is True
    assert rows[0]["source_hit"] is False and rows[0]["sources"] == []
    assert rows[1]["refused"] is False and result["report"]["refused"] == 1


def test_an_answer_budget_the_context_cannot_hold_is_one_error(setup):
    ckpt, kb, qa = setup
    with pytest.raises(ConfigError, match="max_new_tokens"):
        evaluate_grounded(ckpt, qa, max_new_tokens=128)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        evaluate_grounded(ckpt, qa, grounding=GroundingConfig(knowledge=str(kb)), max_new_tokens=0)


def test_cli_prints_the_metrics_and_writes_the_report(setup, capsys, tmp_path):
    ckpt, kb, qa = setup
    out = tmp_path / "report.json"
    code, stdout, _ = run(capsys, "evaluate", "--task", "grounded", "--checkpoint", str(ckpt), "--knowledge", str(kb),
                          "--data", str(qa), "--max-new-tokens", str(ANSWER_TOKENS), "--json", str(out))
    assert code == 0
    line = [l for l in stdout.splitlines() if l.startswith("exact_match")][0]
    report = json.loads(out.read_text(encoding="utf-8"))
    assert line.split()[:6] == ["exact_match", f"{report['metrics']['exact_match']:.4f}",
                                "f1", f"{report['metrics']['f1']:.4f}",
                                "source_hit", f"{report['metrics']['source_hit']:.4f}"]
    assert len(report["report"]["per_question"]) == 3


@pytest.mark.parametrize("argv, fragment", [
    (["--knowledge", "KB", "--data", "QA"], "--task grounded needs --checkpoint"),
    (["--checkpoint", "CKPT", "--knowledge", "nowhere", "--data", "QA"], "nowhere"),
    (["--checkpoint", "CKPT", "--data", "QA", "--passages", "2"], "--passages only applies with --knowledge"),
    (["--checkpoint", "CKPT", "--knowledge", "KB", "--data", "missing.jsonl"], "missing.jsonl"),
])
def test_cli_bad_input_is_one_error_line(setup, capsys, argv, fragment):
    ckpt, kb, qa = setup
    names = {"CKPT": str(ckpt), "KB": str(kb), "QA": str(qa)}
    code, _, err = run(capsys, "evaluate", "--task", "grounded", *[names.get(a, a) for a in argv])
    assert_one_line_error(code, err, fragment)


def test_grounding_flags_are_refused_for_the_other_tasks(setup, capsys):
    ckpt, kb, qa = setup
    code, _, err = run(capsys, "evaluate", "--task", "retrieval", "--knowledge", str(kb), "--data", str(qa),
                       "--max-new-tokens", "8")
    assert_one_line_error(code, err, "--max-new-tokens only applies to --task grounded")
    assert KnowledgeBase.load(kb) is not None
