"""The OpenAI-compatible server over real HTTP: a uvicorn server on a free loopback port in a background
thread, a tiny random-weight checkpoint written by the test, and httpx and the official ``openai`` client
talking to it."""

from __future__ import annotations

import concurrent.futures
import json
import random
import socket
import threading
import time
from pathlib import Path

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

pytestmark = pytest.mark.integration

CHARS = list("abcdefghijklmnopqrstuvwxyz .,\n")
KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}


class LiveServer:
    """uvicorn serving ``create_app(config, checkpoint)`` on a free 127.0.0.1 port in a thread."""

    def __init__(self, config: ServeConfig, checkpoint):
        import uvicorn

        self.app = create_app(config, checkpoint)
        self.state = self.app.state.server
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", access_log=False,
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def write_lm_checkpoint(path: Path) -> Path:
    return save_tiny_checkpoint(path, CHARS, block_size=128, n_layer=2, n_embd=32)


@pytest.fixture(scope="module")
def lm_checkpoint(tmp_path_factory) -> Path:
    return write_lm_checkpoint(tmp_path_factory.mktemp("serve") / "tiny-lm")


@pytest.fixture(scope="module")
def server(lm_checkpoint):
    config = ServeConfig(checkpoint=str(lm_checkpoint), api_key=KEY, device="cpu", max_batch_size=16,
                         max_queue=64, max_request_bytes=20_000)
    live = LiveServer(config, load_served_checkpoint(config))
    yield live
    live.close()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as c:
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
    ("max_tokens", 0, "max_tokens must be at least 1, got 0"),
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
# A server whose model is slowed down, to watch the queue, cancellation and timeouts happen.
@pytest.fixture(scope="module")
def slow_server(lm_checkpoint):
    config = ServeConfig(checkpoint=str(lm_checkpoint), device="cpu", max_batch_size=1, max_queue=1,
                         request_timeout=1.5)
    ckpt = load_served_checkpoint(config)
    # A step ends in forward (logits) or, when all rows are plain greedy, in the LM head's argmax (the
    # argmax screen): slow both, so that every step sleeps once.
    for owner, name in ((ckpt.model, "forward"), (ckpt.model.lm_head, "argmax")):
        if not hasattr(owner, name):  # a head without a screen: every step ends in forward
            continue
        plain = getattr(owner, name)

        def slow(*args, _plain=plain, **kwargs):
            time.sleep(0.03)
            return _plain(*args, **kwargs)

        setattr(owner, name, slow)
    live = LiveServer(config, ckpt)
    yield live
    live.close()


def gauge(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
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


def test_disconnect_frees_the_batch_row(slow_server):
    url = slow_server.url
    assert wait_for(lambda: gauge(url, "gptforge_running_batch_size") == 0, 5)
    cancelled = gauge(url, "gptforge_cancelled_sequences_total")
    with httpx.Client(timeout=10) as c:
        with c.stream("POST", url + "/v1/completions", json={"model": "tiny-lm", "prompt": "ab", "max_tokens": 40,
                                                             "temperature": 0, "stream": True}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")  # generation is under way (40 tokens take > 1.2 s)
            assert gauge(url, "gptforge_running_batch_size") == 1
            t0 = time.monotonic()
    # The client hung up: the row is freed at the next step, long before the 40 tokens would be done.
    assert wait_for(lambda: gauge(url, "gptforge_running_batch_size") == 0, 0.8)
    assert time.monotonic() - t0 < 0.8
    assert gauge(url, "gptforge_cancelled_sequences_total") == cancelled + 1


def test_full_queue_answers_503_with_retry_after(slow_server):
    url = slow_server.url
    body = {"model": "tiny-lm", "prompt": "ab", "max_tokens": 12, "temperature": 0}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        running = pool.submit(httpx.post, url + "/v1/completions", json=body, timeout=10)
        assert wait_for(lambda: gauge(url, "gptforge_running_batch_size") == 1, 5)
        waiting = pool.submit(httpx.post, url + "/v1/completions", json=body, timeout=10)
        assert wait_for(lambda: gauge(url, "gptforge_queue_length") == 1, 5)
        r = httpx.post(url + "/v1/completions", json=body, timeout=10)
        assert r.status_code == 503
        assert r.headers["Retry-After"] == "1"
        assert r.json()["error"]["code"] == "queue_full"
        assert running.result().status_code == 200 and waiting.result().status_code == 200


def test_request_timeout_is_504_and_frees_the_row(slow_server):
    url = slow_server.url
    t0 = time.monotonic()
    r = httpx.post(url + "/v1/completions", json={"model": "tiny-lm", "prompt": "ab", "max_tokens": 60,
                                                  "temperature": 0}, timeout=10)
    assert r.status_code == 504 and r.json()["error"]["type"] == "timeout"
    assert time.monotonic() - t0 < 3
    assert wait_for(lambda: gauge(url, "gptforge_running_batch_size") == 0, 1)


# --------------------------------------------------------------------------------------------------
def test_classify_checkpoint(tmp_path):
    torch.manual_seed(1)
    tok = CharTokenizer(CHARS)
    base = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16))
    model = TaskModel(base, "classify", 2, dropout=0.0)
    path = save_checkpoint(tmp_path / "sentiment", model, tok,
                           {"model": vars(base.config), "task": {"type": "classify", "labels": ["neg", "pos"]}},
                           state=task_model_state(model))
    config = ServeConfig(checkpoint=str(path), device="cpu")
    live = LiveServer(config, load_served_checkpoint(config))
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
