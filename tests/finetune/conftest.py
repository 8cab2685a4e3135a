"""Shared fixtures for the fine-tuning tests: a tiny random GPT checkpoint and small, learnable data sets.

The data sets are made so that a randomly initialised 2-layer, 32-wide character-level model learns them
in a few dozen steps on a CPU:

- classify: a few filler words plus "good" (label pos) or "bad" (label neg) somewhere in the text;
- tokens: names (PER), places (LOC, optionally two words: "upper jena") and filler words (O), each kind
  starting with letters no other kind starts with (a causal model reads a word's tag at its first
  character);
- lm: prompt "say X:" and completion " X X" (the completion repeats a word from the prompt).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from gptforge.config import FinetuneConfig
from tests.model_utils import save_tiny_checkpoint

CHARS = list("abcdefghijklmnopqrstuvwxyz .:<>|\n")
FILLER = ["the", "movie", "was", "plot", "actors", "scene", "very", "quite", "really"]
PER = ["zed", "quinn", "xavi"]
LOC = ["kyiv", "jena", "lima"]
OTHER = ["then", "met", "in", "saw", "at", "and", "visited"]


def classify_examples(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.choice(["pos", "neg"])
        words = [rng.choice(FILLER) for _ in range(4)]
        words.insert(rng.randrange(5), "good" if label == "pos" else "bad")
        out.append({"text": " ".join(words), "label": label})
    return out


def token_examples(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        tokens, tags = [], []
        for _ in range(rng.randint(3, 6)):
            kind = rng.random()
            if kind < 0.25:
                tokens.append(rng.choice(PER)); tags.append("B-PER")
            elif kind < 0.4:
                tokens.append(rng.choice(LOC)); tags.append("B-LOC")
            elif kind < 0.5:
                tokens += ["upper", rng.choice(LOC)]; tags += ["B-LOC", "I-LOC"]
            else:
                tokens.append(rng.choice(OTHER)); tags.append("O")
        out.append({"tokens": tokens, "tags": tags})
    return out


def lm_examples(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": f"say {w}:", "completion": f" {w} {w}"} for w in (rng.choice(FILLER) for _ in range(n))]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def base_checkpoint(tmp_path_factory) -> Path:
    """A randomly initialised tiny GPT (2 layers, width 32, context 64) with a character tokenizer."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("base") / "ckpt", CHARS, block_size=64, n_layer=2, n_embd=32)


@pytest.fixture(scope="session")
def datasets(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """(train, val) JSONL files per task."""
    root = tmp_path_factory.mktemp("ftdata")
    return {
        "classify": (write_jsonl(root / "cls_train.jsonl", classify_examples(160, 1)),
                     write_jsonl(root / "cls_val.jsonl", classify_examples(40, 2))),
        "tokens": (write_jsonl(root / "tok_train.jsonl", token_examples(160, 3)),
                   write_jsonl(root / "tok_val.jsonl", token_examples(40, 4))),
        "lm": (write_jsonl(root / "lm_train.jsonl", lm_examples(120, 5)),
               write_jsonl(root / "lm_val.jsonl", lm_examples(30, 6))),
    }


@pytest.fixture
def make_config(base_checkpoint, datasets, tmp_path):
    """``make_config(task, **keys)`` → a FinetuneConfig on the task's data, writing into tmp_path/run."""

    def make(task: str = "classify", **keys) -> FinetuneConfig:
        train, val = datasets[task]
        values = dict(task=task, checkpoint=str(base_checkpoint), train_file=str(train), val_file=str(val),
                      out_dir=str(tmp_path / "run"), max_steps=6, batch_size=16, eval_interval=3,
                      learning_rate=3e-3, warmup_steps=2, dropout=0.0, device="cpu")
        values.update(keys)
        return FinetuneConfig(**values).validate()

    return make
