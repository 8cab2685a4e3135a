"""gptforge.generate.sampler: inverse-CDF draws from the right distribution, reproducibly."""

import math

import pytest
import torch

import gptforge.model.sampling as drawing
from gptforge.config import GenerateConfig, ModelConfig
from gptforge.generate.sampler import choose_tokens, greedy_tokens, make_generator, sample, sample_tokens, screened
from gptforge.model import GPT


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    n = counts.sum().item()
    expected = probs * n
    keep = expected > 0
    return (((counts - expected) ** 2)[keep] / expected[keep]).sum().item()


def test_draws_follow_the_distribution_and_never_pick_zero_probability_tokens():
    torch.manual_seed(0)
    probs = torch.tensor([0.0, 0.05, 0.0, 0.15, 0.3, 0.5, 0.0])  # zeros first, middle and last
    n = 20_000
    tokens = sample(probs.expand(n, -1).contiguous())
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    assert counts[probs == 0].sum() == 0
    # 3 degrees of freedom: the 0.999 quantile of chi-square(3) is 16.27.
    assert chi_square(counts, probs.double()) < 16.27


def test_unnormalised_weights_and_a_large_vocabulary():
    g = torch.Generator().manual_seed(1)
    weights = torch.zeros(50_257)
    weights[[7, 1000, 50_256]] = torch.tensor([1.0, 2.0, 5.0])  # sums to 8, not 1
    tokens = torch.cat([sample(weights.unsqueeze(0), [g]) for _ in range(4000)])
    counts = torch.bincount(tokens, minlength=weights.numel()).double()
    assert counts.sum() == counts[[7, 1000, 50_256]].sum()
    assert chi_square(counts, weights.double() / 8) < 13.82  # 2 dof, 0.999 quantile


def test_each_row_draws_from_its_own_generator_whatever_the_batch():
    torch.manual_seed(0)
    probs = torch.randn(5, 300).softmax(-1)
    together = sample(probs, [make_generator(42 + i, torch.device("cpu")) for i in range(5)])
    alone = [sample(probs[i:i + 1], [torch.Generator().manual_seed(42 + i)]).item() for i in range(5)]
    assert together.tolist() == alone
    again = sample(probs, [make_generator(42 + i, torch.device("cpu")) for i in range(5)])
    assert torch.equal(together, again)


def test_a_uniform_rounded_up_to_the_total_still_picks_a_possible_token(monkeypatch):
    # u * total can round up to total; the last token here has probability 0 and must not be chosen.
    real_rand = torch.rand
    monkeypatch.setattr(drawing.torch, "rand", lambda *a, **k: torch.ones_like(real_rand(*a, **k)))
    probs = torch.tensor([[0.2, 0.3, 0.5, 0.0, 0.0], [0.5, 0.0, 0.25, 0.0, 0.25]])
    assert sample(probs).tolist() == [2, 4]


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_choose_tokens_uses_the_same_sampler(temperature):
    logits = torch.randn(3, 40)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = choose_tokens(logits, GenerateConfig(temperature=temperature), [g1] * 3)
    probs = (logits / temperature).softmax(-1)
    b = sample(probs, [g2] * 3)
    assert torch.equal(a, b)
    assert not math.isnan(float(a.sum()))


def gpt(seed: int) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(n_layer=2, n_head=2, n_embd=64, block_size=96, vocab_size=2000)).eval()


@torch.no_grad()
def test_greedy_tokens_without_a_screen_is_the_logits_argmax():
    model = gpt(1)
    assert not screened(model)
    hidden = model.hidden_states(torch.tensor([[3, 4, 5]]))[:, -1]
    logits = model.lm_head(hidden)
    assert torch.equal(greedy_tokens(model, hidden), logits.argmax(-1))
    best = int(logits.argmax(-1))
    logits[:, best] = float("-inf")
    assert torch.equal(greedy_tokens(model, hidden, suppress=best), logits.argmax(-1))


@torch.no_grad()
def test_sample_tokens_without_a_screen_samples_the_logits():
    model = gpt(2)
    hidden = model.hidden_states(torch.tensor([[3, 4, 5]]))[:, -1].repeat(4, 1)
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 1, 3)]
    a = sample_tokens(model, hidden, 1.0, gens)
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 1, 3)]
    assert torch.equal(a, sample_tokens(model, hidden, [1.0] * 4, gens)) and a[0] == a[2]
    best = int(model.lm_head(hidden[:1]).argmax())
    cold = sample_tokens(model, hidden, 0.01, None, suppress=best)
    assert not bool((cold == best).any())
    with pytest.raises(ValueError):
        sample_tokens(model, hidden, [1.0, 1.0])
    with pytest.raises(ValueError, match="temperatures > 0"):
        sample_tokens(model, hidden, 0.0)
