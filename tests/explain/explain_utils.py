"""Checkpoints the explain tests share: a tiny random language model and a tiny classifier trained so that one
token decides its label.

Import as ``from tests.explain.explain_utils import ...`` (pytest runs with --import-mode=importlib).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
import torch.nn.functional as F

from gptforge.checkpoint import save_checkpoint, task_model_state
from gptforge.config import ModelConfig
from gptforge.heads import TaskModel
from gptforge.model import GPT
from gptforge.tokenizer import CharTokenizer
from tests.model_utils import save_tiny_checkpoint

LM_CHARS = "abcdefghijklmnopqrstuvwxyz .,\n"
CLF_LETTERS = "abcdefgh"
LABELS = ["no_z", "has_z"]


def save_lm(path: Path) -> Path:
    return save_tiny_checkpoint(path, LM_CHARS, block_size=64, n_layer=2, n_head=2, n_embd=32, seed=0)


def z_texts(n: int, rng: random.Random) -> tuple[list[str], list[int]]:
    """Eight letters from a-h, and in half of them one letter replaced by 'z' (label 1)."""
    texts, labels = [], []
    for i in range(n):
        letters = [rng.choice(CLF_LETTERS) for _ in range(8)]
        if i % 2:
            letters[rng.randrange(8)] = "z"
        texts.append("".join(letters))
        labels.append(i % 2)
    return texts, labels


def train_z_classifier(path: Path, steps: int = 300) -> Path:
    """A one-layer classifier that learns whether a text holds a 'z' (the only token that decides it)."""
    torch.manual_seed(0)
    rng = random.Random(0)
    tok = CharTokenizer(list(CLF_LETTERS + "z"))
    base = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=32))
    model = TaskModel(base, "classify", 2, dropout=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    texts, labels = z_texts(512, rng)
    ids = torch.tensor([tok.encode(t) for t in texts])
    y = torch.tensor(labels)
    for step in range(steps):
        batch = torch.randint(0, len(texts), (64,))
        loss = F.cross_entropy(model(ids[batch]), y[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    task = {"type": "classify", "labels": LABELS, "chat_template": None}
    return save_checkpoint(path, model, tok, {"model": vars(base.config), "task": task},
                           state=task_model_state(model))
