"""`gptforge serve --moderation`: a request whose input the classifier blocks gets the refusal without running the
model; generated output is screened as it streams, a blocked choice ends with finish_reason "content_filter" and
nothing blocked is ever sent; other choices and requests go on untouched; /metrics counts blocks by side and
label. Real HTTP against uvicorn in a thread, with a classifier whose decision is known (texts containing `x`
are toxic) and a language model that recites a known text (tests/moderation/utils.py)."""

from __future__ import annotations

import concurrent.futures
import io
import re
import sys

import pytest

from gptforge.config import GenerateConfig, ModerationConfig, ServeConfig
from gptforge.errors import ConfigError
from gptforge.generate import generate_ids
from gptforge.moderation import Moderator
from gptforge.serve import create_app
from gptforge.serve.app import load_served_checkpoint
from gptforge.tokenizer import DEFAULT_CHAT_TEMPLATE, encode_chat_prompt
from tests.cli_utils import assert_one_line_error, run
from tests.moderation.utils import CHARS, SCRIPT, save_char_classifier, save_reciting_lm
from tests.serve.serve_utils import client_of, serving, sse

pytestmark = pytest.mark.integration

REFUSAL = "Let us keep it kind."


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("moderated")
    return {"lm": save_reciting_lm(root / "reciter"), "clf": save_char_classifier(root / "clf", CHARS, "x"),
            "root": root}


@pytest.fixture(scope="module")
def served(paths):
    config = ServeConfig(checkpoint=str(paths["lm"]), device="cpu")
    moderator = Moderator.load(ModerationConfig(moderation=str(paths["clf"]), block=["toxic"], threshold=0.5,
                                                moderation_refusal=REFUSAL, moderation_window=24,
                                                moderation_stride=6), "cpu")
    with serving(config, moderator=moderator) as live:
        yield live


@pytest.fixture(scope="module")
def client(served):
    with client_of(served) as c:
        yield c


def reference(served, prompt_ids, max_tokens) -> str:
    """What the model says unscreened (the engine, greedy)."""
    state = served.state
    return generate_ids(state.model, [prompt_ids], GenerateConfig(temperature=0, max_new_tokens=max_tokens),
                        state.tokenizer.eos_id, tokenizer=state.tokenizer)[0][0].text


def chat_ids(served, text):
    return encode_chat_prompt(served.state.tokenizer, [{"role": "user", "content": text}], DEFAULT_CHAT_TEMPLATE)


def streamed(client, path, body) -> tuple[dict, dict, list]:
    """(text by choice, finish_reason by choice, the chunks) of a streamed request."""
    with client.stream("POST", path, json={"model": "reciter", **body, "stream": True}) as r:
        chunks = sse(r)
    texts: dict = {}
    finish: dict = {}
    for chunk in chunks:
        for c in chunk["choices"]:
            piece = c["delta"].get("content", "") if "delta" in c else c["text"]
            texts[c["index"]] = texts.get(c["index"], "") + (piece or "")
            if c["finish_reason"] is not None:
                assert c["index"] not in finish, "one finish_reason per choice"
                finish[c["index"]] = c["finish_reason"]
    return texts, finish, chunks


def metric(client, name: str) -> float:
    text = client.get("/metrics").text
    line = next(l for l in text.splitlines() if l.startswith(name + " "))
    return float(line.split()[-1])


BLOCKS_IN = 'gptforge_moderation_blocks_total{label="toxic",side="input"}'
BLOCKS_OUT = 'gptforge_moderation_blocks_total{label="toxic",side="output"}'


# --------------------------------------------------------------------------------------------------
def test_a_blocked_chat_message_gets_the_refusal_and_the_model_never_runs(client):
    before = {name: metric(client, name) for name in ("gptforge_prompt_tokens_total", "gptforge_generated_tokens_total",
                                                       BLOCKS_IN)}
    r = client.post("/v1/chat/completions", json={"model": "reciter", "messages": [{"role": "user", "content": "you ox"}],
                                                  "max_tokens": 20, "temperature": 0})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": REFUSAL}
    assert choice["finish_reason"] == "content_filter"
    assert choice["moderation"]["side"] == "input" and choice["moderation"]["label"] == "toxic"
    assert r.json()["usage"]["completion_tokens"] == 0
    texts, finish, _ = streamed(client, "/v1/chat/completions", {"messages": [{"role": "user", "content": "you ox"}],
                                                                 "max_tokens": 20, "n": 2})
    assert texts == {0: REFUSAL, 1: REFUSAL} and finish == {0: "content_filter", 1: "content_filter"}
    assert metric(client, "gptforge_prompt_tokens_total") == before["gptforge_prompt_tokens_total"]
    assert metric(client, "gptforge_generated_tokens_total") == before["gptforge_generated_tokens_total"]
    assert metric(client, BLOCKS_IN) == before[BLOCKS_IN] + 2


def test_only_the_new_user_messages_are_read(client):
    # an earlier refused message that the client keeps in its history does not refuse the next turn
    messages = [{"role": "user", "content": "you ox"}, {"role": "assistant", "content": REFUSAL},
                {"role": "user", "content": "sorry"}]
    r = client.post("/v1/chat/completions", json={"model": "reciter", "messages": messages, "max_tokens": 3, "temperature": 0})
    assert r.json()["choices"][0]["finish_reason"] == "length"


def test_completions_refuse_only_the_blocked_prompt(served, client):
    r = client.post("/v1/completions", json={"model": "reciter", "prompt": ["an ox", "ab"], "max_tokens": 8, "temperature": 0,
                                             "echo": True})
    assert r.status_code == 200, r.text
    a, b = r.json()["choices"]
    assert a["text"] == REFUSAL and a["finish_reason"] == "content_filter" and a["moderation"]["side"] == "input"
    assert b["text"] == "ab" + reference(served, served.state.tokenizer.encode("ab"), 8) and b["finish_reason"] == "length"


def test_blocked_output_is_cut_at_the_last_safe_point_streaming_or_not(served, client):
    ids = served.state.tokenizer.encode("ab")
    full = reference(served, ids, 60)
    assert full == SCRIPT[2:62] and "x" in full
    body = {"prompt": "ab", "max_tokens": 60, "temperature": 0}
    before = metric(client, BLOCKS_OUT)
    generated = metric(client, "gptforge_generated_tokens_total")
    r = client.post("/v1/completions", json={"model": "reciter", **body})
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "content_filter"
    assert choice["moderation"]["side"] == "output" and choice["moderation"]["label"] == "toxic"
    text = choice["text"]
    assert "x" not in text and full.startswith(text) and text == "e quick brown "  # up to the word before "fox"
    # usage counts the tokens released (one character each); the metrics count the withheld ones too
    assert r.json()["usage"]["completion_tokens"] == len(text)
    assert metric(client, "gptforge_generated_tokens_total") - generated > len(text)
    texts, finish, chunks = streamed(client, "/v1/completions", body)
    assert texts == {0: text} and finish == {0: "content_filter"}  # nothing blocked was sent, the same cut
    assert chunks[-1]["choices"][0]["moderation"]["side"] == "output"
    chat_full = reference(served, chat_ids(served, "hi"), 60)
    assert "x" in chat_full
    texts, finish, _ = streamed(client, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                                 "max_tokens": 60, "temperature": 0})
    assert "x" not in texts[0] and chat_full.startswith(texts[0]) and finish == {0: "content_filter"}
    assert metric(client, BLOCKS_OUT) == before + 3


def test_a_blocked_sequence_stops_decoding_and_is_not_counted_as_cancelled(client):
    generated = metric(client, "gptforge_generated_tokens_total")
    cancelled = metric(client, "gptforge_cancelled_sequences_total")
    r = client.post("/v1/completions", json={"model": "reciter", "prompt": "ab", "max_tokens": 100, "temperature": 0})
    assert r.json()["choices"][0]["finish_reason"] == "content_filter"
    # the fox is at token 17 of the output; the check that reads it runs a few tokens later, then the row is freed
    assert metric(client, "gptforge_generated_tokens_total") - generated < 40
    assert metric(client, "gptforge_cancelled_sequences_total") == cancelled


def test_allowed_output_is_the_models_own(served, client):
    for prompt, max_tokens in (("ab", 14), ("the quick brown fox jumps", 30)):  # clean continuations
        expected = reference(served, served.state.tokenizer.encode(prompt), max_tokens)
        assert "x" not in expected
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0} if "x" not in prompt else None
        if body is None:
            continue
        r = client.post("/v1/completions", json={"model": "reciter", **body})
        assert r.json()["choices"][0]["text"] == expected and r.json()["choices"][0]["finish_reason"] == "length"
        texts, finish, _ = streamed(client, "/v1/completions", body)
        assert texts == {0: expected} and finish == {0: "length"}


def test_one_choices_block_leaves_the_others_and_other_requests_alone(served, client):
    tok = served.state.tokenizer
    clean_prompt = "the quick brown dog jumps"  # 25 characters: the output starts at SCRIPT[25], clean for 30
    clean = reference(served, tok.encode(clean_prompt), 30)
    assert "x" not in clean
    texts, finish, _ = streamed(client, "/v1/completions", {"prompt": ["ab", clean_prompt], "max_tokens": 30,
                                                            "temperature": 0})
    assert finish == {0: "content_filter", 1: "length"} and texts[1] == clean and "x" not in texts[0]

    def ask(prompt):
        return streamed(client, "/v1/completions", {"prompt": prompt, "max_tokens": 30, "temperature": 0})[:2]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(ask, ["ab", clean_prompt] * 4))
    for i, (texts, finish) in enumerate(results):
        if i % 2:
            assert texts == {0: clean} and finish == {0: "length"}
        else:
            assert "x" not in texts[0] and finish == {0: "content_filter"}


def test_metrics_list_blocks_by_side_and_label(client):
    text = client.get("/metrics").text
    assert re.search(r'^gptforge_moderation_blocks_total\{label="toxic",side="input"\} [1-9]', text, re.M)
    assert re.search(r'^gptforge_moderation_blocks_total\{label="toxic",side="output"\} [1-9]', text, re.M)
    assert re.search(r'^gptforge_moderation_checks_total\{side="output"\} [1-9]', text, re.M)


# --------------------------------------------------------------------------------------------------
def test_moderation_needs_a_generating_model(paths, tmp_path):
    clf = str(paths["clf"])
    config = ServeConfig(checkpoint=clf, device="cpu")
    moderator = Moderator.load(ModerationConfig(moderation=clf, block=["toxic"]), "cpu")
    with pytest.raises(ConfigError, match="--moderation screens generated text"):
        create_app(config, load_served_checkpoint(config), moderator=moderator)


@pytest.mark.parametrize("flags, message", [
    (["--block", "rude"], "--block rude: is not a label of the moderation classifier"),
    (["--block", "toxic", "--threshold", "1.5"], "threshold must be a probability in [0, 1], got 1.5"),
    ([], "--moderation needs --block LABEL[,LABEL]"),
])
def test_serve_flag_errors_are_one_line(paths, capsys, flags, message):
    code, _, err = run(capsys, "serve", "--checkpoint", str(paths["lm"]), "--device", "cpu",
                       "--moderation", str(paths["clf"]), *flags)
    assert_one_line_error(code, err, message)
    if "rude" in flags:
        assert "its labels are ok, toxic" in err


def test_serve_refuses_a_language_model_or_a_missing_checkpoint_as_moderator(paths, capsys):
    lm = str(paths["lm"])
    code, _, err = run(capsys, "serve", "--checkpoint", lm, "--moderation", lm, "--block", "toxic")
    assert_one_line_error(code, err, "is a language model; moderation needs a text classifier")
    code, _, err = run(capsys, "serve", "--checkpoint", lm, "--moderation", str(paths["root"] / "nope"),
                       "--block", "toxic")
    assert_one_line_error(code, err, "does not exist")
    code, _, err = run(capsys, "serve", "--checkpoint", lm, "--block", "toxic")
    assert_one_line_error(code, err, "--block only applies with --moderation")


def test_chat_cli_refuses_and_cuts(paths, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("you ox\nhi\n"))
    code, out, err = run(capsys, "chat", "--checkpoint", str(paths["lm"]), "--device", "cpu", "--temperature", "0",
                         "--max-new-tokens", "60", "--moderation", str(paths["clf"]), "--block", "toxic",
                         "--moderation-refusal", "Not like that.", "--moderation-window", "24",
                         "--moderation-stride", "6")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "Not like that."
    assert lines[1] == "(moderation: the message was not sent to the model: toxic 1.00)"
    assert "x" not in lines[2] and lines[3] == "(moderation: the rest of the reply was withheld: toxic 1.00)"
