"""`--logit-bias`, `--ban` and `--ban-file` on `gptforge generate` and `gptforge chat`: the engine's effect,
and one `error:` line for every bad value (a bad file, bad JSON, an id outside the vocabulary)."""

import io
import json
import sys
from pathlib import Path

import pytest

from gptforge.checkpoint import load_checkpoint
from gptforge.config import GenerateConfig
from gptforge.generate import generate
from tests.cli_utils import assert_one_line_error, run
from tests.generate.test_controls import save_trained_bpe_checkpoint

GREEDY = ["--temperature", "0", "--max-new-tokens", "30", "--ignore-eos", "--device", "cpu"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_trained_bpe_checkpoint(tmp_path_factory.mktemp("controls") / "ckpt")


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return load_checkpoint(checkpoint)


def engine_text(loaded, prompt: str, **gen) -> str:
    config = GenerateConfig(temperature=0, max_new_tokens=30, ignore_eos=True, **gen)
    return generate(loaded.model, loaded.tokenizer, prompt, config)[0][0].text


def generated(capsys, checkpoint, *flags) -> str:
    code, out, err = run(capsys, "generate", "--checkpoint", str(checkpoint), "--prompt", "the cat", *GREEDY, *flags)
    assert code == 0, err
    assert out.startswith("the cat") and out.endswith("\n")
    return out[len("the cat"):-1]


def test_generate_logit_bias_as_json_or_pairs(capsys, checkpoint, loaded):
    free = generated(capsys, checkpoint)
    first = loaded.tokenizer.encode(free)[0]
    want = engine_text(loaded, "the cat", logit_bias={first: -100, 5: 2.0})
    assert want != free
    assert generated(capsys, checkpoint, "--logit-bias", json.dumps({str(first): -100, "5": 2})) == want
    assert generated(capsys, checkpoint, "--logit-bias", f"{first}:-100,5:2") == want


def test_generate_ban_and_ban_file_add_up(capsys, checkpoint, loaded, tmp_path):
    free = generated(capsys, checkpoint)
    a, b = free[3:6], free[10:12]
    assert a in free and b in free
    want = engine_text(loaded, "the cat", bad_words=[a, b])
    assert a not in want and b not in want
    assert generated(capsys, checkpoint, "--ban", a, "--ban", b) == want
    phrases = tmp_path / "banned.txt"
    phrases.write_text(f"{a}\n\n{b}\n", encoding="utf-8")
    assert generated(capsys, checkpoint, "--ban-file", str(phrases)) == want
    phrases.write_text(f"{b}\n", encoding="utf-8")
    assert generated(capsys, checkpoint, "--ban", a, "--ban-file", str(phrases)) == want
    code, out, err = run(capsys, "generate", "--checkpoint", str(checkpoint), "--prompt", "the cat", *GREEDY,
                         "--ban", a, "--ban", b, "--json", "--num-beams", "2")
    assert code == 0, err
    assert all(a not in c["text"] and b not in c["text"] for c in json.loads(out)["completions"])


@pytest.mark.parametrize("flags, fragment", [
    (["--logit-bias", "{5: 1}"], "logit_bias is not valid JSON"),
    (["--logit-bias", "5=1"], "logit_bias must be a JSON object or ID:BIAS,ID:BIAS"),
    (["--logit-bias", "5:200"], "logit_bias[5] must be a number in [-100, 100], got 200.0"),
    (["--logit-bias", "abc:1"], "logit_bias keys must be token ids"),
    (["--logit-bias", "99999:1"], "logit_bias has token id 99999, outside the model's vocabulary of"),
    (["--ban", ""], "bad_words[0] is empty"),
    (["--ban-file", "missing-bans.txt"], "--ban-file missing-bans.txt does not exist"),
    (["--logit-bias", "5:1", "--draft-checkpoint", "CKPT"], "drop: logit_bias"),
    (["--ban", "x", "--draft-checkpoint", "CKPT"], "drop: bad_words"),
])
def test_bad_generate_controls_are_one_error_line(capsys, checkpoint, flags, fragment):
    flags = [str(checkpoint) if f == "CKPT" else f for f in flags]
    code, out, err = run(capsys, "generate", "--checkpoint", str(checkpoint), "--prompt", "the cat", *flags)
    assert out == ""
    assert_one_line_error(code, err, fragment)


def test_a_ban_file_that_is_not_utf8_is_one_error_line(capsys, checkpoint, tmp_path):
    bad = tmp_path / "bans.txt"
    bad.write_bytes(b"ok\nb\xe9d\n")
    code, out, err = run(capsys, "generate", "--checkpoint", str(checkpoint), "--ban-file", str(bad))
    assert out == ""
    assert_one_line_error(code, err, f"--ban-file {bad} is not UTF-8: byte 0xe9 on line 2")


def chat(capsys, monkeypatch, checkpoint, lines: str, *flags):
    from gptforge.cli import main

    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    code = main(["chat", "--checkpoint", str(checkpoint), "--temperature", "0", "--max-new-tokens", "24",
                 "--device", "cpu", *flags])
    out, err = capsys.readouterr()
    return code, out, err


def test_chat_takes_the_same_controls(capsys, monkeypatch, checkpoint, tmp_path):
    code, free, err = chat(capsys, monkeypatch, checkpoint, "hello\n")
    assert code == 0, err
    reply = free.strip()
    phrase = reply[2:5]
    assert len(phrase) == 3
    bans = tmp_path / "bans.txt"
    bans.write_text(phrase + "\n", encoding="utf-8")
    code, out, err = chat(capsys, monkeypatch, checkpoint, "hello\n", "--ban-file", str(bans))
    assert code == 0, err
    assert phrase not in out and out.strip() != reply
    code, out2, err = chat(capsys, monkeypatch, checkpoint, "hello\n", "--ban", phrase)
    assert code == 0 and out2 == out
    code, out, err = chat(capsys, monkeypatch, checkpoint, "hello\n", "--logit-bias", "99999:1")
    assert_one_line_error(code, err, "logit_bias has token id 99999")
    assert out == ""
    code, out, err = chat(capsys, monkeypatch, checkpoint, "hello\n", "--logit-bias", "[1]")
    assert_one_line_error(code, err, "logit_bias must be a JSON object")
