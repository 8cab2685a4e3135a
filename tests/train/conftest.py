"""Shared fixtures for the training tests: a tiny prepared corpus and a tiny run config."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from gptforge.config import RunConfig, build_run_config
from gptforge.data.prepare import prepare_corpus

TINY_MODEL = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, dropout=0.0)
TINY_TRAIN = dict(max_steps=4, batch_size=4, warmup_steps=2, learning_rate=3e-3, min_lr=3e-4,
                  eval_interval=2, eval_batches=2, log_interval=1, checkpoint_interval=2,
                  keep_checkpoints=2, tensorboard=False)


def write_corpus(path: Path, words: str, seed: int = 0, lines: int = 1500) -> Path:
    rng = random.Random(seed)
    vocab = words.split()
    path.write_text("\n".join(" ".join(rng.choice(vocab) for _ in range(10)) for _ in range(lines)) + "\n",
                    encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def corpus_writer():
    """The corpus-writing helper (a fixture because test modules cannot import conftest)."""
    return write_corpus


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A char-level prepared folder (about 60k train tokens)."""
    root = tmp_path_factory.mktemp("data")
    corpus = write_corpus(root / "corpus.txt", "the quick brown fox jumps over a lazy dog while cats sleep")
    prepare_corpus(corpus, root / "prepared", tokenizer="char")
    return root / "prepared"


@pytest.fixture
def make_config(data_dir, tmp_path):
    """``make_config(model={...}, **train)`` → a validated RunConfig writing into tmp_path/run."""

    def make(model: dict | None = None, data: Path | None = None, **train) -> RunConfig:
        return build_run_config({
            "model": {**TINY_MODEL, **(model or {})},
            "data": {"dir": str(data or data_dir)},
            "train": {"out_dir": str(tmp_path / "run"), **TINY_TRAIN, **train},
        })

    return make
