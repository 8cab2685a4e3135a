"""`gptforge serve` as a process: one-line errors, and SIGTERM draining (in-flight requests finish, new ones
get 503, then the process exits 0)."""

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


@pytest.fixture()
def long_checkpoint(tmp_path) -> Path:
    """A random model whose greedy answer to "a" runs the full MAX_TOKENS (no end-of-text on the way)."""
    tok = CharTokenizer(list("abcdefghij "))
    for seed in range(20):
        torch.manual_seed(seed)
        # Big enough that 450 tokens take a while even with the native decode step (~1 s on 2 cores).
        model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=512, n_layer=4, n_head=4, n_embd=256)).eval()
        out = generate(model, tok, "a", GenerateConfig(max_new_tokens=MAX_TOKENS, temperature=0))[0][0]
        if out.finish_reason == "length":
            return save_checkpoint(tmp_path / "long", model, tok, {"model": vars(model.config)})
    pytest.skip("no seed gave a run without end-of-text")


def test_sigterm_finishes_in_flight_requests_and_refuses_new_ones(long_checkpoint, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "gptforge.cli", "serve", "--checkpoint", str(long_checkpoint),
                                 "--port", str(port), "--device", "cpu"], stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)

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
        assert first.wait(30)
        proc.send_signal(signal.SIGTERM)
        for _ in range(200):  # until the server has seen the signal (a request before that is served)
            refused = httpx.post(url + "/v1/completions", json={"model": "long", "prompt": "a", "max_tokens": 2},
                                 timeout=10)
            if refused.status_code == 503:
                break
            time.sleep(0.01)
        streaming_when_refused = reader.is_alive()
        reader.join(60)
        assert proc.wait(30) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert streaming_when_refused  # the refusal really happened while a request was in flight
    assert refused.status_code == 503 and refused.headers["Retry-After"]
    assert refused.json()["error"]["code"] == "shutting_down"
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(l[6:]) for l in lines[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert len("".join(c["choices"][0]["text"] for c in chunks)) == MAX_TOKENS  # one character per token
