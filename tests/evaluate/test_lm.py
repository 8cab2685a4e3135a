"""evaluate_lm: loss, perplexity and bits per byte against models whose answers are known."""

import math

import numpy as np
import pytest
import torch

from gptforge.config import ModelConfig
from gptforge.evaluate import evaluate_lm
from gptforge.model import GPT

VOCAB = 7
DATA = (np.arange(500) % VOCAB).astype(np.uint16)  # every next token is (token + 1) % VOCAB


class Uniform(torch.nn.Module):
    def forward(self, idx):
        return torch.zeros(*idx.shape, VOCAB)


class Oracle(torch.nn.Module):
    """Puts almost all probability on the true next token of DATA."""

    def forward(self, idx):
        return torch.nn.functional.one_hot((idx + 1) % VOCAB, VOCAB).float() * 50.0


def run(model, **kw):
    args = dict(block_size=8, batch_size=4, num_batches=3, bytes_per_token=2.0, device="cpu")
    return evaluate_lm(model, DATA, **{**args, **kw})


def test_uniform_model_scores_log_vocab():
    m = run(Uniform())
    assert m["loss"] == pytest.approx(math.log(VOCAB))
    assert m["perplexity"] == pytest.approx(VOCAB)
    assert m["bits_per_byte"] == pytest.approx(math.log2(VOCAB) / 2.0)
    assert m["tokens"] == 3 * 4 * 8


def test_perfect_model_scores_zero_loss_and_perplexity_one():
    m = run(Oracle(), bytes_per_token=None)
    assert m["loss"] == pytest.approx(0.0, abs=1e-6)
    assert m["perplexity"] == pytest.approx(1.0)
    assert m["bits_per_byte"] is None


def test_same_seed_same_windows_and_mode_is_restored():
    model = GPT(ModelConfig(vocab_size=VOCAB, n_layer=1, n_head=2, n_embd=16, block_size=8, dropout=0.5))
    model.train()
    a, b = run(model), run(model)
    assert a == b  # dropout is off during evaluation and the windows are fixed by the seed
    assert model.training
    assert run(model, seed=1)["loss"] != a["loss"]


def test_data_shorter_than_one_window_is_refused():
    with pytest.raises(ValueError, match="a window needs 9"):
        evaluate_lm(Uniform(), DATA[:8], block_size=8, batch_size=1, num_batches=1, bytes_per_token=1.0,
                    device="cpu")
