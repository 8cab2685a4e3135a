"""Decoding: KV-cache greedy equals full recompute, seeds, sampling filters, streaming, context checks."""

import pytest
import torch

from gptforge.config import GenerateConfig, ModelConfig
from gptforge.errors import ConfigError
from gptforge.generate import filter_logits, generate_text, generate_tokens, stream_text
from gptforge.model import GPT
from gptforge.tokenizer import CharTokenizer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=300, block_size=64, n_layer=2, n_head=2, n_embd=32)).eval()


def test_cached_greedy_equals_recomputing_the_whole_context(model):
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    got = generate_tokens(model, prompt, GenerateConfig(max_new_tokens=30, temperature=0))[0]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(30):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert got == ids[len(prompt):]


def test_seed_makes_sampling_reproducible_and_samples_differ(model):
    cfg = GenerateConfig(max_new_tokens=15, temperature=1.0, seed=7, num_samples=4)
    a = generate_tokens(model, [1, 2, 3], cfg)
    assert a == generate_tokens(model, [1, 2, 3], cfg)
    assert len({tuple(r) for r in a}) > 1
    other = generate_tokens(model, [1, 2, 3], GenerateConfig(max_new_tokens=15, temperature=1.0, seed=8, num_samples=4))
    assert other != a


def test_top_k_one_is_greedy(model):
    greedy = generate_tokens(model, [5, 6], GenerateConfig(max_new_tokens=10, temperature=0))
    k1 = generate_tokens(model, [5, 6], GenerateConfig(max_new_tokens=10, temperature=1.5, top_k=1, seed=1))
    assert greedy == k1


def test_filters_keep_the_right_tokens():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 3.0]])
    kept = torch.isfinite(filter_logits(logits, top_k=2))
    assert kept.tolist() == [[True, False, False, False, True]]
    probs = logits.softmax(-1)[0]  # [0.23, 0.087, 0.053, 0.011, 0.63]
    kept = torch.isfinite(filter_logits(logits, top_p=0.7))[0]
    assert kept.tolist() == [True, False, False, False, True]
    assert probs[4] < 0.7 <= probs[4] + probs[0]
    kept = torch.isfinite(filter_logits(logits, top_p=0.5))[0]
    assert kept.tolist() == [False, False, False, False, True]  # the top token alone already reaches 0.5


def test_eos_ends_a_sample(model):
    prompt = [1, 2]
    first = generate_tokens(model, prompt, GenerateConfig(max_new_tokens=20, temperature=0))[0]
    j = next(i for i in range(1, len(first)) if first[i] not in first[:i])  # first new token after the start
    stopped = generate_tokens(model, prompt, GenerateConfig(max_new_tokens=20, temperature=0), eos_id=first[j])
    assert stopped[0] == first[:j]


def test_context_overflow_is_a_clear_error(model):
    with pytest.raises(ConfigError, match=r"prompt \(60 tokens\) \+ max_new_tokens \(10\) is longer than the model's context of 64"):
        generate_tokens(model, list(range(60)), GenerateConfig(max_new_tokens=10))


def test_streaming_pieces_concatenate_to_the_text(model):
    tok = CharTokenizer(list("abcdefgh é"))
    cfg = GenerateConfig(max_new_tokens=40, temperature=1.0, seed=3)
    pieces = list(stream_text(model, tok, "abc", cfg))
    assert "".join(pieces) == generate_text(model, tok, "abc", cfg)[0]
    assert all(pieces)
