"""Serving throughput and latency of ``gptforge serve`` under concurrent streaming requests, against
Hugging Face ``transformers``' batched ``generate`` on the same weights.

    python benchmarks/serve.py [--concurrency 1 4 16] [--max-tokens 128] [--prompt-tokens 32]
                               [--hf-batch 8] [--repeats 3] [--target 4.0] [--server-args='FLAGS'] [--tiny]

Builds a seeded random GPT-2 124M (``GPT2LMHeadModel(GPT2Config())``) saved as a Hugging Face folder with a
byte-level BPE tokenizer of about GPT-2's size trained on random words (gptforge loads such a folder
directly), starts ``gptforge serve`` on it
on a free loopback port, and for each concurrency level sends that many streaming ``/v1/completions``
requests at once (``max_tokens``, temperature 1, ``stream_options.include_usage`` for the exact token
count). OpenAI's API has no ``ignore_eos``; with random weights end-of-text is about one draw in 50,257, so
nearly every request runs its full length, and the figures use the tokens actually generated. It reports
per level:

- **tokens/s**: completion tokens of all requests / wall time from the first request sent to the last
  stream ended (the server's own count from ``usage``; streamed chunks where the server gives none);
- **TTFT p50 / p99**: time from sending a request to its first streamed text;
- **ITL p50 / p99**: time between consecutive streamed chunks of a request (all requests pooled).

The reference is ``transformers`` decoding ``--hf-batch`` copies of the prompt with ``generate`` (greedy,
``min_new_tokens = max_new_tokens``) in this process, loaded and warmed up once, timed while the server
idles. The machine's speed drifts by tens of percent over minutes, so ``--repeats`` rounds each run every
concurrency level and then transformers once, in turn; a level's figures are the median over rounds, and
the ratio is the median of the within-round ratios (highest concurrency / transformers), with its range.
PASS when that ratio reaches ``--target``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import socket
import statistics
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SEED = 0
MODEL_NAME = "gpt2-random"
WORDS = ("the quick brown fox jumps over the lazy dog while a small model learns to serve many "
         "requests at once and every token streams back to the client as soon as it is decided").split()


# --------------------------------------------------------------------------------------------------
def make_folder(directory: Path, tiny: bool) -> None:
    """A seeded random GPT-2 (124M, or a tiny one for smoke tests) as a Hugging Face folder + BPE tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from gptforge.tokenizer import BPETokenizer

    torch.manual_seed(SEED)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=64) if tiny else GPT2Config()
    GPT2LMHeadModel(config).eval().save_pretrained(directory)
    # A tokenizer as big as GPT-2's (about 50k ids, trained in seconds on random words), so that what a
    # random model samples decodes to text and streams as it would from a trained one.
    rng = random.Random(SEED)
    words = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 7))) for _ in range(800_000)]
    texts = [" ".join(WORDS)] * 8 + [" ".join(words[i:i + 200]) for i in range(0, len(words), 200)]
    BPETokenizer.train(texts, vocab_size=config.vocab_size).save(directory)


def make_prompt(tokenizer, n_tokens: int) -> str:
    """Text of about ``n_tokens`` tokens under the benchmark's tokenizer."""
    words: list[str] = []
    i = 0
    while len(tokenizer.encode(" ".join(words))) < n_tokens:
        words.append(WORDS[i % len(WORDS)])
        i += 1
    return " ".join(words)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


# --------------------------------------------------------------------------------------------------
# The server
def start_server(folder: Path, port: int, log_path: Path, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "gptforge.cli", "serve", "--checkpoint", str(folder), "--host", "127.0.0.1",
           "--port", str(port), "--device", "cpu", "--model-name", MODEL_NAME, *extra]
    with open(log_path, "wb") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def wait_ready(proc: subprocess.Popen, url: str, log_path: Path, timeout: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}:\n{log_path.read_text()}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"the server was not ready within {timeout:.0f} s:\n{log_path.read_text()}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=20)


async def one_request(client, url: str, prompt: str, max_tokens: int, seed: int) -> dict:
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 1.0, "seed": seed,
            "stream": True, "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    times: list[float] = []
    chunks = 0
    usage = None
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise SystemExit(f"HTTP {response.status_code}: {(await response.aread()).decode()[:500]}")
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices") or []:
                if choice.get("text"):
                    times.append(time.perf_counter())
                    chunks += 1
    done = time.perf_counter()
    tokens = usage["completion_tokens"] if usage else chunks
    return {"sent": sent, "done": done, "ttft": times[0] - sent if times else float("nan"),
            "itl": [b - a for a, b in zip(times, times[1:])], "tokens": tokens, "from_usage": usage is not None}


async def run_level(url: str, prompt: str, concurrency: int, max_tokens: int) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600), limits=limits) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(one_request(client, url, prompt, max_tokens, seed)
                                         for seed in range(concurrency)))
        wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)
    itl = [x for r in results for x in r["itl"]]
    ttft = [r["ttft"] for r in results]
    return {"concurrency": concurrency, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "ttft_p50_ms": 1000 * percentile(ttft, 50), "ttft_p99_ms": 1000 * percentile(ttft, 99),
            "itl_p50_ms": 1000 * percentile(itl, 50), "itl_p99_ms": 1000 * percentile(itl, 99),
            "counted_by": "usage" if all(r["from_usage"] for r in results) else "chunks"}


# --------------------------------------------------------------------------------------------------
# The reference: transformers' batched generate
class Transformers:
    """transformers' batched greedy ``generate`` on the same weights, loaded and warmed up once."""

    def __init__(self, folder: Path, prompt_ids: list[int], batch: int, max_new_tokens: int):
        from transformers import GPT2LMHeadModel
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        self.model = GPT2LMHeadModel.from_pretrained(folder).eval()
        self.batch = batch
        self.idx = torch.tensor([prompt_ids] * batch)
        self.kwargs = dict(attention_mask=torch.ones_like(self.idx), max_new_tokens=max_new_tokens,
                           min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=self.model.config.eos_token_id)
        with torch.inference_mode():
            self.model.generate(self.idx, **{**self.kwargs, "max_new_tokens": 8, "min_new_tokens": 8})

    def run(self) -> dict:
        with torch.inference_mode():
            start = time.perf_counter()
            out = self.model.generate(self.idx, **self.kwargs)
            wall = time.perf_counter() - start
        new = (out.shape[1] - self.idx.shape[1]) * self.batch
        return {"batch": self.batch, "tokens": new, "wall_s": wall, "tokens_per_s": new / wall}


# --------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--hf-batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of (every level, then transformers)")
    parser.add_argument("--target", type=float, default=4.0,
                        help="PASS when the server at the highest concurrency reaches this × transformers' tokens/s")
    parser.add_argument("--server-args", default="", metavar="'FLAGS'",
                        help="more `gptforge serve` flags, in one quoted string (write --server-args='--no-batch-invariant'; the = is needed)")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model, for a quick smoke run")
    parser.add_argument("--json", default=None, metavar="OUT", help="also write the figures to this file")
    args = parser.parse_args()
    if args.repeats < 1 or args.max_tokens < 1 or args.hf_batch < 1 or min(args.concurrency) < 1:
        parser.error("--repeats, --max-tokens, --hf-batch and --concurrency must be at least 1")

    from gptforge.tokenizer import load_tokenizer

    with tempfile.TemporaryDirectory(prefix="gptforge-serve-bench-") as tmp:
        folder = Path(tmp) / "gpt2-random"
        make_folder(folder, args.tiny)
        tokenizer = load_tokenizer(folder)
        prompt = make_prompt(tokenizer, args.prompt_tokens)
        prompt_ids = tokenizer.encode(prompt)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log_path = Path(tmp) / "serve.log"
        print(f"model: random GPT-2 {'tiny' if args.tiny else '124M'}; prompt {len(prompt_ids)} tokens; "
              f"{args.max_tokens} new tokens per request; {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}",
              flush=True)
        hf_model = Transformers(folder, prompt_ids, args.hf_batch, args.max_tokens)
        proc = start_server(folder, port, log_path, shlex.split(args.server_args))
        rounds: list[dict] = []
        try:
            wait_ready(proc, url, log_path)
            # Warm-up at the highest concurrency: first-call costs (the shared KV cache's pages are first
            # touched as rows fill it, ~1 GB for 16 rows of GPT-2's context) stay out of the figures.
            asyncio.run(run_level(url, prompt, max(args.concurrency), 16))
            for r in range(args.repeats):
                levels = [asyncio.run(run_level(url, prompt, n, args.max_tokens)) for n in args.concurrency]
                hf = hf_model.run()
                rounds.append({"levels": levels, "transformers": hf,
                               "ratio": levels[-1]["tokens_per_s"] / hf["tokens_per_s"]})
                print(f"round {r + 1}/{args.repeats}: " + ", ".join(
                    f"c{lv['concurrency']} {lv['tokens_per_s']:.1f}" for lv in levels)
                    + f", transformers b{hf['batch']} {hf['tokens_per_s']:.1f} tokens/s", flush=True)
        finally:
            stop_server(proc)

    def median(values):
        return statistics.median(values)

    print()
    summary = []
    for i, n in enumerate(args.concurrency):
        runs = [rd["levels"][i] for rd in rounds]
        level = {"concurrency": n, "tokens": round(median([x["tokens"] for x in runs])),
                 "wall_s": median([x["wall_s"] for x in runs]),
                 "counted_by": "usage" if all(x["counted_by"] == "usage" for x in runs) else "chunks"}
        for key in ("tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms"):
            level[key] = median([x[key] for x in runs])
        summary.append(level)
        print(f"server  concurrency {n:>3}: {level['tokens']:>5} tokens in {level['wall_s']:6.2f} s = "
              f"{level['tokens_per_s']:7.1f} tokens/s | TTFT p50 {level['ttft_p50_ms']:7.1f} ms "
              f"p99 {level['ttft_p99_ms']:7.1f} ms | ITL p50 {level['itl_p50_ms']:6.1f} ms "
              f"p99 {level['itl_p99_ms']:6.1f} ms ({level['counted_by']})")
    hf_rate = median([rd["transformers"]["tokens_per_s"] for rd in rounds])
    print(f"transformers generate batch {args.hf_batch}: {hf_rate:.1f} tokens/s")
    print(f"(medians over {args.repeats} rounds; each round runs every level, then transformers)")
    ratios = [rd["ratio"] for rd in rounds]
    ratio = median(ratios)
    verdict = "PASS" if ratio >= args.target else "FAIL"
    print(f"{verdict}: server at concurrency {args.concurrency[-1]} = {ratio:.2f}x transformers batch "
          f"{args.hf_batch} (range over rounds {min(ratios):.2f}-{max(ratios):.2f}; target {args.target}x)")
    if args.json:
        Path(args.json).write_text(json.dumps({"levels": summary, "rounds": rounds, "transformers_tokens_per_s": hf_rate,
                                               "ratio": ratio, "verdict": verdict}, indent=2) + "\n")


if __name__ == "__main__":
    main()
