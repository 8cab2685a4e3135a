"""logit_bias and bad_words on /v1/completions and /v1/chat/completions: the engine's effect through the
scheduler's continuous batch (each request its own biases and bans), streamed too, and a 400 naming the field
for every bad value."""

from __future__ import annotations

import concurrent.futures
import json

import pytest

from gptforge.config import GenerateConfig, ServeConfig
from gptforge.generate import generate, generate_ids
from gptforge.tokenizer import DEFAULT_CHAT_TEMPLATE, encode_chat_prompt
from tests.generate.test_controls import save_trained_bpe_checkpoint
from tests.serve.serve_utils import client_of, serving
from tests.serve.test_server import assert_error

pytestmark = pytest.mark.integration

MODEL = "tiny-bpe"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = save_trained_bpe_checkpoint(tmp_path_factory.mktemp("controls") / MODEL)
    config = ServeConfig(checkpoint=str(path), device="cpu", max_batch_size=8)
    with serving(config) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    with client_of(server) as c:
        yield c


def engine(server, prompt: str, **gen):
    state = server.state
    return generate(state.model, state.tokenizer, prompt, GenerateConfig(**gen))[0][0]


def complete(client, **body):
    r = client.post("/v1/completions", json={"model": MODEL, "max_tokens": 24, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def streamed(client, path: str, body: dict) -> str:
    text = []
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                text.append(choice.get("text") or choice.get("delta", {}).get("content") or "")
    return "".join(text)


def boundary_phrase(server, text: str) -> str:
    """A piece of ``text`` (the free greedy output) across two of its tokens: 2 characters of each."""
    tok = server.state.tokenizer
    ids = tok.encode(text)
    for a, b in zip(ids, ids[1:]):
        ta, tb = tok.decode([a]), tok.decode([b])
        if len(ta) >= 2 and len(tb) >= 2:
            return ta[-2:] + tb[:2]
    raise AssertionError(f"no two neighbouring tokens of 2 characters in {text!r}")


def test_logit_bias_bans_and_forces_on_completions(server, client):
    free = complete(client, prompt="the cat")
    first = server.state.tokenizer.encode(free["text"])[0]
    banned = complete(client, prompt="the cat", logit_bias={str(first): -100})
    assert banned["text"] == engine(server, "the cat", max_new_tokens=24, temperature=0,
                                    logit_bias={first: -100}).text
    assert first not in server.state.tokenizer.encode(banned["text"]) and banned["text"] != free["text"]
    forced_id = server.state.tokenizer.encode(" the")[0]
    forced = complete(client, prompt="the cat", logit_bias={str(forced_id): 100}, temperature=1.0, seed=3)
    assert forced["text"] == server.state.tokenizer.decode([forced_id] * 24)
    assert streamed(client, "/v1/completions", {"model": MODEL, "prompt": "the cat", "max_tokens": 24,
                                                "temperature": 0, "logit_bias": {str(first): -100}}) == banned["text"]


def test_bad_words_never_appear_in_completions_streamed_or_not(server, client):
    free = complete(client, prompt="hello")["text"]
    phrase = boundary_phrase(server, free)
    assert phrase in free
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 24, "temperature": 0, "bad_words": [phrase]}
    banned = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    assert phrase not in banned and banned == engine(server, "hello", max_new_tokens=24, temperature=0,
                                                     bad_words=[phrase]).text
    assert streamed(client, "/v1/completions", body) == banned
    # sampled, several choices: none has it
    many = client.post("/v1/completions", json={**body, "temperature": 1.2, "n": 4, "seed": 1}).json()["choices"]
    assert len(many) == 4 and not any(phrase in c["text"] for c in many)


def test_chat_completions_take_both_and_the_openai_client_sends_bad_words_in_extra_body(server):
    import openai

    oc = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    messages = [{"role": "user", "content": "the hat is on"}]
    free = oc.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0)
    text = free.choices[0].message.content
    phrase = boundary_phrase(server, text)
    state = server.state
    ids = encode_chat_prompt(state.tokenizer, messages, DEFAULT_CHAT_TEMPLATE)
    first = state.tokenizer.encode(text)[0]
    got = oc.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0,
                                     logit_bias={str(first): -100}, extra_body={"bad_words": [phrase]})
    ref = generate_ids(state.model, [ids], GenerateConfig(max_new_tokens=24, temperature=0, bad_words=[phrase],
                                                          logit_bias={first: -100}),
                       state.tokenizer.eos_id, tokenizer=state.tokenizer)[0][0]
    assert got.choices[0].message.content == ref.text
    assert phrase not in ref.text and first not in ref.token_ids
    chunks = oc.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0, stream=True,
                                        logit_bias={str(first): -100}, extra_body={"bad_words": [phrase]})
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text


def test_concurrent_requests_keep_their_own_biases_and_bans(server, client):
    """Rows of one continuous batch: each equals the engine alone under its own controls."""
    tok = server.state.tokenizer
    jobs = [("the cat", {}), ("the cat", {"logit_bias": {tok.encode(" the")[0]: 5.0}}),
            ("she held", {"bad_words": ["e", "o"]}), ("she held", {"logit_bias": {tok.encode(" the")[0]: -100},
                                                               "bad_words": ["at "]}), ("hello", {})]

    def ask(job):
        prompt, controls = job
        body = {"prompt": prompt, **controls}
        if "logit_bias" in controls:
            body["logit_bias"] = {str(k): v for k, v in controls["logit_bias"].items()}
        return complete(client, **body)["text"]

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(ask, jobs * 2))
    for (prompt, controls), answer in zip(jobs * 2, answers):
        assert answer == engine(server, prompt, max_new_tokens=24, temperature=0, **controls).text
        assert not any(p in answer for p in controls.get("bad_words", []))


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("extra, param, message", [
    ({"logit_bias": {"5": 101}}, "logit_bias", "logit_bias[5] must be a number in [-100, 100], got 101"),
    ({"logit_bias": {"5": float("-inf")}}, "logit_bias", "in [-100, 100]"),
    ({"logit_bias": {"x": 1}}, "logit_bias", "logit_bias keys must be token ids"),
    ({"logit_bias": {"-3": 1}}, "logit_bias", "logit_bias keys must be token ids"),
    ({"logit_bias": {"5": "1"}}, "logit_bias", "valid number"),
    ({"logit_bias": [5]}, "logit_bias", "valid dictionary"),
    ({"logit_bias": {"999999": 1}}, "logit_bias", "logit_bias has token id 999999, outside the model's vocabulary"),
    ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias", "at most 300 entries"),
    ({"bad_words": "the"}, "bad_words", "valid list"),
    ({"bad_words": [""]}, "bad_words", "bad_words[0] is empty"),
    ({"bad_words": [3]}, "bad_words", "valid string"),
    ({"bad_words": ["x"] * 65}, "bad_words", "at most 64 phrases"),
    ({"bad_words": ["x" * 201]}, "bad_words", "at most 200 characters"),
])
def test_bad_values_are_one_400_naming_the_field(client, route, extra, param, message):
    body = {"model": MODEL, "max_tokens": 4, **extra}
    body.update({"prompt": "the cat"} if route == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]})
    r = client.post(route, content=json.dumps(body, allow_nan=True), headers={"Content-Type": "application/json"})
    assert_error(r, 400, param, message=message)


def test_an_empty_logit_bias_and_no_bad_words_change_nothing(client):
    plain = complete(client, prompt="she held")
    assert complete(client, prompt="she held", logit_bias={}, bad_words=[]) == plain
