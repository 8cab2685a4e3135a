"""`gptforge serve` as a process: one-line errors, SIGTERM draining (in-flight requests finish, new ones
get 503, then the process exits 0), and a second signal (open streams end with an error event and
`data: [DONE]`, the process exits at once)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from gptforge.checkpoint import save_checkpoint
from gptforge.cli import main
from gptforge.config import GenerateConfig, ModelConfig
from gptforge.generate import generate
from gptforge.model import GPT
from gptforge.tokenizer import CharTokenizer

pytestmark = pytest.mark.integration

MAX_TOKENS = 450


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_reports_a_missing_checkpoint_in_one_line(tmp_path, capsys):
    assert main(["serve", "--checkpoint", str(tmp_path / "missing"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")
    assert main(["serve", "--checkpoint", str(tmp_path), "--max-batch-size", "0"]) == 2


@pytest.fixture(scope="module")
def long_checkpoint(tmp_path_factory) -> Path:
    """A random model whose greedy answer to "a" runs the full MAX_TOKENS (no end-of-text on the way)."""
    tok = CharTokenizer(list("abcdefghij "))
    for seed in range(20):
        torch.manual_seed(seed)
        # Big enough that 450 tokens take a while even with the native decode step (~1 s on 2 cores).
        model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=512, n_layer=4, n_head=4, n_embd=256)).eval()
        out = generate(model, tok, "a", GenerateConfig(max_new_tokens=MAX_TOKENS, temperature=0))[0][0]
        if out.finish_reason == "length":
            return save_checkpoint(tmp_path_factory.mktemp("serve-cli") / "long", model, tok,
                                   {"model": vars(model.config)})
    pytest.skip("no seed gave a run without end-of-text")


def start_server(checkpoint: Path, log_path: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """`gptforge serve` on a free port, once /health answers; the process and its URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "gptforge.cli", "serve", "--checkpoint", str(checkpoint),
                                 "--port", str(port), "--device", "cpu", *extra], stdout=log_file,
                                stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(log_path.read_text())
        time.sleep(0.1)


def wait_until_draining(url: str) -> httpx.Response:
    """Until the server has seen the first signal (a request before that is served); the 503 it then gives."""
    deadline = time.monotonic() + 120  # generous: CI shares 2 cores with other work
    while time.monotonic() < deadline:
        refused = httpx.post(url + "/v1/completions", json={"model": "long", "prompt": "a", "max_tokens": 2},
                             timeout=60)
        if refused.status_code == 503:
            return refused
        time.sleep(0.01)
    raise AssertionError("the server never refused a request after SIGTERM")


def test_sigterm_finishes_in_flight_requests_and_refuses_new_ones(long_checkpoint, tmp_path):
    log_path = tmp_path / "serve.log"
    # A grace long enough for 450 tokens on a busy machine (past it the requests would be ended).
    proc, url = start_server(long_checkpoint, log_path, "--shutdown-grace", "300")
    try:

        lines: list[str] = []
        first = threading.Event()

        def stream():
            with httpx.stream("POST", url + "/v1/completions", timeout=60, json={
                    "model": "long", "prompt": "a", "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}) as r:
                for line in r.iter_lines():
                    if line:
                        lines.append(line)
                        first.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert first.wait(120)
        proc.send_signal(signal.SIGTERM)
        refused = wait_until_draining(url)
        streaming_when_refused = reader.is_alive()
        reader.join(300)  # the grace: 450 tokens on a busy machine
        assert not reader.is_alive()
        assert proc.wait(60) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert streaming_when_refused  # the refusal really happened while a request was in flight
    assert refused.status_code == 503 and refused.headers["Retry-After"]
    assert refused.json()["error"]["code"] == "shutting_down"
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(l[6:]) for l in lines[:-1]]
    assert "choices" in chunks[-1], (chunks[-1], log_path.read_text())
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert len("".join(c["choices"][0]["text"] for c in chunks)) == MAX_TOKENS  # one character per token


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_ends_open_streams_with_an_error_and_exits(long_checkpoint, tmp_path, second):
    """The first SIGTERM drains; a second one (or Ctrl-C) ends every open stream with an error event and
    `data: [DONE]`, answers a waiting request 503, and the process exits soon after, with 0."""
    log_path = tmp_path / "serve.log"
    proc, url = start_server(long_checkpoint, log_path)
    streams: list[list[str]] = [[] for _ in range(3)]
    started = [threading.Event() for _ in streams]
    plain: list[httpx.Response] = []
    body = {"model": "long", "prompt": "a", "max_tokens": MAX_TOKENS, "temperature": 0}

    def stream(i):
        with httpx.stream("POST", url + "/v1/completions", timeout=60, json={**body, "stream": True}) as r:
            for line in r.iter_lines():
                if line:
                    streams[i].append(line)
                    started[i].set()

    try:
        readers = [threading.Thread(target=stream, args=(i,)) for i in range(len(streams))]
        readers.append(threading.Thread(target=lambda: plain.append(
            httpx.post(url + "/v1/completions", json=body, timeout=60))))
        for reader in readers:
            reader.start()
        assert all(event.wait(30) for event in started)
        proc.send_signal(signal.SIGTERM)
        wait_until_draining(url)
        alive_at_second = [reader.is_alive() for reader in readers]
        signalled = time.monotonic()
        proc.send_signal(second)
        for reader in readers:
            reader.join(30)
        assert proc.wait(30) == 0, log_path.read_text()
        exit_s = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            proc.kill()
    assert all(alive_at_second), "a request finished before the second signal; the test proves nothing"
    # "within a second": about 1 s here on 2 busy cores. Under 4 s, so that the old behaviour (uvicorn's 5 s
    # graceful-shutdown timeout, 5.2 s measured) fails the test, with room for a loaded machine.
    assert exit_s < 4, (exit_s, log_path.read_text())
    for lines in streams:
        assert lines[-1] == "data: [DONE]"
        error = json.loads(lines[-2][6:])["error"]
        assert error["code"] == "shutting_down" and error["type"] == "server_error"
        assert "shutting down now" in error["message"]
        chunks = [json.loads(l[6:]) for l in lines[:-2]]
        assert all(c["choices"][0]["finish_reason"] is None for c in chunks)
        assert len("".join(c["choices"][0]["text"] for c in chunks)) < MAX_TOKENS  # really cut short
    assert plain[0].status_code == 503 and plain[0].json()["error"]["code"] == "shutting_down"
    assert "stopping now" in log_path.read_text()


@pytest.mark.parametrize("key, shown", [("clé-secrète", "'é' (U+00E9)"), ("s3cret\u20ac", "'€' (U+20AC)"),
                                        ("two words", "' ' (U+0020)"), ("tab\there", "'\\t' (U+0009)"),
                                        ("bell\x07", "'\\x07' (U+0007)")])
def test_an_api_key_that_cannot_travel_in_a_header_is_refused_at_start_up(tmp_path, capsys, monkeypatch, key, shown):
    """Header values are bytes: a key above U+00FF could never match (everyone locked out), and spaces or control
    characters do not survive the trip. Refused before the checkpoint is even read, in one line, flag or variable."""
    monkeypatch.delenv("GPTFORGE_API_KEY", raising=False)
    assert main(["serve", "--checkpoint", str(tmp_path / "missing"), "--device", "cpu", "--api-key", key]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: api_key must be printable ASCII") and shown in err[0], err
    monkeypatch.setenv("GPTFORGE_API_KEY", key)
    assert main(["serve", "--checkpoint", str(tmp_path / "missing"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "api_key must be printable ASCII" in err[0]


def test_printable_ascii_keys_are_accepted():
    from gptforge.config import ServeConfig

    for key in ("s3cret", "sk-proj_AbC.123~+/=", "!\"#$%&'()*,;<>?@[\\]^`{|}"):
        assert ServeConfig(checkpoint="x", api_key=key).validate().api_key == key


@pytest.mark.parametrize("host, key, warned", [
    ("0.0.0.0", None, True), ("::", None, True), ("192.168.1.5", None, True), ("myhost.example", None, True),
    ("0.0.0.0", "s3cret", False), ("127.0.0.1", None, False), ("127.0.0.2", None, False), ("::1", None, False),
    ("localhost", None, False),
])
def test_a_non_loopback_host_without_a_key_is_warned_about(host, key, warned, caplog):
    from gptforge.config import ServeConfig
    from gptforge.serve.app import _warn_if_open

    with caplog.at_level("WARNING", logger="gptforge.serve.app"):
        _warn_if_open(ServeConfig(checkpoint="x", host=host, api_key=key))
    messages = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert bool(messages) == warned, messages
    if warned:
        assert f"listening on {host} without an API key" in messages[0] and "--api-key" in messages[0]
