"""A moderation classifier whose decision is known: a character-level GPT whose weights are set by hand so that
a text is `toxic` exactly when it contains one chosen character.

Import as ``from tests.moderation.utils import ...`` (pytest runs with --import-mode=importlib).

How it decides (one layer, one head, 8 channels, every other weight 0):
- every position adds +1 / -1 on channels 1 / 2, and the chosen character also 10 on channel 0, so ln_1 of
  any other character is exactly 0 on channel 0 and positive for the chosen one;
- attention has zero queries and keys (uniform over the positions so far) and carries ln_1's channel 0 back
  to channel 0: at the last position it is the mean over the text, > 0 exactly when the character occurs;
- the head reads ln_f's channel 0: toxic logit 1000 · x0 - 2, ok logit 0. Without the character x0 = 0 and
  p(toxic) = sigmoid(-2) = 0.12; with it p(toxic) > 0.99 for any text that fits the context.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gptforge.checkpoint import build_task_model, save_checkpoint, task_model_state
from gptforge.config import ModelConfig
from gptforge.model import GPT
from gptforge.tokenizer import CharTokenizer

LABELS = ("ok", "toxic")
P_CLEAN = float(torch.sigmoid(torch.tensor(-2.0)))


def char_classifier(chars: str, bad: str, *, block_size: int = 128):
    """(TaskModel, tokenizer, task section): `toxic` exactly when the text contains ``bad``."""
    tok = CharTokenizer(list(chars))
    C = 8
    gpt = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=block_size, n_layer=1, n_head=1, n_embd=C,
                          bias=True, dropout=0.0))
    task = {"type": "classify", "labels": list(LABELS), "chat_template": None}
    model = build_task_model(gpt, task)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for ln in (gpt.blocks[0].ln_1, gpt.blocks[0].ln_2, gpt.ln_f):
            ln.weight.fill_(1.0)
        gpt.wpe.weight[:, 1] = 1.0
        gpt.wpe.weight[:, 2] = -1.0
        gpt.wte.weight[tok.encode(bad)[0], 0] = 10.0
        gpt.blocks[0].attn.qkv.weight[2 * C + 0, 0] = 1.0  # v channel 0 = ln_1 channel 0
        gpt.blocks[0].attn.proj.weight[0, 0] = 1.0
        model.head.weight[1, 0] = 1000.0
        model.head.bias[1] = -2.0
    return model.eval(), tok, task


def save_char_classifier(path: Path, chars: str, bad: str, *, block_size: int = 128) -> Path:
    model, tok, task = char_classifier(chars, bad, block_size=block_size)
    config = {"model": vars(model.base.config), "task": task}
    return save_checkpoint(path, model, tok, config, state=task_model_state(model))


CHARS = "abcdefghijklmnopqrstuvwxyz .,\n"
SCRIPT = ("the quick brown fox jumps over the lazy dog, then the old fox rests in the sun all day long and "
          "the birds sing a happy song until the night falls on the quiet farm by the river bank ")
"""What :func:`reciting_lm` says: after a prompt of P tokens it continues with ``SCRIPT[P:]`` (its two `x` are in "fox", at 18 and 60)."""


def reciting_lm(script: str = SCRIPT, chars: str = CHARS, *, block_size: int = 128):
    """(GPT, tokenizer): a language model whose greedy next token depends only on its position: after a prompt
    of P tokens it generates ``script[P], script[P + 1], ...`` (whatever the prompt says).

    Every block is zero (the residual stream passes through), token embeddings are zero and position i's
    embedding is the one-hot e_i, so ln_f's output is largest on channel i; the untied LM head maps channel i
    to the token ``script[i + 1]``."""
    assert len(script) > block_size
    tok = CharTokenizer(list(chars))
    gpt = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=block_size, n_layer=1, n_head=1, n_embd=block_size,
                          bias=True, dropout=0.0, tie_embeddings=False))
    with torch.no_grad():
        for p in gpt.parameters():
            p.zero_()
        for ln in (gpt.blocks[0].ln_1, gpt.blocks[0].ln_2, gpt.ln_f):
            ln.weight.fill_(1.0)
        for i in range(block_size):
            gpt.wpe.weight[i, i] = 1.0
            gpt.lm_head.weight[tok.encode(script[i + 1])[0], i] = 10.0
    return gpt.eval(), tok


def save_reciting_lm(path: Path, script: str = SCRIPT, *, block_size: int = 128) -> Path:
    gpt, tok = reciting_lm(script, block_size=block_size)
    return save_checkpoint(path, gpt, tok, {"model": vars(gpt.config)})
