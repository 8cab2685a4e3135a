"""Tiny Hugging Face GPT-2 folders built offline, for tests that compare gptforge with ``transformers``.

Import as ``from tests.hf_utils import make_hf_gpt2_folder`` (pytest runs with --import-mode=importlib).
"""

from __future__ import annotations

from pathlib import Path

import torch

from gptforge.tokenizer import BPETokenizer

TEXT = (
    "First Citizen: Before we proceed any further, hear me speak.\n"
    "All: Speak, speak.\n"
    "First Citizen: You are all resolved rather to die than to famish?\n"
    "All: Resolved. resolved.\n"
    "First Citizen: First, you know Caius Marcius is chief enemy to the people.\n"
    "Ünïcödé wörds and émojis 🙂 keep the byte-level fallback honest.\n"
)


def train_tiny_bpe(vocab_size: int = 320) -> BPETokenizer:
    """A byte-level BPE with a few dozen merges learned from :data:`TEXT`."""
    return BPETokenizer.train([TEXT] * 4, vocab_size=vocab_size)


def make_hf_gpt2_folder(
    path: str | Path,
    *,
    tie_word_embeddings: bool = True,
    safetensors: bool = True,
    seed: int = 0,
    n_layer: int = 2,
    n_head: int = 2,
    n_embd: int = 64,
    n_positions: int = 64,
    activation_function: str = "gelu_new",
    n_inner: int | None = None,
):
    """Write a seeded, randomly initialised GPT2LMHeadModel and its tokenizer.json into ``path``.

    Returns the transformers model (eval mode). Biases and LayerNorm parameters get random values too, so
    a test that mixes up or drops one of them fails instead of passing on zeros and ones.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tiny_bpe()
    tokenizer.save(path)
    config = GPT2Config(
        vocab_size=tokenizer.vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
        n_head=n_head, n_inner=n_inner, activation_function=activation_function,
        tie_word_embeddings=tie_word_embeddings, bos_token_id=tokenizer.eos_id, eos_token_id=tokenizer.eos_id,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.2 * torch.randn(param.shape, generator=generator))
    if safetensors:
        model.save_pretrained(path)
    else:
        # transformers 5 writes safetensors only; a pickle is what older GPT-2 repos hold.
        config.save_pretrained(path)
        torch.save(model.state_dict(), path / "pytorch_model.bin")
    return model
