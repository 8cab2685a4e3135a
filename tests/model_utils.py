"""Helpers shared by test folders: tiny checkpoints on disk, and model properties several models must have.

Import as ``from tests.model_utils import ...`` (pytest runs with --import-mode=importlib).
"""

from __future__ import annotations

from pathlib import Path

import torch

from gptforge.checkpoint import save_checkpoint
from gptforge.config import ModelConfig
from gptforge.model import GPT
from gptforge.tokenizer import CharTokenizer


def save_tiny_checkpoint(path: Path, chars: str, *, block_size: int, n_layer: int, n_embd: int,
                         n_head: int = 2, seed: int = 0) -> Path:
    """A seeded random GPT with a character tokenizer over ``chars``, saved as a checkpoint folder at ``path``."""
    torch.manual_seed(seed)
    tok = CharTokenizer(list(chars))
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head,
                            n_embd=n_embd))
    return save_checkpoint(path, model, tok, {"model": vars(model.config)})


def assert_left_padding_matches_unpadded(m: GPT, vocab_size: int) -> None:
    """Two prompts of lengths 9 and 5, the short one left-padded and masked, give the logits each gives
    alone, also one cached step later with a growing mask."""
    a = torch.randint(0, vocab_size, (1, 9))
    b = torch.randint(0, vocab_size, (1, 5))
    pad = 4
    batch = torch.cat([a, torch.cat([torch.zeros(1, pad, dtype=torch.long), b], dim=1)])
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :pad] = 0
    out = m(batch, attention_mask=mask)
    assert torch.allclose(out[0], m(a)[0], atol=1e-5)
    assert torch.allclose(out[1, pad:], m(b)[0], atol=1e-5)
    # and incrementally, with a cache and a growing mask
    cache = m.new_kv_cache(2)
    m(batch, kv_cache=cache, attention_mask=mask)
    nxt = torch.tensor([[5], [6]])
    step = m(nxt, kv_cache=cache, attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1))
    assert torch.allclose(step[1, -1], m(torch.cat([b, nxt[1:]], dim=1))[0, -1], atol=1e-5)


def reseal(folder: Path) -> None:
    """Record the checksums of ``folder``'s files as they are now, as if the checkpoint had been saved with
    them: a damaged file then reaches the content checks behind the checksum (a foreign file copied in and
    sealed, or a checkpoint from before checksums)."""
    from gptforge.checkpoint import _write_marker

    _write_marker(Path(folder))
