"""`gptforge index` (build, --add, --query) and `gptforge evaluate --task retrieval` through the CLI."""

import json

import pytest

from gptforge.errors import KnowledgeError
from gptforge.knowledge.index import KnowledgeBase
from gptforge.tokenizer import CharTokenizer, load_tokenizer
from tests.cli_utils import assert_one_line_error, run, save_tiny_bpe_checkpoint
from tests.model_utils import save_tiny_checkpoint

DOCS = {
    "returns.md": "# Returns\n\nReturn any item within 30 days.\n\n## Refunds\n\nRefunds reach your card in 5 days.",
    "shipping.md": "# Shipping\n\nStandard shipping takes 3 days; express arrives tomorrow.",
}


@pytest.fixture
def docs(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for name, text in DOCS.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


@pytest.fixture
def kb(docs, tmp_path, capsys):
    code, out, err = run(capsys, "index", "--docs", str(docs), "--out", str(tmp_path / "kb"))
    assert code == 0, err
    assert "3 passages from 2 documents" in out and "estimated from the words" in out
    assert "read 2 documents" in err and "indexed 3 passages" in err
    return tmp_path / "kb"


def test_query_prints_the_top_passages_with_scores(kb, capsys):
    code, out, err = run(capsys, "index", "--query", "when does my refund arrive", str(kb), "-k", "2")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("1. returns.md#2  score ") and lines[0].endswith("Returns > Refunds")
    assert lines[1] == "   Refunds reach your card in 5 days."
    assert sum(line[0].isdigit() for line in lines) <= 2


def test_query_json(kb, capsys):
    code, out, _ = run(capsys, "index", "--query", "express shipping", str(kb), "--json")
    assert code == 0
    record = json.loads(out)
    assert record["query"] == "express shipping"
    assert record["hits"][0]["id"] == "shipping.md#1"
    assert set(record["hits"][0]) == {"id", "title", "score", "passage"}


def test_query_without_matches(kb, capsys):
    code, out, _ = run(capsys, "index", "--query", "zebra", str(kb))
    assert code == 0 and "shares a word" in out


def test_add_through_the_cli(kb, tmp_path, capsys):
    more = tmp_path / "more.jsonl"
    more.write_text(json.dumps({"question": "Do gift cards expire?", "answer": "Never."}) + "\n", encoding="utf-8")
    code, out, err = run(capsys, "index", "--docs", str(more), "--out", str(kb), "--add")
    assert code == 0, err
    assert "added 1 passage from 1 document" in out and "it holds 4 passages from 3 documents" in out
    code, out, _ = run(capsys, "index", "--query", "gift card", str(kb), "--json")
    assert json.loads(out)["hits"][0]["id"] == "do-gift-cards-expire#1"


def test_the_checkpoint_tokenizer_counts_and_a_model_of_another_tokenizer_is_refused(docs, tmp_path, capsys):
    ckpt = save_tiny_bpe_checkpoint(tmp_path / "ckpt")
    code, out, err = run(capsys, "index", "--docs", str(docs), "--out", str(tmp_path / "kb"), "--checkpoint",
                         str(ckpt), "--max-passage-tokens", "12", "--overlap-tokens", "2")
    assert code == 0, err
    assert "counted by the bpe tokenizer" in out
    kb = KnowledgeBase.load(tmp_path / "kb")
    tok = load_tokenizer(ckpt)
    kb.check_tokenizer(tok)
    assert all(len(tok.encode(p.text)) <= 12 for p in kb.passages)
    with pytest.raises(KnowledgeError, match="another tokenizer"):
        kb.check_tokenizer(CharTokenizer(list("abc")))
    # --add with another model's tokenizer is one error, and leaves the folder as it was
    other = save_tiny_checkpoint(tmp_path / "other", "abcdefghijklmnopqrstuvwxyz ", block_size=16, n_layer=1,
                                 n_embd=8)
    before = (tmp_path / "kb" / "passages.jsonl").read_bytes()
    code, _, err = run(capsys, "index", "--docs", str(docs), "--out", str(tmp_path / "kb"), "--add",
                       "--checkpoint", str(other))
    assert_one_line_error(code, err, "another tokenizer")
    assert (tmp_path / "kb" / "passages.jsonl").read_bytes() == before


@pytest.mark.parametrize("argv,fragment", [
    (["index"], "give --docs PATH --out KB"),
    (["index", "--docs", "DOCS"], "--docs needs --out KB"),
    (["index", "--docs", "DOCS", "--out", "A", "B"], "two knowledge base folders"),
    (["index", "--docs", "DOCS", "--out", "OUT", "-k", "3"], "-k and --json are for --query"),
    (["index", "--query", "x"], "--query needs the knowledge base folder"),
    (["index", "--query", "x", "KB", "--docs", "DOCS"], "--docs is for building one"),
    (["index", "--query", "x", "KB", "--stemmer", "none"], "--stemmer is for building one"),
    (["index", "--query", "x", "MISSING"], "does not exist; build it with gptforge index"),
    (["index", "--docs", "EMPTY", "--out", "OUT"], "holds no .md, .markdown or .txt files"),
    (["index", "--docs", "DOCS", "--out", "OUT", "--max-passage-tokens", "4"], "at least 8"),
    (["index", "--docs", "DOCS", "--out", "OUT", "--overlap-tokens", "80"], "between 0 and half"),
    (["index", "--docs", "DOCS", "--out", "MISSING", "--add"], "does not exist"),
    (["index", "--docs", "DOCS", "--out", "DOCS"], "is not a knowledge base"),
    (["index", "--docs", "DOCS", "--out", "OUT", "--checkpoint", "MISSING"], "does not exist"),
    (["index", "--docs", "DOCS", "--out", "OUT", "--stopwords", "fr"], "invalid choice"),
    (["evaluate", "--task", "retrieval", "--data", "QA"], "needs --knowledge KB"),
    (["evaluate", "--task", "retrieval", "--knowledge", "KB", "--data", "QA", "--checkpoint", "C"],
     "drop --checkpoint"),
    (["evaluate", "--task", "lm", "--knowledge", "KB", "--data", "QA", "--checkpoint", "C"],
     "--knowledge is for --task retrieval"),
    (["evaluate", "--data", "QA"], "--checkpoint is required"),
    (["evaluate", "--task", "retrieval", "--knowledge", "MISSING", "--data", "QA"], "does not exist"),
    (["evaluate", "--task", "retrieval", "--knowledge", "KB", "--data", "BADQA"], "passage 'nope#1' is not in"),
])
def test_bad_input_is_one_clear_error(kb, docs, tmp_path, capsys, argv, fragment):
    (tmp_path / "empty").mkdir()
    (tmp_path / "qa.jsonl").write_text('{"question": "q", "passage_id": "returns.md#1"}\n', encoding="utf-8")
    (tmp_path / "bad.jsonl").write_text('{"question": "q", "passage_id": "nope#1"}\n', encoding="utf-8")
    names = {"DOCS": docs, "KB": kb, "OUT": tmp_path / "out", "EMPTY": tmp_path / "empty", "QA": tmp_path / "qa.jsonl",
             "BADQA": tmp_path / "bad.jsonl", "MISSING": tmp_path / "missing", "A": tmp_path / "a",
             "B": tmp_path / "b", "C": tmp_path / "c"}
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = run(capsys, *[str(names.get(a, a)) for a in argv])
    assert_one_line_error(code, err, fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_evaluate_retrieval_prints_and_writes_json(kb, tmp_path, capsys):
    qa = tmp_path / "qa.jsonl"
    qa.write_text("\n".join(json.dumps(x) for x in [
        {"question": "How long do refunds take to reach my card?", "passage_id": "returns.md#2"},
        {"question": "express shipping", "doc_id": "shipping.md"},
        {"question": "zebra", "passage_id": "returns.md#1"},
    ]) + "\n", encoding="utf-8")
    code, out, err = run(capsys, "evaluate", "--task", "retrieval", "--knowledge", str(kb), "--data", str(qa),
                         "--json", str(tmp_path / "report.json"))
    assert code == 0, err
    assert out.splitlines()[0] == "recall@1 0.6667  recall@5 0.6667  recall@10 0.6667  mrr 0.6667"
    assert "3 questions; answer not ranked first: 1" in out and "'zebra': expected returns.md#1" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["task"] == "retrieval" and report["report"]["ranks"] == [1, 1, None]
