"""Scoring over HTTP: ``POST /v1/score`` and OpenAI's legacy scoring form on ``/v1/completions`` (``echo`` +
``logprobs``, ``max_tokens`` 0 or more), on the live test server of test_server.py."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import torch

from gptforge.config import GenerateConfig
from gptforge.generate import generate_ids
from gptforge.generate.score import encode_pair, prompt_logprobs, score
from gptforge.model import GPT
from gptforge.serve.scoring import MAX_SCORE_CANDIDATES
from tests.serve.test_server import (assert_error, bpe_server, classifier_server, client, lm_checkpoint, server,
                                     strict_json)

pytestmark = pytest.mark.integration
__all__ = ["bpe_server", "client", "lm_checkpoint", "server"]  # the fixtures, imported for this module's tests

FIXTURES = Path(__file__).parent / "fixtures"


def slow_logprobs(model: GPT, ids: list[int]) -> list[float]:
    """log p(ids[i] | ids[:i]) for i >= 1, from one plain forward over the whole sequence (no cache)."""
    with torch.inference_mode():
        logp = model(torch.tensor([ids]))[0].float().log_softmax(-1)  # (T, V)
    return [logp[i - 1, ids[i]].item() for i in range(1, len(ids))]


# --------------------------------------------------------------------------------------------------
# POST /v1/score
def test_score_equals_the_library_and_ranks(server, client):
    state = server.state
    context, candidates = "the cat sat on the ", ["mat", "dog", "mat", "a long tail"]
    r = client.post("/v1/score", json={"model": "tiny-lm", "context": context, "candidates": candidates})
    assert r.status_code == 200, r.text
    body = strict_json(r.text)
    assert body["object"] == "score" and body["model"] == "tiny-lm"
    ref = score(state.model, state.tokenizer, context, candidates)
    assert [d["index"] for d in body["data"]] == [0, 1, 2, 3]
    for d, x in zip(body["data"], ref):
        assert set(d) == {"index", "object", "text", "logprob", "mean_logprob", "tokens", "bytes", "score", "rank"}
        assert d["text"] == x.text and d["tokens"] == x.tokens and d["bytes"] == x.bytes and d["rank"] == x.rank
        assert d["logprob"] == pytest.approx(x.logprob, abs=1e-5)
        assert d["mean_logprob"] == pytest.approx(x.logprob / x.tokens, abs=1e-5)
        assert d["score"] == d["logprob"]  # normalize "none"
    # ranks: 1 is the best; the two equal candidates share one rank
    data = body["data"]
    assert data[0]["logprob"] == data[2]["logprob"] and data[0]["rank"] == data[2]["rank"]
    order = sorted(range(4), key=lambda i: -data[i]["score"])
    assert data[order[0]]["rank"] == 1
    assert all(data[i]["rank"] == 1 + sum(d["score"] > data[i]["score"] for d in data) for i in range(4))
    # the total is the model's own per-token log-probabilities, the slow way (the trailing space moves to the
    # candidate, as lm-eval tokenizes)
    ids = state.tokenizer.encode(context.rstrip() + " dog")
    n_ctx = len(state.tokenizer.encode(context.rstrip()))
    assert data[1]["logprob"] == pytest.approx(sum(slow_logprobs(state.model, ids)[n_ctx - 1:]), abs=1e-5)
    assert body["usage"]["prompt_tokens"] == n_ctx + sum(x.tokens for x in ref) == body["usage"]["total_tokens"]


def test_score_normalize_and_top_logprobs(server, client):
    state = server.state
    context, candidates = "abc", ["d", "de fgh"]
    by = {}
    for normalize in ("none", "token", "byte"):
        by[normalize] = client.post("/v1/score", json={"context": context, "candidates": candidates,
                                                       "normalize": normalize}).json()["data"]
    for i in range(2):
        none, token, byte = by["none"][i], by["token"][i], by["byte"][i]
        assert none["logprob"] == token["logprob"] == byte["logprob"]
        assert token["score"] == pytest.approx(none["logprob"] / none["tokens"])
        assert byte["score"] == pytest.approx(none["logprob"] / none["bytes"])
    r = client.post("/v1/score", json={"context": context, "candidates": candidates, "top_logprobs": 3}).json()
    ref = score(state.model, state.tokenizer, context, candidates, top_logprobs=3)
    for d, x in zip(r["data"], ref):
        lp = d["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == d["tokens"]
        assert lp["token_logprobs"] == pytest.approx(x.token_scores.logprobs, abs=1e-6)
        assert "".join(lp["tokens"]) == d["text"] and lp["text_offset"] == list(range(d["tokens"]))
        for value, top in zip(lp["token_logprobs"], lp["top_logprobs"]):
            assert 1 <= len(top) <= 3 and max(top.values()) >= value - 1e-6
    zero = client.post("/v1/score", json={"context": context, "candidates": ["d"], "top_logprobs": 0}).json()
    assert zero["data"][0]["logprobs"]["top_logprobs"] == [None]
    assert "logprobs" not in by["none"][0]


def test_score_empty_context_starts_from_end_of_text(server, client):
    state = server.state
    r = client.post("/v1/score", json={"context": "", "candidates": ["ab"]}).json()
    eos = state.tokenizer.eos_id
    ids = [eos] + state.tokenizer.encode("ab")
    assert r["data"][0]["logprob"] == pytest.approx(sum(slow_logprobs(state.model, ids)), abs=1e-5)


@pytest.mark.parametrize("body, param, code, message", [
    ({"context": "a"}, "candidates", None, "Field required"),
    ({"candidates": ["a"]}, "context", None, "Field required"),
    ({"context": "a", "candidates": []}, "candidates", None, "at least 1"),
    ({"context": "a", "candidates": "b"}, "candidates", None, "valid list"),
    ({"context": "a", "candidates": ["b", 3]}, "candidates", None, "valid string"),
    ({"context": 5, "candidates": ["b"]}, "context", None, "valid string"),
    ({"context": "a", "candidates": ["b", ""]}, "candidates", None, "candidate 1"),
    ({"context": "a", "candidates": ["b"], "normalize": "chars"}, "normalize", None, "'none', 'token' or 'byte'"),
    ({"context": "a", "candidates": ["b"], "top_logprobs": 21}, "top_logprobs", None, "at most 20"),
    ({"context": "a", "candidates": ["b"], "top_logprobs": -1}, "top_logprobs", None, ">= 0"),
    ({"context": "a", "candidates": ["b"], "top_logprobs": 1.5}, "top_logprobs", None, "valid integer"),
    ({"context": "a", "candidates": ["b"], "model": "other"}, "model", "model_not_found", "does not exist"),
    ({"context": "a", "candidates": ["b"], "extra": 1}, "extra", None, "Extra inputs"),
    ({"context": "a" * 129, "candidates": ["b"]}, "context", "context_length_exceeded", "context alone"),
    ({"context": "a" * 100, "candidates": ["b", "c" * 30]}, "candidates", "context_length_exceeded", "candidate 1"),
    ({"context": "a", "candidates": ["b"] * (MAX_SCORE_CANDIDATES + 1)}, "candidates", None, "at most 256"),
])
def test_score_errors(client, body, param, code, message):
    assert_error(client.post("/v1/score", json=body), 400, param, code=code, message=message)


def test_score_limits_auth_and_size(server, client):
    # the context and a candidate may fill the context exactly (the last token is predicted, never fed)
    r = client.post("/v1/score", json={"context": "a" * 100, "candidates": ["c" * 29]})
    assert r.status_code == 200, r.text
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        assert_error(httpx.post(server.url + "/v1/score", json={"context": "a", "candidates": ["b"]},
                                headers=headers, timeout=30), 401, None, code="invalid_api_key")
    r = client.post("/v1/score", json={"context": "a", "candidates": ["b" * 100] * 250})  # over 20,000 bytes
    assert_error(r, 413, None, code="request_too_large")
    assert_error(client.post("/v1/score", content=b"context=a", headers={"Content-Type": "text/plain"}), 415, None)


def test_score_on_a_classifier_is_400(tmp_path):
    live = classifier_server(tmp_path)
    try:
        r = httpx.post(live.url + "/v1/score", json={"context": "a", "candidates": ["b"]}, timeout=30)
        assert_error(r, 400, None, code="unsupported_task", message="/v1/classify")
        r = httpx.post(live.url + "/v1/completions", json={"model": "sentiment", "prompt": "ab", "echo": True,
                                                           "logprobs": 1, "max_tokens": 0}, timeout=30)
        assert_error(r, 400, None, code="unsupported_task")
    finally:
        live.close()


def test_openapi_documents_score(client):
    schema = client.get("/openapi.json").json()
    post = schema["paths"]["/v1/score"]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"]["$ref"] == "#/components/schemas/ScoreRequest"
    assert {"400", "401", "413", "415", "503", "504"} <= set(post["responses"]) and "422" not in post["responses"]
    body = schema["components"]["schemas"]["ScoreRequest"]
    assert set(body["properties"]) == {"model", "context", "candidates", "normalize", "top_logprobs"}
    assert set(body["required"]) == {"context", "candidates"} and body["additionalProperties"] is False


# --------------------------------------------------------------------------------------------------
# /v1/completions: echo + logprobs (OpenAI's legacy scoring form)
def test_echo_logprobs_with_max_tokens_0(server, client):
    state = server.state
    prompts = ["hello world", "abc"]
    r = client.post("/v1/completions", json={"model": "tiny-lm", "prompt": prompts, "echo": True, "logprobs": 2,
                                             "max_tokens": 0})
    assert r.status_code == 200, r.text
    body = strict_json(r.text)
    assert body["object"] == "text_completion" and len(body["choices"]) == 2
    for choice, prompt in zip(body["choices"], prompts):
        ids = state.tokenizer.encode(prompt)
        assert choice["text"] == prompt and choice["finish_reason"] == "length"
        lp = choice["logprobs"]
        assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
        assert lp["tokens"] == list(prompt) and lp["text_offset"] == list(range(len(prompt)))
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        ref = prompt_logprobs(state.model, ids, top_logprobs=2)
        assert lp["token_logprobs"][1:] == pytest.approx(ref.logprobs[1:], abs=1e-6)
        assert lp["token_logprobs"][1:] == pytest.approx(slow_logprobs(state.model, ids), abs=1e-5)
        assert all(len(top) == 2 for top in lp["top_logprobs"][1:])
        for i, top in enumerate(lp["top_logprobs"][1:], 1):
            assert top == pytest.approx({state.tokenizer.decode([t]): v for t, v in ref.top[i]}, abs=1e-6)
    assert body["usage"] == {"prompt_tokens": 14, "completion_tokens": 0, "total_tokens": 14}


def test_echo_forms(server, client):
    state = server.state
    base = {"model": "tiny-lm", "prompt": "abcd", "echo": True, "max_tokens": 0}
    # token-id prompts, n copies, no logprobs
    ids = state.tokenizer.encode("abcd")
    r = client.post("/v1/completions", json={**base, "prompt": [ids, ids[:2]], "logprobs": 0, "n": 2}).json()
    assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in r["choices"]] == ["abcd", "abcd", "ab", "ab"]
    assert r["choices"][0]["logprobs"]["top_logprobs"] == [None] * 4  # logprobs 0: no alternatives
    plain = client.post("/v1/completions", json=base).json()["choices"][0]
    assert plain["text"] == "abcd" and plain["logprobs"] is None
    # one token: nothing predicts it
    one = client.post("/v1/completions", json={**base, "prompt": "a", "logprobs": 1}).json()["choices"][0]
    assert one["logprobs"]["token_logprobs"] == [None] and one["logprobs"]["top_logprobs"] == [None]
    # the prompt may fill the context when nothing is generated; beyond it is a 400
    full = client.post("/v1/completions", json={**base, "prompt": "a" * 128, "logprobs": 1})
    assert full.status_code == 200 and len(full.json()["choices"][0]["logprobs"]["tokens"]) == 128
    assert_error(client.post("/v1/completions", json={**base, "prompt": "a" * 129, "logprobs": 1}), 400, "prompt",
                 code="context_length_exceeded")
    # max_tokens 0 without echo returns nothing: refused, naming max_tokens
    assert_error(client.post("/v1/completions", json={**base, "echo": False}), 400, "max_tokens",
                 message="at least 1")
    assert_error(client.post("/v1/completions", json={**base, "n": 99}), 400, "n")


def test_echo_logprobs_then_generated_tokens(server, client):
    """max_tokens > 0: the prompt's tokens and log-probabilities, then the generated ones (what lm-eval's
    local-completions sends: max_tokens 1, and it drops the last entry)."""
    state = server.state
    body = {"model": "tiny-lm", "prompt": "the cat", "max_tokens": 3, "logprobs": 1, "temperature": 0}
    gen = client.post("/v1/completions", json=body).json()["choices"][0]
    echo = client.post("/v1/completions", json={**body, "echo": True}).json()["choices"][0]
    n = len("the cat")
    assert echo["text"] == "the cat" + gen["text"]
    lp = echo["logprobs"]
    assert lp["tokens"] == list("the cat") + gen["logprobs"]["tokens"]
    assert lp["token_logprobs"][n:] == gen["logprobs"]["token_logprobs"]
    assert lp["top_logprobs"][n:] == gen["logprobs"]["top_logprobs"]
    assert lp["text_offset"] == list(range(n + 3))
    ref = prompt_logprobs(state.model, state.tokenizer.encode("the cat"))
    assert lp["token_logprobs"][0] is None
    assert lp["token_logprobs"][1:n] == pytest.approx(ref.logprobs[1:], abs=1e-6)
    # the generated tokens' log-probabilities are the scorer's too (one model, one arithmetic up to rounding)
    prompt_ids = state.tokenizer.encode("the cat")
    new_ids = generate_ids(state.model, [prompt_ids], GenerateConfig(max_new_tokens=3, temperature=0))[0][0].token_ids
    assert lp["token_logprobs"][1:] == pytest.approx(slow_logprobs(state.model, prompt_ids + new_ids), abs=1e-4)
    # streamed: the first chunk is the prompt with its log-probabilities, then one chunk a token
    with client.stream("POST", "/v1/completions", json={**body, "echo": True, "stream": True}) as r:
        lines = [l for l in r.iter_lines() if l]
    assert lines[-1] == "data: [DONE]"
    chunks = [strict_json(l[6:])["choices"][0] for l in lines[:-1]]
    assert chunks[0]["text"] == "the cat" and chunks[0]["logprobs"]["token_logprobs"] == lp["token_logprobs"][:n]
    assert [c["logprobs"]["token_logprobs"][0] for c in chunks[1:]] == lp["token_logprobs"][n:]
    assert chunks[-1]["finish_reason"] == "length"


def test_echo_max_tokens_0_streams_one_chunk_a_choice(client):
    body = {"model": "tiny-lm", "prompt": ["ab", "cde"], "echo": True, "logprobs": 1, "max_tokens": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [l for l in r.iter_lines() if l]
    assert lines[-1] == "data: [DONE]"
    chunks = [strict_json(l[6:]) for l in lines[:-1]]
    assert [c["choices"][0]["text"] for c in chunks[:2]] == ["ab", "cde"]
    assert all(c["choices"][0]["finish_reason"] == "length" for c in chunks[:2])
    assert chunks[0]["choices"][0]["logprobs"]["token_logprobs"][0] is None
    assert chunks[2]["choices"] == [] and chunks[2]["usage"]["prompt_tokens"] == 5


# --------------------------------------------------------------------------------------------------
# lm-eval's local-completions: the requests it sent for one multiple-choice question (recorded from lm_eval 0.4.13)
def test_lm_eval_loglikelihood_requests(bpe_server):
    """The bodies lm-eval's local-completions posted for a two-choice question (recorded from a real run against
    this tiny BPE model, its tokenizer exported with `gptforge convert --to-hf`; examples/lm-eval/run.sh runs
    the same on the demo model), answered so that lm-eval's parse gives the scorer's numbers: it sums
    token_logprobs[ctxlen:-1] (the last entry is the one generated token) and calls a choice greedy when
    each of those tokens is the top of its top_logprobs. Its tokenization (through the exported Hugging Face
    tokenizer) is the scorer's too."""
    recorded = json.loads((FIXTURES / "lm_eval_request.json").read_text())
    state = bpe_server.state
    with httpx.Client(base_url=bpe_server.url, timeout=30) as c:
        for continuation, req in zip(recorded["continuations"], recorded["requests"]):
            body, ctxlens = req["body"], req["ctxlen"]
            ids = body["prompt"][0]
            assert encode_pair(state.tokenizer, recorded["context"], continuation) == (ids[:ctxlens[0]],
                                                                                      ids[ctxlens[0]:])
            r = c.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            choices = sorted(strict_json(r.text)["choices"], key=lambda choice: choice["index"])
            assert len(choices) == len(body["prompt"]) == len(ctxlens)
            for choice, prompt, ctxlen in zip(choices, body["prompt"], ctxlens):
                lp = choice["logprobs"]
                assert len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(prompt) + body["max_tokens"]
                total = sum(lp["token_logprobs"][ctxlen:-1])
                greedy = all(v == max(top.values()) for v, top in zip(lp["token_logprobs"][ctxlen:-1],
                                                                       lp["top_logprobs"][ctxlen:-1]))
                ref = score(state.model, state.tokenizer, recorded["context"], [continuation])[0]
                assert total == pytest.approx(ref.logprob, abs=1e-5)
                assert greedy == all(ref.token_scores.greedy)


# --------------------------------------------------------------------------------------------------
def test_scoring_between_decode_steps_leaves_streams_intact(server, client):
    """Scoring runs on the scheduler thread between decode steps: streams decoding meanwhile give the engine's
    greedy tokens, and the scores are the in-process ones."""
    import concurrent.futures

    state = server.state
    prompt = "the quick brown "
    body = {"model": "tiny-lm", "prompt": prompt, "max_tokens": 60, "temperature": 0, "stream": True}
    ref = generate_ids(state.model, [state.tokenizer.encode(prompt)],
                       GenerateConfig(max_new_tokens=60, temperature=0), tokenizer=state.tokenizer)[0][0].text
    expected = score(state.model, state.tokenizer, "abc", ["de", "f g"])

    def stream() -> str:
        with httpx.Client(base_url=server.url, headers=client.headers, timeout=60) as c:
            with c.stream("POST", "/v1/completions", json=body) as r:
                lines = [l for l in r.iter_lines() if l]
        return "".join(strict_json(l[6:])["choices"][0]["text"] for l in lines[:-1])

    def scores() -> list[float]:
        with httpx.Client(base_url=server.url, headers=client.headers, timeout=60) as c:
            return [d["logprob"] for d in c.post("/v1/score", json={"context": "abc",
                                                                     "candidates": ["de", "f g"]}).json()["data"]]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        streams = [pool.submit(stream) for _ in range(3)]
        scored = [pool.submit(scores) for _ in range(10)]
        echoes = [pool.submit(client.post, "/v1/completions", json={"model": "tiny-lm", "prompt": prompt,
                                                                     "echo": True, "logprobs": 1, "max_tokens": 0})
                  for _ in range(5)]
        assert [f.result(timeout=120) for f in streams] == [ref] * 3
        for f in scored:
            assert f.result(timeout=120) == pytest.approx([x.logprob for x in expected], abs=1e-6)
        lps = [f.result(timeout=120).json()["choices"][0]["logprobs"]["token_logprobs"] for f in echoes]
        assert all(lp == lps[0] for lp in lps)


def test_fuzzed_score_bodies_never_get_a_5xx(client):
    """Arbitrary JSON under /v1/score's field names: 200 or a 400 in OpenAI's shape naming a field, never a 5xx."""
    from hypothesis import HealthCheck, given, settings, strategies as st

    scalars = (st.none() | st.booleans() | st.integers(min_value=-3, max_value=40) | st.integers()
               | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12)
               | st.sampled_from(["none", "token", "byte", "tiny-lm", "\ud800", " ", ""]))
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4), max_leaves=8)
    fields = ["model", "context", "candidates", "normalize", "top_logprobs", "bogus"]
    bodies = st.dictionaries(st.sampled_from(fields), values, max_size=5)

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(body=bodies)
    def check(body):
        r = client.post("/v1/score", content=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        assert r.status_code in (200, 400), (body, r.text)
        if r.status_code == 400:
            error = strict_json(r.text)["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert error["param"] is None or error["param"] in fields, (body, error)
        else:
            assert len(strict_json(r.text)["data"]) == len(body["candidates"])

    check()
