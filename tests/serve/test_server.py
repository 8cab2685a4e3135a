"""The OpenAI-compatible server over real HTTP: a uvicorn server on a free loopback port in a background
thread, a tiny random-weight checkpoint written by the test, and httpx and the official ``openai`` client
talking to it."""

from __future__ import annotations

import concurrent.futures
import json
import re
import random
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import pytest
import torch

from gptforge.checkpoint import save_checkpoint, task_model_state
from gptforge.config import GenerateConfig, ModelConfig, ServeConfig
from gptforge.errors import ConfigError
from gptforge.generate import generate, generate_ids
from gptforge.heads import TaskModel
from gptforge.model import GPT
from gptforge.serve import create_app
from gptforge.serve.app import load_served_checkpoint
from gptforge.tokenizer import DEFAULT_CHAT_TEMPLATE, CharTokenizer, encode_chat_prompt
from tests.model_utils import save_tiny_checkpoint
from tests.serve.serve_utils import LiveServer, client_of, serving

pytestmark = pytest.mark.integration

CHARS = list("abcdefghijklmnopqrstuvwxyz .,\n")
KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}


def write_lm_checkpoint(path: Path) -> Path:
    return save_tiny_checkpoint(path, CHARS, block_size=128, n_layer=2, n_embd=32)


@pytest.fixture(scope="module")
def lm_checkpoint(tmp_path_factory) -> Path:
    return write_lm_checkpoint(tmp_path_factory.mktemp("serve") / "tiny-lm")


@pytest.fixture(scope="module")
def server(lm_checkpoint):
    config = ServeConfig(checkpoint=str(lm_checkpoint), api_key=KEY, device="cpu", max_batch_size=16,
                         max_queue=64, max_request_bytes=20_000)
    with serving(config) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    with client_of(server, headers=AUTH) as c:
        yield c


def engine_completion(server, prompt: str, **gen):
    state = server.state
    return generate(state.model, state.tokenizer, prompt, GenerateConfig(**gen))[0][0]


def finish(reason: str) -> str:
    return "stop" if reason in ("eos", "stop") else reason


# --------------------------------------------------------------------------------------------------
def test_served_model_is_named_after_what_the_user_gave(lm_checkpoint):
    # `gptforge serve --checkpoint runs/demo` serves "demo", whatever step folder the run resolves to
    checkpoint = load_served_checkpoint(ServeConfig(checkpoint=str(lm_checkpoint), device="cpu"))
    assert create_app(ServeConfig(checkpoint="runs/demo/", device="cpu"), checkpoint).state.server.model_name == "demo"
    named = ServeConfig(checkpoint="runs/demo", device="cpu", model_name="shakespeare")
    assert create_app(named, checkpoint).state.server.model_name == "shakespeare"


def test_health_models_and_metrics(server, client):
    assert httpx.get(server.url + "/health").json()["status"] == "ok"  # no key needed
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny-lm"
    client.post("/v1/completions", json={"model": "tiny-lm", "prompt": "ab", "max_tokens": 3, "temperature": 0})
    text = client.get("/metrics").text
    assert 'gptforge_requests_total{route="/v1/completions",status="200"}' in text
    assert 'gptforge_request_latency_seconds_bucket{le="+Inf",route="/v1/completions"}' in text
    assert "gptforge_running_batch_size 0" in text and "gptforge_queue_length 0" in text
    generated = float(next(l for l in text.splitlines() if l.startswith("gptforge_generated_tokens_total ")).split()[1])
    assert generated >= 3


def test_completion_equals_engine_greedy(server, client):
    prompt = "the cat sat on"
    r = client.post("/v1/completions", json={"model": "tiny-lm", "prompt": prompt, "max_tokens": 20, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    ref = engine_completion(server, prompt, max_new_tokens=20, temperature=0)
    choice = body["choices"][0]
    assert body["object"] == "text_completion" and choice["index"] == 0
    assert choice["text"] == ref.text
    assert choice["finish_reason"] == finish(ref.finish_reason)
    assert body["usage"]["prompt_tokens"] == len(prompt)
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]


def test_16_concurrent_requests_equal_engine_bit_for_bit(server, client):
    """Different prompt lengths and lengths to generate, joining and leaving the batch: every answer's tokens
    and log-probabilities equal those of the engine decoding that prompt alone."""
    rng = random.Random(3)
    jobs = [("".join(rng.choice("abcdefgh xyz") for _ in range(rng.randint(1, 30))), rng.randint(4, 30))
            for _ in range(16)]
    peak_before = server.state.scheduler.stats.peak_running

    def ask(job):
        prompt, m = job
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
            return c.post("/v1/completions", json={"model": "tiny-lm", "prompt": prompt, "max_tokens": m,
                                                   "temperature": 0, "logprobs": 1}).json()

    server.state.scheduler.stats.peak_running = 0
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, jobs))
    for (prompt, m), body in zip(jobs, answers):
        ref = engine_completion(server, prompt, max_new_tokens=m, temperature=0, logprobs=1)
        choice = body["choices"][0]
        assert choice["text"] == ref.text, prompt
        assert choice["logprobs"]["token_logprobs"][:len(ref.logprobs)] == ref.logprobs  # exact floats
        assert choice["finish_reason"] == finish(ref.finish_reason)
    assert server.state.scheduler.stats.peak_running >= 4  # they really shared the batch
    server.state.scheduler.stats.peak_running = max(peak_before, server.state.scheduler.stats.peak_running)


def test_bfloat16_kv_cache_server_equals_engine(lm_checkpoint):
    """With --kv-cache-dtype bfloat16 the model's caches are bfloat16, in the engine and in the server's
    shared batch alike: concurrent greedy answers still equal the engine's for each prompt alone."""
    config = ServeConfig(checkpoint=str(lm_checkpoint), device="cpu", kv_cache_dtype="bfloat16")
    live = LiveServer(config, load_served_checkpoint(config))
    try:
        assert live.state.model.new_kv_cache(1, 4).k.dtype == torch.bfloat16
        jobs = [("the cat", 12), ("a", 20), ("xyz abc def", 7), ("hello there", 15), ("q", 9), ("abc abc", 11)]

        def ask(job):
            with httpx.Client(base_url=live.url, timeout=60) as c:
                return c.post("/v1/completions", json={"model": "tiny-lm", "prompt": job[0], "max_tokens": job[1],
                                                       "temperature": 0}).json()

        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
            answers = list(pool.map(ask, jobs))
        for (prompt, m), body in zip(jobs, answers):
            assert body["choices"][0]["text"] == engine_completion(live, prompt, max_new_tokens=m, temperature=0).text
    finally:
        live.close()
    with pytest.raises(ConfigError, match="kv_cache_dtype must be auto or bfloat16"):
        ServeConfig(checkpoint="x", kv_cache_dtype="int4").validate()


def test_openai_client_completions_chat_and_streaming(server):
    import openai

    oc = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=30)
    assert [m.id for m in oc.models.list().data] == ["tiny-lm"]
    comp = oc.completions.create(model="tiny-lm", prompt="hello", max_tokens=12, temperature=0)
    assert comp.choices[0].text == engine_completion(server, "hello", max_new_tokens=12, temperature=0).text
    streamed = "".join(c.choices[0].text for c in oc.completions.create(
        model="tiny-lm", prompt="hello", max_tokens=12, temperature=0, stream=True) if c.choices)
    assert streamed == comp.choices[0].text

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    chat = oc.chat.completions.create(model="tiny-lm", messages=messages, max_tokens=15, temperature=0)
    state = server.state
    ids = encode_chat_prompt(state.tokenizer, messages, DEFAULT_CHAT_TEMPLATE)
    ref = generate_ids(state.model, [ids], GenerateConfig(max_new_tokens=15, temperature=0), state.tokenizer.eos_id,
                       tokenizer=state.tokenizer)[0][0]
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == ref.text
    assert chat.usage.prompt_tokens == len(ids)
    chunks = list(oc.chat.completions.create(model="tiny-lm", messages=messages, max_tokens=15, temperature=0,
                                             stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == chat.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens


def test_sse_wire_format(client):
    lines = []
    with client.stream("POST", "/v1/completions", json={"model": "tiny-lm", "prompt": "ab", "max_tokens": 5,
                                                        "temperature": 0, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [l for l in r.iter_lines() if l]
    assert all(l.startswith("data: ") for l in lines)
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(l[6:]) for l in lines[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_n_seed_stop_logprobs_and_penalties(client, server):
    base = {"model": "tiny-lm", "prompt": "abc", "max_tokens": 10, "temperature": 1.0, "n": 3, "seed": 7}
    a, b = client.post("/v1/completions", json=base).json(), client.post("/v1/completions", json=base).json()
    assert [c["text"] for c in a["choices"]] == [c["text"] for c in b["choices"]]  # seeded: reproducible
    assert [c["index"] for c in a["choices"]] == [0, 1, 2]
    ref = generate(server.state.model, server.state.tokenizer, "abc",
                   GenerateConfig(max_new_tokens=10, temperature=1.0, num_return_sequences=3, seed=7))[0]
    assert [c["text"] for c in a["choices"]] == [c.text for c in ref]  # seed + choice index, like the engine
    before = server.state.scheduler.stats.prompt_tokens
    assert client.post("/v1/completions", json=base).json()["choices"] == a["choices"]
    # The three choices shared one prefill (the same keys and values, computed once).
    assert server.state.scheduler.stats.prompt_tokens - before == len(server.state.tokenizer.encode("abc"))
    # Stop strings: the first character of a greedy answer stops it before anything is returned.
    full = client.post("/v1/completions", json={**base, "n": 1, "temperature": 0}).json()["choices"][0]["text"]
    cut = client.post("/v1/completions", json={**base, "n": 1, "temperature": 0, "stop": [full[2:4]]}).json()
    assert cut["choices"][0]["text"] == full[:full.index(full[2:4])]
    assert cut["choices"][0]["finish_reason"] == "stop"
    lp = client.post("/v1/completions", json={**base, "n": 1, "logprobs": 2}).json()["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 10
    assert all(len(t) <= 2 and all(v <= 0 for v in t.values()) for t in lp["top_logprobs"])
    chat = client.post("/v1/chat/completions", json={
        "model": "tiny-lm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "logprobs": True,
        "top_logprobs": 3, "presence_penalty": 1.5, "frequency_penalty": 0.5, "temperature": 0}).json()
    content = chat["choices"][0]["logprobs"]["content"]
    assert len(content) == chat["usage"]["completion_tokens"] and len(content[0]["top_logprobs"]) == 3


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (b'"just a string"', 400, None),
    ({"model": "nope", "prompt": "a"}, 400, "model"),
    ({"prompt": "a"}, 400, "model"),
    ({"model": "tiny-lm", "prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "tiny-lm", "prompt": "a", "max_tokens": 128}, 400, "max_tokens"),
    ({"model": "tiny-lm", "prompt": "a" * 130, "max_tokens": 1}, 400, "prompt"),
    ({"model": "tiny-lm", "prompt": "a", "temperature": 2.5}, 400, "temperature"),
    ({"model": "tiny-lm", "prompt": "a", "temperature": -0.1}, 400, "temperature"),
    (b'{"model": "tiny-lm", "prompt": "a", "temperature": NaN}', 400, "temperature"),
    (b'{"model": "tiny-lm", "prompt": "a", "temperature": Infinity}', 400, "temperature"),
    ({"model": "tiny-lm", "prompt": "a", "top_p": 0}, 400, "top_p"),
    ({"model": "tiny-lm", "prompt": "a", "top_p": 1.5}, 400, "top_p"),
    ({"model": "tiny-lm", "prompt": "a", "n": 0}, 400, "n"),
    ({"model": "tiny-lm", "prompt": "a", "n": 1000}, 400, "n"),
    ({"model": "tiny-lm", "prompt": "a", "stop": ""}, 400, "stop"),
    ({"model": "tiny-lm", "prompt": "a", "stop": ["x", ""]}, 400, "stop"),
    ({"model": "tiny-lm", "prompt": "a", "max_tokens": "5"}, 400, "max_tokens"),
    ({"model": "tiny-lm", "prompt": "a", "max_tokens": 2.5}, 400, "max_tokens"),
    ({"model": "tiny-lm", "prompt": 5}, 400, "prompt"),
    ({"model": "tiny-lm", "prompt": "a", "stream": "yes"}, 400, "stream"),
    ({"model": "tiny-lm", "prompt": "a", "presence_penalty": 3}, 400, "presence_penalty"),
    ({"model": "tiny-lm", "prompt": "a", "logprobs": 99}, 400, "logprobs"),
    ({"model": "tiny-lm", "prompt": [99999]}, 400, "prompt"),
    ({"model": "tiny-lm", "prompt": "a", "bogus_field": 1}, 400, "bogus_field"),
])
def test_completion_errors_have_openai_shape(client, body, status, param):
    if isinstance(body, bytes):
        r = client.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
    else:
        r = client.post("/v1/completions", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param


@pytest.mark.parametrize("field, value, message", [
    ("temperature", -0.1, "temperature must be a finite number >= 0, got -0.1"),
    ("temperature", 2.5, "temperature must be at most 2 (OpenAI's limit), got 2.5"),
    ("top_p", 1.5, "top_p must be in (0, 1], got 1.5"),
    ("n", 0, "n must be at least 1, got 0"),
    ("max_tokens", 0, "max_tokens must be at least 1, got 0 (0 generates nothing: it returns the prompt with echo: "
                      "true, and its log-probabilities with logprobs too)"),
    ("frequency_penalty", -3, "frequency_penalty must be in [-2, 2], got -3.0"),
    ("logprobs", -1, "logprobs must be >= 0 (0 returns none), got -1"),
    ("logprobs", 21, "logprobs must be at most 20 (OpenAI's limit), got 21"),
])
def test_request_ranges_are_generate_configs_under_openai_names(client, field, value, message):
    """A decoding field is range-checked by GenerateConfig.validate (the CLI's check), named as the request
    names it; OpenAI's tighter limits are added on top."""
    r = client.post("/v1/completions", json={"model": "tiny-lm", "prompt": "a", field: value})
    assert r.status_code == 400, r.text
    assert r.json()["error"] == {"message": f"{field}: {message}", "type": "invalid_request_error",
                                 "param": field, "code": None}


@pytest.mark.parametrize("body, param", [
    ({"model": "tiny-lm", "messages": []}, "messages"),
    ({"model": "tiny-lm", "messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    ({"model": "tiny-lm", "messages": [{"role": "user", "content": 5}]}, "messages"),
    ({"model": "tiny-lm", "messages": "hi"}, "messages"),
    ({"model": "tiny-lm", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, None),
    ({"model": "tiny-lm", "messages": [{"role": "user", "content": "x" * 140}]}, "messages"),
    ({"model": "tiny-lm", "messages": [{"role": "user", "content": "x"}], "logprobs": 1}, "logprobs"),
])
def test_chat_errors(client, body, param):
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_api_key_required_everywhere_but_health(server):
    for method, path in [("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                         ("POST", "/v1/classify"), ("GET", "/metrics"), ("GET", "/no/such/route")]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = httpx.request(method, server.url + path, headers=headers, json={})
            assert r.status_code == 401, (path, headers)
            assert r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(server.url + "/health").status_code == 200


def test_oversized_body_is_413(server, client):
    big = {"model": "tiny-lm", "prompt": "a" * 30_000}
    assert client.post("/v1/completions", json=big).status_code == 413

    def chunks():  # no Content-Length: the size is counted while reading
        for _ in range(30):
            yield b" " * 1000
    r = client.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_unknown_route_and_method_have_error_shape(client):
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    r = client.get("/v1/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_garbage_never_breaks_the_server(server, client):
    rng = random.Random(0)
    garbage = [bytes(rng.randrange(256) for _ in range(rng.randint(0, 200))) for _ in range(40)]
    garbage += [b"[" * 100_00, b"{}", b"null", b"{\"model\": null}", b"\xff\xfe", b"{\"prompt\": [[1, [2]]]}",
                json.dumps({"model": "tiny-lm", "prompt": [[]]}).encode(),
                json.dumps({"model": "tiny-lm", "prompt": ["a", [1]]}).encode(),
                json.dumps({"model": "tiny-lm", "prompt": "", "max_tokens": 2}).encode(),
                json.dumps({"model": "tiny-lm", "prompt": "a", "seed": -5, "max_tokens": 2, "temperature": 0.5}).encode(),
                json.dumps({"model": "tiny-lm", "prompt": "a", "stop": ["a"] * 10}).encode(),
                json.dumps({"model": "tiny-lm", "messages": [{"role": "user", "content": [{"type": "image"}]}]}).encode()]
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/classify"):
        for body in garbage:
            r = client.post(path, content=body, headers={"Content-Type": "application/json"})
            assert r.status_code in (200, 400, 413), (path, body[:50], r.status_code, r.text)
            assert r.status_code == 200 or "error" in r.json()
    ok = client.post("/v1/completions", json={"model": "tiny-lm", "prompt": "ab", "max_tokens": 3, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("stop", "length")
    assert server.state.scheduler.alive


def test_classify_on_a_language_model_is_400(client):
    r = client.post("/v1/classify", json={"input": "hello"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_task"


# --------------------------------------------------------------------------------------------------
# A server whose decode steps wait for the test's go-ahead, to watch the queue, cancellation and timeouts
# happen at points the test chooses (not at points a sleep hopes for: CI shares 2 cores with other work).
class StepGate:
    """Each decode step of the served model (a prompt's prefill too) waits here until the test allows it
    (``allow``) or the gate is open (``open``); ``steps`` counts the steps that ran, ``waiting`` the ones
    held now."""

    def __init__(self):
        self._cond = threading.Condition()
        self._allowed: int | None = None  # None: open
        self.steps = 0
        self.waiting = 0

    def hold(self) -> None:
        with self._cond:
            self._allowed = 0

    def allow(self, n: int = 1) -> None:
        with self._cond:
            self._allowed = (self._allowed or 0) + n
            self._cond.notify_all()

    def open(self) -> None:
        with self._cond:
            self._allowed = None
            self._cond.notify_all()

    def passing(self) -> None:
        with self._cond:
            self.waiting += 1
            try:
                if not self._cond.wait_for(lambda: self._allowed is None or self._allowed > 0, timeout=300):
                    raise RuntimeError("the test never allowed this step")
            finally:
                self.waiting -= 1
            if self._allowed is not None:
                self._allowed -= 1
            self.steps += 1


@contextmanager
def gated_serving(lm_checkpoint, **options) -> Iterator[tuple[LiveServer, StepGate]]:
    """A server of ``lm_checkpoint`` (one row, one queue place) whose steps pass a :class:`StepGate`; the gate
    is opened before the server closes (a step still waiting would hold the scheduler's thread)."""
    config = ServeConfig(checkpoint=str(lm_checkpoint), device="cpu", max_batch_size=1, max_queue=1, **options)
    ckpt = load_served_checkpoint(config)
    gate = StepGate()
    # A step ends in forward (logits) or, when all rows are plain greedy, in the LM head's argmax (the
    # argmax screen): gate both, so that every step waits once.
    for owner, name in ((ckpt.model, "forward"), (ckpt.model.lm_head, "argmax")):
        if not hasattr(owner, name):  # a head without a screen: every step ends in forward
            continue
        plain = getattr(owner, name)

        def gated(*args, _plain=plain, **kwargs):
            gate.passing()
            return _plain(*args, **kwargs)

        setattr(owner, name, gated)
    with serving(config, ckpt) as live:
        try:
            yield live, gate
        finally:
            gate.open()


@pytest.fixture(scope="module")
def gated(lm_checkpoint):
    with gated_serving(lm_checkpoint) as (live, gate):
        yield live, gate


def gauge(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=60).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def step_until(gate: StepGate, predicate, most: int) -> bool:
    """Allow one step at a time, at most ``most``, until ``predicate`` holds."""
    for _ in range(most):
        if wait_for(predicate, 1.0):
            return True
        gate.allow(1)
    return wait_for(predicate, 30)


def test_disconnect_frees_the_batch_row(gated):
    live, gate = gated
    url = live.url
    gate.open()
    assert wait_for(lambda: gauge(url, "gptforge_running_batch_size") == 0, 30)
    cancelled = gauge(url, "gptforge_cancelled_sequences_total")
    gate.hold()
    steps = gate.steps
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", url + "/v1/completions", json={"model": "tiny-lm", "prompt": "ab", "max_tokens": 40,
                                                             "temperature": 0, "stream": True}) as r:
            gate.allow(3)
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")  # generation is under way
            assert gauge(url, "gptforge_running_batch_size") == 1
    # The client hung up: the row is freed at a next step, long before the 40 tokens could be done.
    assert step_until(gate, lambda: gauge(url, "gptforge_running_batch_size") == 0, 20)
    assert gate.steps - steps < 30
    assert gauge(url, "gptforge_cancelled_sequences_total") == cancelled + 1
    gate.open()


def test_full_queue_answers_503_with_retry_after(gated):
    live, gate = gated
    url = live.url
    body = {"model": "tiny-lm", "prompt": "ab", "max_tokens": 12, "temperature": 0}
    gate.hold()
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            running = pool.submit(httpx.post, url + "/v1/completions", json=body, timeout=120)
            # the scheduler took it off the queue and is held in its prefill (or, where the prefill does not
            # end in the gated calls, in its first step)
            assert wait_for(lambda: gate.waiting == 1, 60)
            assert gauge(url, "gptforge_queue_length") == 0
            waiting = pool.submit(httpx.post, url + "/v1/completions", json=body, timeout=120)
            assert wait_for(lambda: gauge(url, "gptforge_queue_length") == 1, 60)
            r = httpx.post(url + "/v1/completions", json=body, timeout=60)
            assert r.status_code == 503
            assert r.headers["Retry-After"] == "1"
            assert r.json()["error"]["code"] == "queue_full"
            gate.open()
            assert running.result().status_code == 200 and waiting.result().status_code == 200
    finally:
        gate.open()


def test_request_timeout_is_504_and_frees_the_row(lm_checkpoint):
    with gated_serving(lm_checkpoint, request_timeout=1.5) as (live, gate):
        url = live.url
        gate.hold()  # the generation cannot finish: only the timeout can answer
        r = httpx.post(url + "/v1/completions", json={"model": "tiny-lm", "prompt": "ab", "max_tokens": 60,
                                                      "temperature": 0}, timeout=120)
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout"
        assert step_until(gate, lambda: gauge(url, "gptforge_running_batch_size") == 0, 20)
        assert gate.steps < 30


# --------------------------------------------------------------------------------------------------
def classifier_server(tmp_path) -> "LiveServer":
    """A server of a tiny random classification checkpoint (labels neg, pos) named "sentiment"."""
    torch.manual_seed(1)
    tok = CharTokenizer(CHARS)
    base = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16))
    model = TaskModel(base, "classify", 2, dropout=0.0)
    path = save_checkpoint(tmp_path / "sentiment", model, tok,
                           {"model": vars(base.config), "task": {"type": "classify", "labels": ["neg", "pos"]}},
                           state=task_model_state(model))
    config = ServeConfig(checkpoint=str(path), device="cpu")
    return LiveServer(config, load_served_checkpoint(config))


def test_classify_checkpoint(tmp_path):
    live = classifier_server(tmp_path)
    try:
        r = httpx.post(live.url + "/v1/classify", json={"input": ["good day", "bad day"]}, timeout=30)
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        from gptforge.evaluate.predict import classify_texts

        ref = classify_texts(live.state.model, live.state.tokenizer, ["good day", "bad day"], ["neg", "pos"])
        assert [d["label"] for d in data] == [x["label"] for x in ref]
        for d, x in zip(data, ref):
            assert d["probabilities"] == pytest.approx(x["probabilities"])
            assert sum(d["probabilities"].values()) == pytest.approx(1.0)
        one = httpx.post(live.url + "/v1/classify", json={"input": "good day"}, timeout=30).json()
        assert one["data"][0]["label"] == data[0]["label"]
        r = httpx.post(live.url + "/v1/completions", json={"model": "sentiment", "prompt": "a"}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_task"
        for empty in ("", ["good", ""]):  # nothing to classify (an IndexError and a 500 before)
            assert_error(httpx.post(live.url + "/v1/classify", json={"input": empty}, timeout=30), 400, "input",
                         message="is empty")
        # Weights broken in memory: the probabilities are NaN; the answer carries null, never NaN.
        with torch.no_grad():
            live.state.gpt.ln_f.weight.fill_(float("nan"))
        r = httpx.post(live.url + "/v1/classify", json={"input": ["good day", "bad day"]}, timeout=30)
        assert r.status_code == 200, r.text
        assert [d["probabilities"] for d in strict_json(r.text)["data"]] == [{"neg": None, "pos": None}] * 2
    finally:
        live.close()


# --------------------------------------------------------------------------------------------------
def test_served_model_is_prepacked_and_decodes_ragged(server):
    from gptforge.backends import linears_batch_invariant
    from gptforge.backends.cpu import PackedLinear

    scheduler = server.state.scheduler
    assert scheduler.batch_invariant is True
    assert scheduler._ragged is True  # one batched forward with row_starts per decode step
    assert any(isinstance(m, PackedLinear) for m in server.state.model.modules())
    assert linears_batch_invariant(server.state.model)


# --------------------------------------------------------------------------------------------------
# Malformed input: always a 4xx in OpenAI's shape, naming the field at fault; answers are strict JSON.
def strict_json(text: str):
    """``text`` parsed as strict JSON: NaN and Infinity are refused, as every JSON parser but Python's does."""
    def refuse(constant):
        raise AssertionError(f"{constant} in an answer: not JSON")

    return json.loads(text, parse_constant=refuse)


def assert_error(r, status: int, param, code=None, message: str = "") -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    error = strict_json(r.text)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    assert message in error["message"]
    return error


def post_raw(client, path: str, body: str):
    """``body`` sent as written (JSON escapes such as "\\ud800" included), as application/json."""
    return client.post(path, content=body.encode("utf-8"), headers={"Content-Type": "application/json"})


LONE_SURROGATES = [  # (route, body with a lone surrogate as a JSON escape, the field named)
    ("/v1/completions", '{"model": "MODEL", "prompt": "ab\\ud800c", "max_tokens": 2}', "prompt"),
    ("/v1/completions", '{"model": "MODEL", "prompt": "ab\\udfffc", "max_tokens": 2, "echo": true}', "prompt"),
    ("/v1/completions", '{"model": "MODEL", "prompt": ["ok", "\\ud800"], "max_tokens": 2}', "prompt"),
    ("/v1/completions", '{"model": "MODEL", "prompt": "ab", "stop": ["\\ud800"], "max_tokens": 2}', "stop"),
    ("/v1/completions", '{"model": "MODEL", "prompt": "ab", "user": "\\udc00", "max_tokens": 2}', "user"),
    ("/v1/completions", '{"model": "MODEL\\ud800", "prompt": "ab"}', "model"),
    ("/v1/completions", '{"model": "MODEL", "prompt": "ab", "\\ud800": 1}', None),
    ("/v1/chat/completions", '{"model": "MODEL", "messages": [{"role": "user", "content": "\\ud800"}]}', "messages"),
    ("/v1/chat/completions", '{"model": "MODEL", "messages": [{"role": "user", "content": [{"type": "text", '
                             '"text": "x\\udbff"}]}]}', "messages"),
    ("/v1/chat/completions", '{"model": "MODEL", "messages": [{"role": "user", "content": "hi", "\\ud800": 1}]}',
     "messages"),
    ("/v1/classify", '{"input": ["fine", "\\ud800"]}', "input"),
]


@pytest.mark.parametrize("path, body, param", LONE_SURROGATES)
def test_lone_surrogates_are_400_on_a_char_model(client, path, body, param):
    r = post_raw(client, path, body.replace("MODEL", "tiny-lm"))
    assert_error(r, 400, param, code="invalid_unicode", message="lone surrogate")


def test_a_surrogate_pair_is_one_character_not_an_error(client):
    r = post_raw(client, "/v1/completions", '{"model": "tiny-lm", "prompt": "a\\ud83d\\ude00", "max_tokens": 2, '
                                            '"echo": true, "temperature": 0}')
    assert r.status_code == 200, r.text
    assert strict_json(r.text)["choices"][0]["text"].startswith("a\U0001F600")


@pytest.fixture(scope="module")
def bpe_server(tmp_path_factory):
    from gptforge.tokenizer import BPETokenizer

    torch.manual_seed(0)
    tok = BPETokenizer.train(iter(["the quick brown fox jumps over the lazy dog. " * 50]), vocab_size=300)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=16))
    path = save_checkpoint(tmp_path_factory.mktemp("serve-bpe") / "tiny-bpe", model, tok, {"model": vars(model.config)})
    with serving(ServeConfig(checkpoint=str(path), device="cpu")) as live:
        yield live


def test_lone_surrogates_are_400_on_a_bpe_model(bpe_server):
    """The byte-level BPE tokenizer refuses such a string (`TextInputSequence must be str`: a 500 before)."""
    with httpx.Client(base_url=bpe_server.url, timeout=30) as c:
        for path, body, param in LONE_SURROGATES:
            if path == "/v1/classify":
                continue
            assert_error(post_raw(c, path, body.replace("MODEL", "tiny-bpe")), 400, param, code="invalid_unicode",
                         message="lone surrogate")
        ok = c.post("/v1/completions", json={"model": "tiny-bpe", "prompt": "the fox \U0001F600", "max_tokens": 3,
                                             "echo": True})
        assert ok.status_code == 200 and strict_json(ok.text)["choices"][0]["text"].startswith("the fox \U0001F600")
        assert c.get("/health").json()["status"] == "ok"


def test_invalid_utf8_is_400(client):
    for body in (b'{"model": "tiny-lm", "prompt": "\xff"}', b'{"model": "tiny-lm", "prompt": "\xed\xa0\x80"}',
                 b"\xc3"):
        r = client.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
        assert_error(r, 400, None, message="not valid UTF-8")


@pytest.mark.parametrize("seed", [2 ** 64, 2 ** 63, -2 ** 63 - 1, 10 ** 30])
def test_seed_outside_int64_is_400(client, seed):
    """A seed torch cannot take failed in the scheduler's prefill (503, "the server stopped") before."""
    for path, body in (("/v1/completions", {"prompt": "ab"}), ("/v1/chat/completions",
                                                               {"messages": [{"role": "user", "content": "hi"}]})):
        r = client.post(path, json={"model": "tiny-lm", **body, "max_tokens": 2, "seed": seed})
        assert_error(r, 400, "seed", message="seed: ")


def test_seeds_at_the_int64_limits_work_for_every_choice(client):
    for seed in (2 ** 63 - 1, -2 ** 63):
        r = client.post("/v1/completions", json={"model": "tiny-lm", "prompt": ["ab", "cd"], "max_tokens": 2,
                                                 "seed": seed, "n": 3})
        assert r.status_code == 200, r.text
        assert len(r.json()["choices"]) == 6


@pytest.mark.parametrize("field, value", [
    ("n", 2 ** 64), ("max_tokens", 2 ** 64), ("max_tokens", -2 ** 64), ("logprobs", 2 ** 64), ("logprobs", -2 ** 70),
    ("temperature", 10 ** 400), ("top_p", -10 ** 30), ("presence_penalty", 2 ** 64), ("prompt", [2 ** 64]),
    ("prompt", [[1, -2 ** 64]]),
])
def test_huge_integers_are_400_naming_the_field(client, field, value):
    body = {"model": "tiny-lm", "prompt": "ab", "max_tokens": 2, field: value}
    assert_error(post_raw(client, "/v1/completions", json.dumps(body)), 400, field)


@pytest.mark.parametrize("field, value", [("max_completion_tokens", 2 ** 64), ("top_logprobs", 2 ** 64),
                                          ("n", -2 ** 64), ("seed", 2 ** 64)])
def test_huge_integers_in_chat_are_400_naming_the_field(client, field, value):
    body = {"model": "tiny-lm", "messages": [{"role": "user", "content": "hi"}], "logprobs": True, field: value}
    assert_error(post_raw(client, "/v1/chat/completions", json.dumps(body)), 400, field)


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                          "application/json; charset=latin-1", "text/json", "application/jsonx"])
def test_a_body_that_is_not_json_is_415(client, content_type):
    body = json.dumps({"model": "tiny-lm", "prompt": "ab", "max_tokens": 2})
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/classify"):
        r = client.post(path, content=body, headers={"Content-Type": content_type})
        error = assert_error(r, 415, None, code="unsupported_media_type")
        if content_type.startswith("application/x-www-form-urlencoded"):  # what curl -d sends
            assert "-H 'Content-Type: application/json'" in error["message"]


def test_json_with_a_charset_or_without_a_content_type_is_read(client):
    body = json.dumps({"model": "tiny-lm", "prompt": "ab", "max_tokens": 2}).encode()
    for headers in ({"Content-Type": "application/json; charset=utf-8"},
                    {"Content-Type": "Application/JSON;charset=UTF8"}, {}):
        request = client.build_request("POST", "/v1/completions", content=body, headers=headers)
        assert ("content-type" in request.headers) == bool(headers)  # httpx adds none for bytes
        r = client.send(request)
        assert r.status_code == 200, (headers, r.text)


def raw_http(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


@pytest.mark.parametrize("request_bytes", [
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: abc\r\n\r\n{}",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
    b"NOT HTTP AT ALL\r\n\r\n",
])
def test_malformed_http_gets_a_json_400(server, request_bytes):
    """uvicorn answers these itself (the app never sees them); its protocol is told to answer in JSON."""
    head, _, body = raw_http(server.port, request_bytes).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert b"content-type: application/json" in head.lower()
    error = strict_json(body.decode())["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == "invalid_http_request"
    assert error["message"].startswith("invalid HTTP request: a malformed request line or header")
    assert httpx.get(server.url + "/health").status_code == 200


def test_omitted_max_tokens_fits_the_context(client):
    """OpenAI's default of 16 new tokens is lowered to what the context leaves (128 tokens here), so leaving it out
    never fails for length alone; a prompt that fills the context is still an error, naming the prompt."""
    r = client.post("/v1/completions", json={"model": "tiny-lm", "prompt": "a" * 120, "temperature": 0})
    assert r.status_code == 200, r.text
    assert 1 <= r.json()["usage"]["completion_tokens"] <= 8
    r = client.post("/v1/completions", json={"model": "tiny-lm", "prompt": "a" * 10, "temperature": 0})
    assert r.json()["usage"]["completion_tokens"] <= 16
    assert_error(client.post("/v1/completions", json={"model": "tiny-lm", "prompt": "a" * 128}), 400, "prompt",
                 code="context_length_exceeded")
    # An explicit max_tokens beyond the context is still the client's error, and says so.
    assert_error(client.post("/v1/completions", json={"model": "tiny-lm", "prompt": "a" * 120, "max_tokens": 9}),
                 400, "max_tokens", code="context_length_exceeded")
    chat = client.post("/v1/chat/completions", json={"model": "tiny-lm", "temperature": 0,
                                                     "messages": [{"role": "user", "content": "b" * 90}]})
    assert chat.status_code == 200, chat.text
    assert client.get("/v1/models").json()["data"][0]["context_length"] == 128


@pytest.fixture(scope="module")
def nan_server(lm_checkpoint):
    """A model whose final layer norm is NaN (loaders refuse such weights on disk; this one is broken in memory):
    every logit and log-probability is NaN."""
    config = ServeConfig(checkpoint=str(lm_checkpoint), device="cpu")
    ckpt = load_served_checkpoint(config)
    with torch.no_grad():
        ckpt.model.ln_f.weight.fill_(float("nan"))
    with serving(config, ckpt) as live:
        yield live


def test_non_finite_logprobs_are_null_never_nan(nan_server):
    with httpx.Client(base_url=nan_server.url, timeout=30) as c:
        for temperature in (0, 1):
            r = c.post("/v1/completions", json={"model": "tiny-lm", "prompt": "ab", "max_tokens": 3, "logprobs": 2,
                                                "temperature": temperature})
            assert r.status_code == 200, r.text
            lp = strict_json(r.text)["choices"][0]["logprobs"]
            assert lp["token_logprobs"] == [None] * 3
            assert all(v is None for top in lp["top_logprobs"] for v in top.values())
            r = c.post("/v1/chat/completions", json={"model": "tiny-lm", "messages": [{"role": "user", "content": "x"}],
                                                     "max_tokens": 2, "logprobs": True, "top_logprobs": 2,
                                                     "temperature": temperature})
            assert r.status_code == 200, r.text
            content = strict_json(r.text)["choices"][0]["logprobs"]["content"]
            assert [e["logprob"] for e in content] == [None, None]
        with c.stream("POST", "/v1/completions", json={"model": "tiny-lm", "prompt": "ab", "max_tokens": 3,
                                                       "logprobs": 1, "stream": True}) as r:
            lines = [l for l in r.iter_lines() if l]
        assert lines[-1] == "data: [DONE]"
        chunks = [strict_json(l[6:]) for l in lines[:-1]]
        assert [c["choices"][0]["logprobs"]["token_logprobs"] for c in chunks] == [[None]] * 3


def test_openapi_json_is_served_behind_the_key(server, client, bpe_server):
    assert_error(httpx.get(server.url + "/openapi.json"), 401, None, code="invalid_api_key")
    schema = client.get("/openapi.json").json()
    assert schema["openapi"].startswith("3.")
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/classify"):
        post = schema["paths"][path]["post"]
        assert post["requestBody"]["content"]["application/json"]["schema"]["$ref"].startswith("#/components/schemas/")
        assert {"400", "401", "413", "415", "503"} <= set(post["responses"]) and "422" not in post["responses"]
    body = schema["components"]["schemas"]["CompletionRequest"]
    assert {"model", "prompt", "seed", "max_tokens"} <= set(body["properties"])
    assert body["additionalProperties"] is False
    assert schema["components"]["schemas"]["ErrorDetail"]["required"] == ["message", "type", "param", "code"]
    # every reference resolves
    refs = re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', json.dumps(schema))
    assert refs and set(refs) <= set(schema["components"]["schemas"])
    # a server without a key serves it openly
    assert httpx.get(bpe_server.url + "/openapi.json").status_code == 200


def test_fuzzed_bodies_never_get_a_5xx_or_an_off_shape_error(client):
    """Arbitrary JSON under the request fields' names (wrong types, nesting, huge numbers, odd strings): 200 or a
    4xx in OpenAI's shape, never a 5xx. (benchmarks/faults.py sends 10,000 and more.)"""
    from hypothesis import HealthCheck, given, settings, strategies as st

    scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=-3, max_value=40)
               | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12)
               | st.sampled_from(["tiny-lm", "user", "system", "text", "\ud800"]))
    keys = st.sampled_from(["role", "content", "type", "text", "x"])
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3),
                          max_leaves=8)
    fields = ["model", "prompt", "messages", "input", "max_tokens", "max_completion_tokens", "temperature", "top_p",
              "n", "stream", "stream_options", "stop", "seed", "presence_penalty", "frequency_penalty", "logprobs",
              "top_logprobs", "echo", "user", "bogus"]
    bodies = st.dictionaries(st.sampled_from(fields), values, max_size=6)

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/classify"]), body=bodies)
    def check(path, body):
        text = json.dumps(body)  # json.dumps escapes a lone surrogate as \ud800, as a client would send it
        r = client.post(path, content=text.encode(), headers={"Content-Type": "application/json"})
        assert r.status_code < 500, (path, text, r.text)
        if r.status_code == 200:
            if r.headers["content-type"].startswith("text/event-stream"):
                lines = [l for l in r.text.splitlines() if l]
                assert lines[-1] == "data: [DONE]" and all(strict_json(l[6:]) for l in lines[:-1])
            else:
                strict_json(r.text)
        else:
            error = strict_json(r.text)["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert error["param"] is None or error["param"] in fields, (text, error)  # a field, given or missing

    check()


def test_a_model_failure_is_a_500_in_shape_and_the_server_serves_on(lm_checkpoint):
    """The one 5xx left is the server's own fault (here a decode step raising, as out-of-memory would): a 500
    in OpenAI's shape, or for a stream an error event then [DONE]; the next request is served."""
    config = ServeConfig(checkpoint=str(lm_checkpoint), device="cpu")
    live = LiveServer(config, load_served_checkpoint(config))
    scheduler = live.state.scheduler
    decode, fail = scheduler._decode, [False]

    def decode_or_fail():
        if fail[0]:
            fail[0] = False
            raise RuntimeError("out of memory (simulated)")
        decode()

    scheduler._decode = decode_or_fail
    body = {"model": "tiny-lm", "prompt": "ab", "max_tokens": 5, "temperature": 0}
    try:
        with httpx.Client(base_url=live.url, timeout=30) as c:
            fail[0] = True
            error = assert_error(c.post("/v1/completions", json=body), 500, None)
            assert error["type"] == "server_error" and "the model failed" in error["message"]
            fail[0] = True
            with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                lines = [l for l in r.iter_lines() if l]
            assert lines[-1] == "data: [DONE]"
            assert strict_json(lines[-2][6:])["error"]["type"] == "server_error"
            ok = c.post("/v1/completions", json=body)
            assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == \
                engine_completion(live, "ab", max_new_tokens=5, temperature=0).text
            assert c.get("/health").json()["status"] == "ok"
    finally:
        live.close()
