"""Monitor throughput: texts/s through `gptforge monitor`'s pipeline (a JSON-lines file in → results.jsonl,
alerts, windows and state.json out), for a demo-sized and a GPT-2-124M-sized classifier.

Reference, in the same process: `classify_texts` alone on the same texts at the same batch size (the
classifier's own speed), so that the monitor's overhead (reading, windows, appends with fsync, the atomic
state write per batch) reads as the ratio of the two. The texts are made-up news headlines with tickers and
times; the classifiers have random weights (the demo's `tiny` preset with its 4096-id vocabulary, and the
`gpt2` preset), a byte-level BPE trained on the headlines, and a fresh 3-label head: speed does not depend on
what the weights learned. `--demo-checkpoint runs/demo` puts the head on a trained demo model instead.

    .venv/bin/python benchmarks/monitor.py                      # both models, 300 texts
    .venv/bin/python benchmarks/monitor.py --models demo --texts 500 --batch-size 32
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import torch

LABELS = ["negative", "neutral", "positive"]
COMPANIES = {"ACME": "Acme Corp", "GLBX": "Globex", "INIT": "Initech", "UMBR": "Umbrella Labs", "HOOL": "Hooli"}
PHRASES = ["beats quarterly earnings estimates", "cuts full-year guidance as demand slumps", "names new chief financial "
           "officer", "shares jump after strong holiday sales in Europe and Asia", "faces regulatory probe over "
           "accounting practices", "to hold annual meeting next month", "wins major government contract",
           "recalls products over safety fears", "reports record revenue and raises its dividend",
           "shares unchanged in quiet trading"]


def headlines(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    start = datetime(2026, 12, 1, 9, 0, tzinfo=timezone.utc)
    rows = []
    for i in range(n):
        ticker = rng.choice(list(COMPANIES))
        rows.append({"time": (start + timedelta(minutes=i)).isoformat().replace("+00:00", "Z"), "key": ticker,
                     "text": f"{COMPANIES[ticker]} {rng.choice(PHRASES)}"})
    return rows


def build_classifier(kind: str, folder: Path, texts: list[str], demo_checkpoint: str | None) -> tuple[Path, int]:
    """A 3-label classifier saved at ``folder`` (random weights of the preset, or a trained demo base) and its
    number of parameters (counted here: prepacking on load moves linear weights out of ``parameters()``)."""
    from gptforge.checkpoint import build_task_model, load_checkpoint, save_checkpoint, task_model_state
    from gptforge.config import MODEL_PRESETS, ModelConfig
    from gptforge.model import GPT
    from gptforge.tokenizer import BPETokenizer

    task = {"type": "classify", "labels": LABELS, "chat_template": None}
    torch.manual_seed(0)
    if kind == "demo" and demo_checkpoint:
        loaded = load_checkpoint(demo_checkpoint)
        base, tok = loaded.model, loaded.tokenizer
    else:
        preset = {"demo": dict(MODEL_PRESETS["tiny"], vocab_size=4096), "gpt2": dict(MODEL_PRESETS["gpt2"]),
                  "tiny": dict(n_layer=1, n_head=2, n_embd=16, block_size=64, vocab_size=512)}[kind]
        tok = BPETokenizer.train(iter(texts * 3), vocab_size=min(preset["vocab_size"], 1024))
        base = GPT(ModelConfig(**{**preset, "dropout": 0.0}))
    model = build_task_model(base, task).eval()
    save_checkpoint(folder, model, tok, {"model": vars(base.config), "task": task}, state=task_model_state(model))
    return folder, sum(p.numel() for p in model.parameters())


def measure(kind: str, args: argparse.Namespace, work: Path) -> dict:
    from gptforge.config import MonitorConfig
    from gptforge.evaluate.predict import classify_texts
    from gptforge.monitor import load_classifier, run_monitor
    from gptforge.monitor import run as run_module

    rows = headlines(args.texts)
    texts = [r["text"] for r in rows]
    folder, n_params = build_classifier(kind, work / f"clf-{kind}", texts, args.demo_checkpoint)
    ckpt = load_classifier(str(folder), args.device)
    tokens = sum(len(ids) for ids in ckpt.tokenizer.encode_batch(texts)) / len(texts)
    classify_texts(ckpt.model, ckpt.tokenizer, texts[:args.batch_size], LABELS, batch_size=args.batch_size)  # warm-up
    source = work / f"news-{kind}.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    drawn = []
    real_draw = run_module.draw_trend

    def timed_draw(*a, **k):
        t = time.perf_counter()
        out = real_draw(*a, **k)
        drawn.append(time.perf_counter() - t)
        return out

    run_module.draw_trend = timed_draw
    monitor_s, alone_s = [], []
    try:
        for r in range(args.repeats):
            out = work / f"out-{kind}-{r}"
            config = MonitorConfig(checkpoint=str(ckpt.path), input=str(source), out=str(out), device=args.device,
                                   batch_size=args.batch_size, window_items=50, alerts=["negative:0.6"], plot_every=0)
            t = time.perf_counter()
            summary = run_monitor(config, checkpoint=ckpt)
            monitor_s.append(time.perf_counter() - t)
            assert summary.items == len(rows)
            t = time.perf_counter()
            classify_texts(ckpt.model, ckpt.tokenizer, texts, LABELS, batch_size=args.batch_size)
            alone_s.append(time.perf_counter() - t)
    finally:
        run_module.draw_trend = real_draw
    best_monitor, best_alone = min(monitor_s), min(alone_s)
    draw = min(drawn) if drawn else 0.0
    return {"kind": kind, "params": n_params, "tokens": tokens, "monitor": len(rows) / best_monitor,
            "monitor_no_plot": len(rows) / max(best_monitor - draw, 1e-9), "alone": len(rows) / best_alone,
            "draw": draw}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=["demo", "gpt2"], default=["demo", "gpt2"])
    parser.add_argument("--tiny", action="store_true", help="a one-layer model only (a smoke run)")
    parser.add_argument("--texts", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each; the best is reported")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--demo-checkpoint", default=None, help="a trained demo model for the demo-sized classifier")
    args = parser.parse_args()
    models = ["tiny"] if args.tiny else args.models
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs{load}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {args.device}")
    print(f"{args.texts} made-up headlines, batch size {args.batch_size}, best of {args.repeats}")
    with tempfile.TemporaryDirectory(prefix="gptforge-monitor-bench-") as tmp:
        for kind in models:
            r = measure(kind, args, Path(tmp))
            print(f"{kind:5s} classifier ({r['params'] / 1e6:.2f}M parameters, {r['tokens']:.1f} tokens/text): "
                  f"monitor {r['monitor']:.1f} texts/s ({r['monitor_no_plot']:.1f} without the final trend.png, "
                  f"drawn in {r['draw']:.2f} s); reference: classify_texts alone {r['alone']:.1f} texts/s; "
                  f"monitor / alone {r['monitor_no_plot'] / r['alone']:.2f}")


if __name__ == "__main__":
    main()
