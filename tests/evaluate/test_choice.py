"""Multiple-choice accuracy: acc and acc_norm equal what the slow full forward makes them, and every bad row
is one error naming its line."""

import json
import re

import pytest
import torch

from gptforge.config import ModelConfig
from gptforge.errors import DataError
from gptforge.evaluate.choice import ChoiceExample, evaluate_choice, read_choice_data
from gptforge.generate import encode_pair
from gptforge.model import GPT
from gptforge.tokenizer import BPETokenizer

QUESTIONS = [
    ("The cat sat on the", [" mat.", " log.", " house"]),
    ("A bird flew over the", [" house", " dog sat on the mat.", " end"]),
    ("The dog sat on", [" the log.", " a cat", " the"]),
    ("The end", [".", " of the house.", " bird"]),
    ("On the mat the", [" cat sat.", " dog", " bird flew over the log."]),
    ("", [" The cat", " A bird flew", " The end."]),
]


@pytest.fixture(scope="module")
def tok():
    text = ["The cat sat on the mat. The dog sat on the log.\n", "A bird flew over the house; the end.\n"] * 30
    return BPETokenizer.train(iter(text), vocab_size=300)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(3)
    return GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32)).eval()


def slow_total(model, tok, context, choice):
    ctx, ids = encode_pair(tok, context, choice)
    with torch.no_grad():
        logp = model(torch.tensor([ctx + ids])).log_softmax(-1)[0]
    return sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(ids))


def argmax(values):
    return max(range(len(values)), key=lambda i: (values[i], -i))


def test_accuracy_and_acc_norm_equal_the_slow_way(model, tok):
    examples, right, right_norm = [], 0, 0
    for n, (context, choices) in enumerate(QUESTIONS):
        totals = [slow_total(model, tok, context, c) for c in choices]
        per_byte = [t / len(c.encode()) for t, c in zip(totals, choices)]
        best, best_norm = argmax(totals), argmax(per_byte)
        margin = sorted(totals)[-1] - sorted(totals)[-2]
        assert margin > 1e-4  # no near-tie the tolerance could flip
        # Half the questions name the model's own choice as the answer, half another one.
        answer = best if n % 2 == 0 else (best + 1) % len(choices)
        right += answer == best
        right_norm += answer == best_norm
        examples.append(ChoiceExample(context, tuple(choices), answer, n + 1))
    result = evaluate_choice(model, tok, examples)
    assert result["metrics"]["acc"] == pytest.approx(right / len(QUESTIONS)) == 0.5
    assert result["metrics"]["acc_norm"] == pytest.approx(right_norm / len(QUESTIONS))
    report = result["report"]
    assert report["examples"] == 6 and report["correct"] == 3 and report["choices"] == 18
    assert [p["answer"] for p in report["predictions"]] == [ex.answer for ex in examples]
    first = report["predictions"][0]
    assert first["logprobs"] == pytest.approx([slow_total(model, tok, QUESTIONS[0][0], c) for c in QUESTIONS[0][1]],
                                              abs=1e-5)


def test_read_choice_data_takes_an_index_or_the_choice_text(tmp_path):
    path = tmp_path / "mc.jsonl"
    path.write_text(json.dumps({"context": "Q?", "choices": [" a", " b"], "answer": 1}) + "\n\n"
                    + json.dumps({"context": "", "choices": [" a", " b", " c"], "answer": " c"}) + "\n")
    got = read_choice_data(path)
    assert [(ex.answer, ex.line) for ex in got] == [(1, 1), (2, 3)]


@pytest.mark.parametrize("row, message", [
    ({"choices": [" a", " b"], "answer": 0}, "line 2 has no 'context'"),
    ({"context": "Q", "choices": [" a"], "answer": 0}, "line 2: 'choices' must be a list of at least two strings"),
    ({"context": "Q", "choices": " a b", "answer": 0}, "line 2: 'choices' must be a list"),
    ({"context": "Q", "choices": [" a", ""], "answer": 0}, "line 2: choice 1 must be a non-empty string"),
    ({"context": "Q", "choices": [" a", 7], "answer": 0}, "line 2: choice 1 must be a non-empty string"),
    ({"context": "Q", "choices": [" a", " b"], "answer": 2}, "line 2: 'answer' 2 is not a choice's index (0 to 1)"),
    ({"context": "Q", "choices": [" a", " b"], "answer": -1}, "'answer' -1 is not a choice's index"),
    ({"context": "Q", "choices": [" a", " b"], "answer": True}, "line 2: 'answer' must be the right choice's index"),
    ({"context": "Q", "choices": [" a", " b"]}, "'answer' must be the right choice's index"),
    ({"context": "Q", "choices": [" a", " b"], "answer": " c"}, "'answer' ' c' is not one of the choices"),
    ({"context": "Q", "choices": [" a", " a"], "answer": " a"}, "'answer' ' a' is choice 0 and 1; give its index"),
    ({"context": "Q\udcff", "choices": [" a", " b"], "answer": 0}, "line 2: the context holds a lone surrogate"),
])
def test_bad_rows_are_one_error_naming_the_line(tmp_path, row, message):
    path = tmp_path / "mc.jsonl"
    good = json.dumps({"context": "Q", "choices": [" a", " b"], "answer": 0})
    path.write_text(good + "\n" + json.dumps(row) + "\n", encoding="utf-8", errors="surrogatepass")
    with pytest.raises(DataError, match=re.escape(message)):
        read_choice_data(path)


@pytest.mark.parametrize("text, message", [
    ("", "holds no questions"),
    ("[1, 2]\n", "line 1 must be a JSON object"),
    ("{\"context\": \n", "line 1 is not valid JSON"),
])
def test_empty_or_broken_files_are_refused(tmp_path, text, message):
    path = tmp_path / "mc.jsonl"
    path.write_text(text)
    with pytest.raises(DataError, match=message):
        read_choice_data(path)
    with pytest.raises(DataError, match="does not exist"):
        read_choice_data(tmp_path / "missing.jsonl")


def test_a_choice_too_long_for_the_context_names_its_line(model, tok):
    examples = [ChoiceExample("The cat", (" sat", " on"), 0, 1), ChoiceExample("The cat", (" sat", " mat." * 40), 0, 7)]
    with pytest.raises(DataError, match=r"mc.jsonl line 7: candidate 1 \(.*\) after the context"):
        evaluate_choice(model, tok, examples, where="data file mc.jsonl")
