"""`gptforge score` and `gptforge evaluate --task choice`: the table and the JSON equal the library's scores,
and every bad input is one `error:` line (exit 2)."""

import json
from pathlib import Path

import pytest

from gptforge.checkpoint import load_pretrained
from gptforge.generate import score
from tests.cli_utils import assert_one_line_error, run, save_tiny_bpe_checkpoint

CONTEXT = "JULIET: O Romeo,"
CANDIDATES = [" Romeo!", " What light", " Romeo!", " KING: Speak"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_tiny_bpe_checkpoint(tmp_path_factory.mktemp("score") / "ckpt")


@pytest.fixture(scope="module")
def expected(checkpoint):
    ckpt = load_pretrained(checkpoint)
    return {n: score(ckpt.model, ckpt.tokenizer, CONTEXT, CANDIDATES, normalize=n) for n in ("none", "byte")}


@pytest.fixture()
def candidates_file(tmp_path) -> Path:
    path = tmp_path / "candidates.txt"
    path.write_text("\n".join(CANDIDATES[:2]) + "\n\n" + "\n".join(CANDIDATES[2:]) + "\n", encoding="utf-8")
    return path


def test_table_is_sorted_by_rank_and_shows_the_library_scores(capsys, checkpoint, candidates_file, expected):
    code, out, err = run(capsys, "score", "--checkpoint", str(checkpoint), "--context", CONTEXT,
                         "--candidates", str(candidates_file))
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].split() == ["rank", "score", "logprob", "mean", "tokens", "text"]
    rows = [line.split(None, 5) for line in lines[1:]]
    assert len(rows) == 4
    want = sorted(expected["none"], key=lambda c: c.rank)
    for row, c in zip(rows, want):
        assert int(row[0]) == c.rank
        assert float(row[2]) == pytest.approx(c.logprob, abs=1e-3)
        assert int(row[4]) == c.tokens
        assert json.loads(row[5]) == c.text
    assert [int(r[0]) for r in rows].count(expected["none"][0].rank) == 2  # the duplicate candidates tie


def test_json_with_jsonl_candidates_byte_normalisation_and_top(capsys, checkpoint, tmp_path, expected):
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(CANDIDATES)))
    code, out, err = run(capsys, "score", "--checkpoint", str(checkpoint), "--context", CONTEXT, "--candidates",
                         str(path), "--normalize", "byte", "--top", "2", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["context"] == CONTEXT and report["normalize"] == "byte"
    got = report["candidates"]
    assert [c["rank"] for c in got] == sorted(c["rank"] for c in got)
    for item in got:
        want = expected["byte"][item["index"]]
        assert item["text"] == CANDIDATES[item["index"]]
        assert item["score"] == pytest.approx(want.logprob / want.bytes, abs=1e-5)
        assert item["rank"] == want.rank
        assert len(item["token_scores"]["top"]) == item["tokens"]
        assert all(len(pairs) == 2 for pairs in item["token_scores"]["top"])


def test_context_file_is_taken_whole(capsys, checkpoint, candidates_file, tmp_path, expected):
    path = tmp_path / "context.txt"
    path.write_text(CONTEXT, encoding="utf-8")
    code, out, err = run(capsys, "score", "--checkpoint", str(checkpoint), "--context-file", str(path),
                         "--candidates", str(candidates_file), "--json")
    assert code == 0, err
    got = {c["index"]: c["logprob"] for c in json.loads(out)["candidates"]}
    assert got == {i: pytest.approx(c.logprob, abs=1e-5) for i, c in enumerate(expected["none"])}


@pytest.mark.parametrize("flags, content, fragment", [
    (["--context", "x"], None, "candidates file"),  # the file does not exist
    (["--context", "x"], "\n  \n", "has no candidates"),
    (["--context", "x"], '{"text": " a"}\n{"txt": " b"}\n', 'line 2 needs a non-empty string "text"'),
    (["--context", "x"], '{"text": " a"}\nplain\n', "line 2 is not valid JSON"),
    (["--context", "x"], " Romeo" * 200 + "\n", "candidate 0 ("),
    (["--context", "x", "--context-file", "y"], " a\n", "not allowed with argument"),
    ([], " a\n", "one of the arguments --context --context-file is required"),
    (["--context-file", "missing.txt"], " a\n", "context file missing.txt does not exist"),
    (["--context", "x", "--normalize", "chars"], " a\n", "invalid choice: 'chars'"),
    (["--context", "x", "--top", "-1"], " a\n", "top_logprobs must be at least 0"),
    (["--context", "x\udcff"], " a\n", "--context holds a lone surrogate"),
])
def test_bad_input_is_one_error_line(capsys, checkpoint, tmp_path, flags, content, fragment):
    path = tmp_path / "c.txt"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    code, out, err = run(capsys, "score", "--checkpoint", str(checkpoint), "--candidates", str(path), *flags)
    assert_one_line_error(code, err, fragment)
    assert out == ""


# --------------------------------------------------------------------------------------------------
def test_evaluate_choice_reports_accuracy_and_writes_json(capsys, checkpoint, tmp_path, expected):
    # The model's own best candidate is the answer of the first question, a worse one of the second.
    best = min(range(len(CANDIDATES)), key=lambda i: (expected["none"][i].rank, i))
    worse = max(range(len(CANDIDATES)), key=lambda i: expected["none"][i].rank)
    data = tmp_path / "mc.jsonl"
    data.write_text(json.dumps({"context": CONTEXT, "choices": CANDIDATES, "answer": best}) + "\n"
                    + json.dumps({"context": CONTEXT, "choices": CANDIDATES, "answer": CANDIDATES[worse]}) + "\n")
    report = tmp_path / "report.json"
    code, out, err = run(capsys, "evaluate", "--task", "choice", "--checkpoint", str(checkpoint), "--data",
                         str(data), "--json", str(report))
    assert code == 0, err
    assert out.splitlines()[0].startswith("acc 0.5000  acc_norm ")
    assert "1/2 right by total log-probability" in out
    result = json.loads(report.read_text())
    assert result["task"] == "choice" and result["metrics"]["acc"] == 0.5
    assert result["report"]["predictions"][0]["predicted"] == best


@pytest.mark.parametrize("flags, content, fragment", [
    (["--checkpoint", "CK"], '{"context": "Q", "choices": [" a"], "answer": 0}\n', "mc.jsonl line 1: 'choices'"),
    (["--checkpoint", "CK"], "", "holds no questions"),
    (["--checkpoint", "CK"], '{"context": "Q", "choices": [" a", " b' + " b" * 200 + '"], "answer": 0}\n',
     "mc.jsonl line 1: candidate 1 ("),
    ([], '{"context": "Q", "choices": [" a", " b"], "answer": 0}\n', "--task choice needs --checkpoint"),
    (["--checkpoint", "CK", "--knowledge", "kb"], "", "--knowledge is for --task retrieval or grounded"),
])
def test_evaluate_choice_bad_input_is_one_error_line(capsys, checkpoint, tmp_path, flags, content, fragment):
    data = tmp_path / "mc.jsonl"
    data.write_text(content)
    flags = [str(checkpoint) if f == "CK" else f for f in flags]
    code, _, err = run(capsys, "evaluate", "--task", "choice", "--data", str(data), *flags)
    assert_one_line_error(code, err, fragment)
