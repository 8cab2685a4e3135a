"""Scoring candidates after a shared context: gptforge's ``score_ids`` against a loop of ``transformers`` forwards.

    python benchmarks/score.py [--candidates 100] [--context-tokens 200] [--candidate-tokens 20] [--repeats 3]
                               [--reference-candidates N] [--device auto] [--threads N] [--tiny]

Builds a randomly initialised GPT-2 124M (``GPT2LMHeadModel(GPT2Config())``, fixed seed; ``--tiny``: two small
layers, for the test suite), saves it with ``save_pretrained`` to a temporary folder and loads that folder into
gptforge with ``load_hf_folder`` and :func:`~gptforge.backends.prepare_for_inference` (as ``gptforge score``
does), so both score the same float32 weights. The context and the candidates are random token ids (candidate
lengths spread evenly over ±20% of ``--candidate-tokens``).

- gptforge: ``score_ids(model, context, candidates)``: the context prefilled once, its keys and values copied
  into one row per candidate, the candidates in one batched forward (chunked to 1 GiB of cache and logits);
- reference: what a user writes first: for each candidate, ``GPT2LMHeadModel`` on context + candidate, then
  log_softmax and gather over the candidate's positions. ``--reference-candidates N`` times the loop over the
  first N candidates only (each iteration costs the same, so the rate is the loop's rate) to keep a slow CPU run
  short; the scores of those N are compared with gptforge's.

Each round times gptforge, then the reference, then (unless ``--skip-batched``) transformers on every
context + candidate row right-padded into batches of 25 (a user who batches, but recomputes the context for
every row), so ratios compare runs seconds apart. Reported: candidates/s (median over rounds), the median
of the per-round ratios, and the largest difference between the two libraries' totals. Target: 3x the loop.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

SEED = 0
DATA_SEED = 1
TARGET = 3.0
BATCHED_ROWS = 25


def make_folder(directory: Path, tiny: bool) -> None:
    """A seeded random GPT-2 (124M, or tiny) saved as a Hugging Face folder, with a small tokenizer so that
    ``load_hf_folder`` accepts it (the benchmark feeds token ids; the tokenizer is never used)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from gptforge.tokenizer import BPETokenizer

    torch.manual_seed(SEED)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=64) if tiny else GPT2Config()
    GPT2LMHeadModel(config).eval().save_pretrained(directory)
    BPETokenizer.train(["benchmark text, benchmark text"] * 4, vocab_size=260).save(directory)


def make_inputs(n: int, context_tokens: int, candidate_tokens: int, vocab_size: int):
    g = torch.Generator().manual_seed(DATA_SEED)
    context = torch.randint(0, vocab_size - 1, (context_tokens,), generator=g).tolist()  # never the EOS id
    spread = max(1, candidate_tokens // 5)
    lengths = [candidate_tokens - spread + (2 * spread * i) // max(1, n - 1) for i in range(n)]
    candidates = [torch.randint(0, vocab_size - 1, (max(1, k),), generator=g).tolist() for k in lengths]
    return context, candidates


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


@torch.inference_mode()
def reference_loop(model, context, candidates, device) -> list[float]:
    """The naive way: one full forward a candidate over context + candidate."""
    totals = []
    for cand in candidates:
        ids = torch.tensor([context + cand], device=device)
        logp = model(ids).logits[0, len(context) - 1:-1].float().log_softmax(-1)
        totals.append(logp.gather(-1, ids[0, len(context):, None]).sum().item())
    return totals


@torch.inference_mode()
def reference_batched(model, context, candidates, device) -> list[float]:
    """Batches of context + candidate rows, right-padded (the context recomputed in every row)."""
    totals = []
    for start in range(0, len(candidates), BATCHED_ROWS):
        chunk = candidates[start:start + BATCHED_ROWS]
        width = len(context) + max(len(c) for c in chunk)
        rows = [context + c + [0] * (width - len(context) - len(c)) for c in chunk]
        mask = [[1] * (len(context) + len(c)) + [0] * (width - len(context) - len(c)) for c in chunk]
        ids = torch.tensor(rows, device=device)
        logits = model(ids, attention_mask=torch.tensor(mask, device=device)).logits
        logp = logits[:, len(context) - 1:-1].float().log_softmax(-1)
        picked = logp.gather(-1, ids[:, len(context):, None])[..., 0]
        for r, c in enumerate(chunk):
            totals.append(picked[r, :len(c)].sum().item())
    return totals


def rate_text(value: float) -> str:
    """Three significant digits or more, ten characters wide."""
    return f"{value:10,.1f}" if value >= 100 else f"{value:10.3g}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--candidates", type=int, default=100)
    p.add_argument("--context-tokens", type=int, default=200)
    p.add_argument("--candidate-tokens", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (each times every implementation once)")
    p.add_argument("--reference-candidates", type=int, default=None,
                   help="time the reference loop over the first N candidates only (default: all)")
    p.add_argument("--skip-batched", action="store_true", help="leave out the batched transformers reference")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--tiny", action="store_true", help="a two-layer model (for the test suite)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)

    import transformers
    from transformers import GPT2LMHeadModel

    from gptforge.backends import prepare_for_inference
    from gptforge.convert import load_hf_folder
    from gptforge.generate import score_ids

    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        make_folder(Path(tmp), args.tiny)
        hf = GPT2LMHeadModel.from_pretrained(tmp).to(device).eval()
        ours = load_hf_folder(tmp, device=device).model
        prepare_for_inference(ours)
    ours.eval()
    n_ref = min(args.reference_candidates or args.candidates, args.candidates)
    context, candidates = make_inputs(args.candidates, args.context_tokens, args.candidate_tokens,
                                      hf.config.vocab_size)
    n_tokens = sum(len(c) for c in candidates)
    name = "tiny GPT-2" if args.tiny else "GPT-2 124M"
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{name} (random weights, float32) on {where}: {args.candidates} candidates of "
          f"{min(map(len, candidates))}-{max(map(len, candidates))} tokens ({n_tokens} in all) after a "
          f"{len(context)}-token context")

    # Warm up (kernels, allocator) and compare the scores once.
    ours_totals = [s.total for s in score_ids(ours, context, candidates)]
    ref_totals = reference_loop(hf, context, candidates[:min(n_ref, 4)], device)
    reference_loop(hf, context, candidates[:1], device)
    if not args.skip_batched:
        reference_batched(hf, context, candidates[:2], device)

    times = {"gptforge": [], "loop": [], "batched": []}
    for r in range(args.repeats):
        t, got = timed(lambda: score_ids(ours, context, candidates), device)
        times["gptforge"].append(t)
        ours_totals = [s.total for s in got]
        t, ref_totals = timed(lambda: reference_loop(hf, context, candidates[:n_ref], device), device)
        times["loop"].append(t)
        if not args.skip_batched:
            t, batched_totals = timed(lambda: reference_batched(hf, context, candidates, device), device)
            times["batched"].append(t)
        print(f"round {r + 1}: gptforge {times['gptforge'][-1]:.3f} s, transformers loop {times['loop'][-1]:.3f} s "
              f"({n_ref} candidates)" + ("" if args.skip_batched else f", batched {times['batched'][-1]:.3f} s"),
              file=sys.stderr)

    rate = {"gptforge": args.candidates, "loop": n_ref, "batched": args.candidates}
    per_s = {k: [rate[k] / t for t in v] for k, v in times.items() if v}
    ratios = [a / b for a, b in zip(per_s["gptforge"], per_s["loop"])]
    diff = max(abs(a - b) for a, b in zip(ours_totals, ref_totals))
    print(f"gptforge score_ids            {rate_text(statistics.median(per_s['gptforge']))} candidates/s")
    print(f"transformers loop (reference) {rate_text(statistics.median(per_s['loop']))} candidates/s"
          + (f"  (timed over the first {n_ref})" if n_ref < args.candidates else ""))
    if "batched" in per_s:
        print(f"transformers batched ({BATCHED_ROWS} rows) {rate_text(statistics.median(per_s['batched']))} candidates/s")
        print(f"ratio to batched transformers  {statistics.median(a / b for a, b in zip(per_s['gptforge'], per_s['batched'])):.2f}x")
    ratio = statistics.median(ratios)
    print(f"ratio to the loop              {ratio:.2f}x (target {TARGET:.0f}x: {'met' if ratio >= TARGET else 'NOT met'}; "
          f"rounds {', '.join(f'{x:.2f}' for x in ratios)})")
    print(f"largest difference of a candidate's total log-probability: {diff:.2e} nats "
          f"(over {len(ref_totals)} candidates)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
