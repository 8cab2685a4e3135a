"""The support-bot example's data files: they parse, and the held-out questions are fair ones.

Fair: every held-out question names a document that exists (in the documents indexed before fine-tuning,
or in those added after it), its answer is written in that document (a grounded model can copy it), and no
held-out question appears verbatim among the FAQ questions the models are fine-tuned on.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from gptforge.data.finetune import load_lm_examples
from gptforge.evaluate.grounded import load_grounded_examples, normalize_answer

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "support-bot"
DOCS, ADDED = EXAMPLE / "docs", EXAMPLE / "docs-added"


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _docs(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.md"))}


def test_the_documents_are_markdown_with_a_title_and_sections():
    docs, added = _docs(DOCS), _docs(ADDED)
    assert len(docs) >= 24 and len(added) >= 10
    assert not set(docs) & set(added), "an added document must be new, not a changed one"
    for name, text in {**docs, **added}.items():
        lines = text.splitlines()
        assert lines[0].startswith("# "), name
        assert any(line.startswith("## ") for line in lines), name


@pytest.mark.parametrize("name, folder", [("qa.jsonl", DOCS), ("qa-added.jsonl", ADDED)])
def test_every_held_out_question_names_a_document_that_holds_its_answer(name, folder):
    docs = _docs(folder)
    examples = load_grounded_examples(EXAMPLE / name)
    assert len(examples) >= (60 if name == "qa.jsonl" else 40)
    for ex in examples:
        assert ex.doc_id in docs, f"{ex.question!r} names {ex.doc_id}, which is not in {folder.name}/"
        # Each section of these short documents is one passage: DOC#N is the N-th "## " section.
        doc, _, n = ex.passage_id.rpartition("#")
        assert doc == ex.doc_id
        sections = docs[doc].split("\n## ")[1:]
        assert 1 <= int(n) <= len(sections), ex
        text = normalize_answer(sections[int(n) - 1])
        assert any(re.search(rf"\b{re.escape(normalize_answer(a))}\b", text) for a in ex.answers), ex


def test_no_held_out_question_is_an_faq_question():
    faq = _jsonl(EXAMPLE / "faq.jsonl")
    asked = {normalize_answer(r["question"]) for r in faq}
    for name in ("qa.jsonl", "qa-added.jsonl"):
        for ex in load_grounded_examples(EXAMPLE / name):
            assert normalize_answer(ex.question) not in asked, f"{name}: {ex.question!r} is in faq.jsonl"


def test_faq_answers_are_in_the_documents_and_the_training_files_are_the_faq():
    faq = _jsonl(EXAMPLE / "faq.jsonl")
    corpus = normalize_answer("\n".join(_docs(DOCS).values()))
    for row in faq:
        assert set(row) == {"question", "answer"}
        assert normalize_answer(row["answer"]) in corpus, row
    pairs = [(r["question"], r["answer"]) for r in faq]
    memorise = load_lm_examples(EXAMPLE / "train-memorise.jsonl")
    assert [(ex.messages[0]["content"], ex.messages[1]["content"]) for ex in memorise] == pairs


def _make_training():
    spec = importlib.util.spec_from_file_location("make_training", EXAMPLE / "make_training.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_grounded_training_file_is_what_make_training_writes():
    rows = _make_training().make_examples()
    expected = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    assert (EXAMPLE / "train-grounded.jsonl").read_text(encoding="utf-8") == expected, \
        "train-grounded.jsonl is stale: run python3 examples/support-bot/make_training.py"


def test_grounded_training_teaches_copying_and_never_the_added_documents_answers():
    faq = _jsonl(EXAMPLE / "faq.jsonl")
    pairs = [(r["question"], r["answer"]) for r in faq]
    passages = {}
    for name, text in _docs(DOCS).items():
        title = text.splitlines()[0][2:]
        for section in text.split("\n## ")[1:]:
            heading, _, body = section.partition("\n")
            passages[f"{title} > {heading.strip()}"] = body.strip()
    grounded = load_lm_examples(EXAMPLE / "train-grounded.jsonl")
    # First the FAQ, each question with the passage that answers it.
    faithful = grounded[:len(pairs)]
    assert [(ex.messages[0]["content"], ex.messages[1]["content"]) for ex in faithful] == pairs
    for ex in faithful:
        title, _, text = ex.context[0].partition("\n")
        assert passages[title] == text, ex
    # Every example has one passage, and its target is a span of that passage, to be copied from there.
    changed, answers = 0, set()
    for ex in grounded:
        (passage,) = ex.context
        title, _, text = passage.partition("\n")
        question, answer = ex.messages[0]["content"], ex.messages[1]["content"]
        assert answer in text, ex
        answers.add(answer)
        if question in dict(pairs) and answer != dict(pairs)[question]:
            # a changed copy: the FAQ passage with only the answer replaced
            changed += 1
            assert passages[title].replace(dict(pairs)[question], answer) == text, ex
    assert changed >= 5 * len(pairs)
    assert len(answers) >= 1000, "the targets must be many different spans, not a few memorisable ones"
    # No leakage: no answer of the questions on documents added after fine-tuning is ever a target, and
    # no added passage is ever a training passage.
    added = {normalize_answer(a) for ex in load_grounded_examples(EXAMPLE / "qa-added.jsonl") for a in ex.answers}
    leaked = {a for a in answers if normalize_answer(a) in added}
    assert not leaked, f"answers of qa-added.jsonl among the training targets: {sorted(leaked)}"
    added_text = {section.partition("\n")[2].strip() for text in _docs(ADDED).values()
                  for section in text.split("\n## ")[1:]}
    assert not added_text & {ex.context[0].partition("\n")[2] for ex in grounded}
