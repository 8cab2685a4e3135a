"""Greedy decoding speed of gptforge (float32 and int8) against Hugging Face ``transformers``, same weights.

    python benchmarks/decode.py [--new-tokens 128] [--prompt-tokens 32] [--batch-sizes 1 8] [--repeats 5]
                                [--skip-transformers] [--threads N] [--profile] [--profile-batch B]

Builds a randomly initialised GPT-2 124M (``GPT2LMHeadModel(GPT2Config())``, fixed seed), saves it with
``save_pretrained`` to a temporary folder and loads that folder into gptforge with ``load_hf_folder``, so
both libraries decode the same weights. Each configuration (library × precision × batch size) runs in a
process of its own, which loads the model and decodes once untimed; then ``--repeats`` rounds each time
every configuration once, in turn, so that a ratio compares runs seconds apart (the machine's speed
drifts over minutes). Reported: the median tokens/s (new tokens across the batch per second, prefill
included), the median of the within-round ratios to transformers, each process's peak resident memory
(``/proc/self/status`` VmHWM, reset after the warmup) and the CPU time other processes took during its
runs (a disturbed timing is flagged). The parent checks that gptforge's
float32 greedy tokens equal transformers' and compares batch-1 speed with the bound the machine's memory
bandwidth sets: a batch-1 step reads every weight once, so tokens/s ≤ bandwidth / weight bytes. A greedy
step of gptforge's float32 model reads the LM head's int8 argmax screen instead of the head (the same
tokens; gptforge.backends.cpu.ArgmaxScreen), so a second line gives the bound for the bytes it reads.
``--profile`` adds a breakdown of one gptforge decode step (linear layers vs. the rest vs. the engine).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

SEED = 0
PROMPT_SEED = 1
TARGETS = {  # (implementation, batch size) → minimum tokens/s ratio to transformers float32 at that batch size
    ("gptforge fp32", 1): 1.5,
    ("gptforge int8", 1): 2.5,
    ("gptforge fp32", 8): 2.0,
}
IMPLS = ("transformers fp32", "gptforge fp32", "gptforge int8")


# --------------------------------------------------------------------------------------------------
# Memory: peak resident set size of this process, resettable (Linux)
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def reset_peak_rss() -> bool:
    """Make VmHWM start again from the current RSS (Linux ≥ 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_ticks() -> tuple[int, int]:
    """(busy ticks of the whole machine, ticks of this process): the difference over a run is what
    other processes took, the sign that a timing was disturbed."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
    with open("/proc/self/stat") as f:
        own = f.read().rsplit(")", 1)[1].split()
    return busy, int(own[11]) + int(own[12])  # utime + stime


def weight_bytes_per_token(model: torch.nn.Module, screened: bool = False) -> int:
    """Bytes of weights one batch-1 decode step reads: every parameter and buffer once, except the
    embedding tables, of which only a row is read (a tied LM head is counted once, as the head).
    ``screened``: count what a greedy step reads, a screened LM head's int8 copy instead of its weight
    (gptforge.backends.cpu.ArgmaxScreen; the few candidates' float32 rows are left out)."""
    from gptforge.backends.cpu import PackedLinear

    seen, total = set(), 0
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            continue
        if isinstance(module, PackedLinear):  # its packed weight is neither a parameter nor a buffer
            screen = module.__dict__.get("_screen")
            total += screen.nbytes if screened and screen is not None else module.in_features * module.out_features * 4
        for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            if t is None or t.data_ptr() in seen or not t.is_floating_point() and t.dtype != torch.int8:
                continue
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


# --------------------------------------------------------------------------------------------------
# The reference folder and prompts (parent)
def make_folder(directory: Path, tiny: bool = False) -> None:
    """A seeded random GPT-2 124M saved as a Hugging Face folder, with a small tokenizer so that
    ``load_hf_folder`` accepts it (the benchmark feeds token ids; the tokenizer is never used)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from gptforge.tokenizer import BPETokenizer

    torch.manual_seed(SEED)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=64) if tiny else GPT2Config()
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(directory)
    BPETokenizer.train(["benchmark text, benchmark text"] * 4, vocab_size=260).save(directory)


def make_prompts(n: int, length: int, vocab_size: int = 50257) -> list[list[int]]:
    g = torch.Generator().manual_seed(PROMPT_SEED)
    return torch.randint(0, vocab_size - 1, (n, length), generator=g).tolist()  # never the EOS id


# --------------------------------------------------------------------------------------------------
# One configuration (child process)
def _load(spec: dict):
    folder = spec["folder"]
    if spec["impl"].startswith("transformers"):
        import transformers
        from transformers import GPT2LMHeadModel

        transformers.logging.set_verbosity_error()
        model = GPT2LMHeadModel.from_pretrained(folder).eval()
        eos = model.config.eos_token_id

        def run(prompts):
            ids = torch.tensor(prompts)
            with torch.inference_mode():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=spec["new_tokens"], min_new_tokens=spec["new_tokens"],
                                     pad_token_id=eos)
            return out[:, ids.shape[1]:].tolist()

        return model, run

    from gptforge.config import GenerateConfig
    from gptforge.convert import load_hf_folder
    from gptforge.generate import generate_ids

    from gptforge.backends import prepare_for_inference

    model = load_hf_folder(folder).model
    # What `gptforge generate` does after loading: int8 if asked, then prepacked float32 CPU linears.
    prepare_for_inference(model, quantize="int8" if spec["impl"].endswith("int8") else None)
    config = GenerateConfig(max_new_tokens=spec["new_tokens"], min_new_tokens=spec["new_tokens"], temperature=0.0)
    eos = 50256  # GPT-2's end-of-text; suppressed for min_new_tokens, as transformers does

    def run(prompts):
        return [c[0].token_ids for c in generate_ids(model, prompts, config, eos_id=eos)]

    return model, run


class _Worker:
    """One configuration (library × precision × batch size) in a process of its own, loaded and warmed up
    once, then timed a run at a time on request: :func:`main` interleaves the configurations run by run."""

    def __init__(self, spec: dict):
        self.spec = spec
        # stderr to a file, not a pipe: a worker that logs a lot must never block on a full pipe.
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True)
        self._ask(None)  # wait until loaded and warmed up

    def _ask(self, command: Optional[str]) -> dict:
        if command is not None:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith("{"):  # a library may print to stdout too; the replies are JSON objects
                return json.loads(line)
        self.proc.wait()
        self.log.seek(0)
        sys.stderr.write(self.log.read())
        raise SystemExit(f"the {self.spec['impl']} worker (batch {self.spec.get('batch')}) failed")

    def run(self) -> float:
        """One timed decode; its tokens/s."""
        return self.spec["new_tokens"] * self.spec["batch"] / self._ask("run")["seconds"]

    def finish(self) -> dict:
        result = self._ask("stop")
        self.proc.wait()
        return result


def worker(spec: dict) -> None:
    """The process behind :class:`_Worker`: load, decode once untimed, then answer ``run`` / ``stop`` lines."""
    torch.set_num_threads(spec["threads"])
    prompts = make_prompts(spec["batch"], spec["prompt_tokens"])
    model, run = _load(spec)
    import gc

    def reply(obj: dict) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    tokens = run(prompts)  # warmup (also the tokens compared across implementations)
    gc.collect()
    resettable = reset_peak_rss()
    rss_before = _status_kb("VmRSS")
    times, others = [], 0
    reply({"ready": True})
    for command in sys.stdin:
        if command.strip() != "run":
            break
        busy0, own0 = cpu_ticks()
        start = time.perf_counter()
        again = run(prompts)
        times.append(time.perf_counter() - start)
        busy1, own1 = cpu_ticks()
        others += max(0, (busy1 - busy0) - (own1 - own0))
        if again != tokens:
            raise RuntimeError(f"{spec['impl']}: greedy decoding gave different tokens on a repeated run")
        reply({"seconds": times[-1]})
    ticks = os.sysconf("SC_CLK_TCK") * sum(times) * (os.cpu_count() or 1)
    peak = _status_kb("VmHWM")
    reply({
        "impl": spec["impl"], "batch": spec["batch"], "tokens": tokens,
        "rss_before_mb": rss_before / 1024, "peak_rss_mb": peak / 1024,
        "peak_delta_mb": (peak - rss_before) / 1024 if resettable else None,
        "weight_bytes": weight_bytes_per_token(model),
        "screened_bytes": weight_bytes_per_token(model, screened=True), "threads": torch.get_num_threads(),
        "n_params": sum(p.numel() for p in model.parameters()),
        "others_cpu": others / ticks if ticks else 0.0,
    })


def measure_bandwidth(gib: float = 1.0, repeats: int = 7) -> dict:
    """Achievable memory bandwidth: best of ``repeats`` reductions (read) and copies (read + write) of 1 GiB."""
    n = int(gib * 2**30) // 4
    x = torch.ones(n)
    y = torch.empty(n)
    read, copy = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        read.append(time.perf_counter() - start)
        start = time.perf_counter()
        y.copy_(x)
        copy.append(time.perf_counter() - start)
    return {"impl": "bandwidth", "gib": gib, "read_gbs": n * 4 / min(read) / 1e9,
            "copy_gbs": 2 * n * 4 / min(copy) / 1e9}


def spawn_bandwidth(gib: float, threads: int) -> dict:
    """:func:`measure_bandwidth` in a fresh process (no model in memory)."""
    spec = {"gib": gib, "threads": threads}
    proc = subprocess.run([sys.executable, __file__, "--bandwidth", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit("the bandwidth measurement failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------
# Where a gptforge decode step spends its time (--profile)
def profile_step(folder: str, threads: int, int8: bool, batch: int = 1, context: int = 96, steps: int = 50) -> None:
    """One decode step (batch ``batch``, ``context`` cached tokens) timed whole and by parts."""
    from gptforge.convert import load_hf_folder
    from gptforge.backends import Int8Linear, prepare_for_inference
    from gptforge.backends.cpu import PackedLinear
    from gptforge.generate.sampler import greedy_tokens, sample_tokens

    torch.set_num_threads(threads)
    model = prepare_for_inference(load_hf_folder(folder).model, quantize="int8" if int8 else None)
    cache = model.new_kv_cache(batch, context + 1)
    token = torch.zeros(batch, 1, dtype=torch.long)

    def median_time(fn, n=steps):
        for _ in range(3):
            fn()
        ts = []
        for _ in range(n):
            start = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - start)
        return statistics.median(ts)

    with torch.inference_mode():
        model(torch.zeros(batch, context, dtype=torch.long), kv_cache=cache)

        def step():
            cache.length = context
            model(token, kv_cache=cache, position_ids=torch.full((batch, 1), context))

        def step_last_only():
            cache.length = context
            model(token, kv_cache=cache, position_ids=torch.full((batch, 1), context), last_only=True)

        linears = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, Int8Linear, PackedLinear))]
        xs = [torch.randn(batch, 1, m.in_features) for m in linears]

        def linears_only():
            for m, x in zip(linears, xs):
                m(x)

        def head_only():
            model.lm_head(xs[-1])

        def greedy_step():  # what a greedy step runs: the blocks, then the head's argmax (screened if it can)
            cache.length = context
            hidden = model.hidden_states(token, kv_cache=cache, position_ids=torch.full((batch, 1), context))
            greedy_tokens(model, hidden[:, -1])

        hidden_x = torch.nn.functional.layer_norm(torch.randn(batch, model.config.n_embd), (model.config.n_embd,))

        t_step = median_time(step)
        t_last = median_time(step_last_only)
        t_lin = median_time(linears_only)
        t_head = median_time(head_only)
        t_greedy = median_time(greedy_step)
        t_greedy_head = median_time(lambda: greedy_tokens(model, hidden_x))
        # A sampled token at temperature 1 from the final hidden states: through the screen (a draw by
        # rejection, sample_tokens), against the full head, softmax and inverse CDF.
        from gptforge.config import GenerateConfig
        from gptforge.generate.sampler import choose_tokens

        sampling = GenerateConfig(temperature=1.0)
        t_sample_head = median_time(lambda: sample_tokens(model, hidden_x, 1.0))
        t_full_sample = median_time(lambda: choose_tokens(model.lm_head(hidden_x), sampling))
        c = model.config
        q = torch.randn(batch, c.n_head, 1, c.head_dim)
        views = [(cache.k[i, :, :, :context + 1], cache.v[i, :, :, :context + 1]) for i in range(c.n_layer)]

        def attention_only():  # the n_layer attention products of a step, on the cache's own views
            for k, v in views:
                torch.nn.functional.scaled_dot_product_attention(q, k, v)

        t_attn = median_time(attention_only)
        logits = torch.randn(batch, model.config.vocab_size)
        t_argmax = median_time(lambda: logits.argmax(-1).tolist())

        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(10):
                step()
    name = "int8" if int8 else "fp32"
    print(f"\n--- gptforge {name} decode step, batch {batch}, {context} cached tokens ({threads} threads) ---")
    print(f"whole step (model forward)     {t_step * 1e3:7.2f} ms")
    print(f"  same with last_only=True     {t_last * 1e3:7.2f} ms")
    screened = getattr(model.lm_head, "screened", False)
    print(f"greedy step (blocks + argmax)  {t_greedy * 1e3:7.2f} ms (the head's argmax alone "
          f"{t_greedy_head * 1e3:.2f} ms{', through the argmax screen' if screened else ''})")
    print(f"a sampled token (T = 1)        {t_sample_head * 1e3:7.2f} ms from the hidden states"
          f"{' through the argmax screen' if screened else ''}, against {t_full_sample * 1e3:.2f} ms for the "
          f"full head, softmax and draw")
    print(f"linear layers alone ({len(linears)})       {t_lin * 1e3:7.2f} ms ({t_lin / t_step:.0%} of the step; "
          f"LM head {t_head * 1e3:.2f} ms)")
    print(f"attention (SDPA) alone ({model.config.n_layer})     {t_attn * 1e3:7.2f} ms ({t_attn / t_step:.0%})")
    rest = t_step - t_lin - t_attn
    print(f"rest (LayerNorm, GELU, adds, cache writes, Python/dispatch) {rest * 1e3:.2f} ms ({rest / t_step:.0%})")
    print(f"argmax + .tolist() of (B, V)   {t_argmax * 1e3:7.3f} ms")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


# --------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed rounds; each round times every configuration once (medians reported)")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch threads per run")
    parser.add_argument("--skip-transformers", action="store_true", help="gptforge only (no ratios, no token check)")
    parser.add_argument("--skip-int8", action="store_true")
    parser.add_argument("--profile", action="store_true", help="also break one gptforge decode step down")
    parser.add_argument("--profile-batch", type=int, default=1, metavar="B",
                        help="rows of the --profile step (the server runs up to 16)")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer, 64-wide model: checks the script runs")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--bandwidth", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    if args.bandwidth:
        spec = json.loads(args.bandwidth)
        torch.set_num_threads(spec["threads"])
        print(json.dumps(measure_bandwidth(spec["gib"])))
        return
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.profile_batch < 1:
        parser.error("--profile-batch must be at least 1")

    impls = [i for i in IMPLS if not (args.skip_transformers and i.startswith("transformers"))
             and not (args.skip_int8 and i.endswith("int8"))]
    with tempfile.TemporaryDirectory(prefix="gptforge-decode-") as tmp:
        make_folder(Path(tmp), tiny=args.tiny)
        base = {"folder": tmp, "threads": args.threads, "new_tokens": args.new_tokens,
                "prompt_tokens": args.prompt_tokens}
        gib = 1 / 16 if args.tiny else 1.0
        bandwidth = [spawn_bandwidth(gib, args.threads)]
        # Every configuration is loaded once in a process of its own; then each round times each of them
        # once, in turn. This machine's speed drifts by tens of percent over minutes (other tenants of the
        # host), so a ratio is taken within a round, between runs seconds apart, and the median over rounds
        # is reported.
        configs = [(impl, b) for b in args.batch_sizes for impl in impls]
        workers = {}
        try:
            for impl, b in configs:
                workers[impl, b] = _Worker({**base, "impl": impl, "batch": b})
            rounds = []
            for r in range(args.repeats):
                rounds.append({key: workers[key].run() for key in configs})
                print(f"  round {r + 1}/{args.repeats}: " + ", ".join(
                    f"{impl} b{b} {tps:.1f}" for (impl, b), tps in rounds[-1].items()), file=sys.stderr)
            results = {key: workers[key].finish() for key in configs}
        finally:
            for w in workers.values():
                if w.proc.poll() is None:
                    w.proc.kill()
        bandwidth.append(spawn_bandwidth(gib, args.threads))
        for key, r in results.items():
            r["tokens_per_s"] = statistics.median(rnd[key] for rnd in rounds)
            ref = ("transformers fp32", key[1])
            if ref in results and key != ref:
                ratios = [rnd[key] / rnd[ref] for rnd in rounds]
                r["ratio"], r["ratio_range"] = statistics.median(ratios), (min(ratios), max(ratios))
        report(args, impls, results, bandwidth)
        if args.profile:
            profile_step(tmp, args.threads, int8=False, batch=args.profile_batch)
            if "gptforge int8" in impls:
                profile_step(tmp, args.threads, int8=True, batch=args.profile_batch)


def report(args, impls, results, bandwidth: list[dict]) -> None:
    n_params = next(iter(results.values()))["n_params"]
    print(f"\nmachine          {os.cpu_count()} CPUs, {args.threads} torch threads, torch {torch.__version__}")
    print(f"model            GPT-2 {'tiny (--tiny)' if args.tiny else '124M'} shape ({n_params / 1e6:.1f}M parameters), random weights (seed {SEED}), "
          f"float32 unless int8")
    print(f"task             greedy, {args.prompt_tokens}-token random prompts, {args.new_tokens} new tokens "
          f"(min_new_tokens = max_new_tokens), 1 warmup, then {args.repeats} rounds that time every "
          f"configuration once in turn (one process per configuration); tokens/s: median over rounds; vs HF: "
          f"median over rounds of the ratio within a round")
    first, last = bandwidth[0], bandwidth[-1]
    print(f"bandwidth        {first['read_gbs']:.1f} GB/s read (sum of {first['gib']:g} GiB), "
          f"{first['copy_gbs']:.1f} GB/s copy (read + write) before the rounds; {last['read_gbs']:.1f} / "
          f"{last['copy_gbs']:.1f} GB/s after")
    print()
    header = f"{'implementation':<18} {'batch':>5} {'tokens/s':>9} {'ms/token':>9} {'vs HF':>6} " \
             f"{'HF range':>11} {'peak RSS MB':>11} {'decode +MB':>10} {'others':>6}  target"
    print(header)
    print("-" * len(header))
    verdicts = []
    for b in args.batch_sizes:
        for impl in impls:
            r = results[impl, b]
            ratio = r.get("ratio", 1.0 if impl.startswith("transformers") else None)
            spread = "{:.2f}-{:.2f}".format(*r["ratio_range"]) if "ratio_range" in r else "-"
            target = TARGETS.get((impl, b))
            verdict = ""
            if target is not None and ratio is not None:
                ok = ratio >= target
                verdict = f"≥ {target}x: {'PASS' if ok else 'FAIL'}"
                verdicts.append((impl, b, target, ratio, ok))
            delta = f"{r['peak_delta_mb']:.0f}" if r["peak_delta_mb"] is not None else "n/a"
            ms = 1e3 * b / r["tokens_per_s"]  # per decode step (one token for each row)
            print(f"{impl:<18} {b:>5} {r['tokens_per_s']:>9.1f} {ms:>9.1f} "
                  f"{(f'{ratio:.2f}x' if ratio else '-'):>6} {spread:>11} {r['peak_rss_mb']:>11.0f} {delta:>10} "
                  f"{r['others_cpu']:>6.0%}  {verdict}")
    print("(ms/token: per decode step, which gives every row one token. HF range: lowest and highest ratio to "
          "transformers over the rounds. peak RSS: during the timed runs, weights "
          "included; decode +MB: that peak over the RSS before them, i.e. the KV cache and activations. others: "
          "CPU time other processes took during the timed runs, as a share of the machine; above ~5% the "
          "timing was disturbed)")
    busy = [f"{impl} batch {b}" for (impl, b), r in results.items() if r["others_cpu"] > 0.05]
    if busy:
        print(f"WARNING: other processes used the CPUs during {', '.join(busy)}; rerun on a quiet machine")

    if ("transformers fp32", args.batch_sizes[0]) in results:
        print()
        for b in args.batch_sizes:
            if ("transformers fp32", b) not in results:
                continue
            hf = results["transformers fp32", b]["tokens"]
            for impl in [i for i in impls if i.startswith("gptforge")]:
                ours = results[impl, b]["tokens"]
                same = sum(x == y for r1, r2 in zip(ours, hf) for x, y in zip(r1, r2))
                total = sum(len(r) for r in hf)
                label = "tokens identical" if impl.endswith("fp32") else "int8 tokens equal to HF fp32"
                answer = ("yes" if ours == hf else "no") if impl.endswith("fp32") else f"{same}/{total}"
                print(f"{label + ' (' + impl + ', batch ' + str(b) + ')':<52} {answer}"
                      + (f" ({same}/{total} tokens)" if impl.endswith("fp32") and ours != hf else ""))

    if 1 in args.batch_sizes:
        print("\nbatch-1 bound from memory bandwidth (a step reads every weight once; KV cache ignored; the higher "
              "bandwidth figure):")
        read = max(bw["read_gbs"] for bw in bandwidth) * 1e9
        for impl in impls:
            r = results[impl, 1]
            for label, size in ((impl, r["weight_bytes"]), (impl + " greedy", r.get("screened_bytes"))):
                if label != impl and (size is None or size == r["weight_bytes"]):
                    continue  # no argmax screen: a greedy step reads the same bytes
                bound = read / size
                print(f"  {label:<25} {size / 1e6:7.1f} MB/token → ≤ {bound:6.1f} tokens/s; "
                      f"achieved {r['tokens_per_s']:.1f} = {r['tokens_per_s'] / bound:.0%} of the bound")
        if any(results[impl, 1].get("screened_bytes") != results[impl, 1]["weight_bytes"] for impl in impls):
            print("  (greedy: what a greedy step reads, the LM head's int8 argmax screen instead of its float32 "
                  "weight; the tokens are the float32 head's)")

    if verdicts:
        print("\ntargets:" + (" (set for the 124M model; --tiny only checks that the script runs)" if args.tiny else ""))
        for impl, b, target, ratio, ok in verdicts:
            print(f"  {impl} batch {b} ≥ {target}x transformers fp32 batch {b}: {ratio:.2f}x  {'PASS' if ok else 'FAIL'}")


if __name__ == "__main__":
    main()
