"""Helpers of the monitor tests: tiny classifiers saved as checkpoints, and news-like JSON lines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

LABELS = ["negative", "neutral", "positive"]


def save_classifier(path: Path, *, favour: str | None = None, labels: Sequence[str] = tuple(LABELS)) -> Path:
    """A seeded random one-layer classifier over ``labels`` (demo-like BPE tokenizer). ``favour``: its head's
    bias makes every text that label (so a test knows what the monitor will see)."""
    import torch

    from gptforge.checkpoint import build_task_model, save_checkpoint, task_model_state
    from gptforge.config import ModelConfig
    from gptforge.model import GPT
    from gptforge.tokenizer import BPETokenizer

    text = ["Acme shares jump after strong sales\n", "Globex cuts guidance as demand slumps\n",
            "Initech names new chief financial officer\n"] * 20
    tok = BPETokenizer.train(iter(text), vocab_size=300)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=16))
    task = {"type": "classify", "labels": list(labels), "chat_template": None}
    task_model = build_task_model(model, task)
    if favour is not None:
        with torch.no_grad():
            task_model.head.bias.zero_()
            task_model.head.bias[labels.index(favour)] = 10.0
    return save_checkpoint(path, task_model, tok, {"model": vars(model.config), "task": task},
                           state=task_model_state(task_model))


HEADLINES = ["Acme shares jump after strong sales", "Globex cuts guidance as demand slumps",
             "Initech names new chief financial officer", "Acme faces regulatory probe",
             "Globex wins major contract", "Initech reports quarterly loss", "Acme board meets as planned"]


def news(n: int, *, keys=("ACME", "GLBX", "INIT"), start: int = 1_796_000_000, step: int = 60) -> list[dict]:
    """``n`` made-up headlines, each with a key and an epoch time ``step`` seconds after the last."""
    return [{"text": f"{HEADLINES[i % len(HEADLINES)]} ({i})", "key": keys[i % len(keys)], "time": start + i * step,
             "n": i} for i in range(n)]


def write_jsonl(path: Path, rows: list[dict], mode: str = "w") -> Path:
    with open(path, mode, encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
