"""Speculative decoding: greedy equals the target's plain greedy, sampling keeps the target's distribution."""

import itertools

import pytest
import torch

from gptforge.config import GenerateConfig, ModelConfig
from gptforge.errors import ConfigError
from gptforge.generate import generate_tokens
from gptforge.generate.speculative import speculative_generate
from gptforge.backends import prepare_for_inference
from gptforge.backends.cpu import panel_available
from gptforge.model import GPT

PROMPTS = [[3], [3, 1, 4], [1, 5, 9, 2, 6, 5, 3], [5, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6, 2]]
NEW = 30


@pytest.fixture(scope="module")
def target():
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=300, block_size=64, n_layer=2, n_head=2, n_embd=32)).eval()


@pytest.fixture(scope="module")
def small_draft():
    torch.manual_seed(1)
    return GPT(ModelConfig(vocab_size=300, block_size=48, n_layer=1, n_head=2, n_embd=16)).eval()


@pytest.fixture(scope="module")
def plain_greedy(target):
    return [generate_tokens(target, p, GenerateConfig(max_new_tokens=NEW, temperature=0))[0] for p in PROMPTS]


def check_stats(stats, out, k):
    assert stats["new_tokens"] == len(out)
    assert 0 <= stats["accepted"] <= stats["drafted"]
    assert stats["acceptance_rate"] == pytest.approx(stats["accepted"] / stats["drafted"])
    # Each verifying forward yields 1 to k + 1 tokens; one more forward prefills the prompt.
    assert -(-len(out) // (k + 1)) <= stats["target_forwards"] <= len(out) + 1


@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_with_the_target_as_draft_accepts_everything(target, plain_greedy, k):
    for prompt, expected in zip(PROMPTS, plain_greedy):
        out, stats = speculative_generate(target, target, prompt, max_new_tokens=NEW, num_draft_tokens=k)
        assert out == expected
        check_stats(stats, out, k)
        assert stats["acceptance_rate"] == 1.0
        verify_rounds = stats["target_forwards"] - (len(prompt) > 1)
        assert verify_rounds == -(-NEW // (k + 1))  # every round but the last yields k + 1 tokens


@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_with_a_different_draft_still_equals_plain_greedy(target, small_draft, plain_greedy, k):
    accepted = drafted = 0
    for prompt, expected in zip(PROMPTS, plain_greedy):
        out, stats = speculative_generate(target, small_draft, prompt, max_new_tokens=NEW, num_draft_tokens=k)
        assert out == expected
        check_stats(stats, out, k)
        accepted += stats["accepted"]
        drafted += stats["drafted"]
    assert 0 < accepted < 0.9 * drafted  # rejections (and so cache rollbacks) did happen


@pytest.mark.skipif("not panel_available()", reason="the argmax screen needs the native panel kernel")
def test_prepared_models_read_their_argmax_screens_and_still_give_plain_greedy(target, small_draft, monkeypatch):
    import copy

    t, d = (prepare_for_inference(copy.deepcopy(m)) for m in (target, small_draft))
    assert t.lm_head.screened and d.lm_head.screened
    calls = []
    head = type(t.lm_head)
    original = head.argmax
    monkeypatch.setattr(head, "argmax", lambda self, *a, **k: calls.append(self) or original(self, *a, **k))
    for prompt in PROMPTS:
        want = generate_tokens(t, prompt, GenerateConfig(max_new_tokens=NEW, temperature=0))[0]
        calls.clear()
        out, _ = speculative_generate(t, d, prompt, max_new_tokens=NEW, num_draft_tokens=3)
        assert out == want
        assert any(m is t.lm_head for m in calls) and any(m is d.lm_head for m in calls)


def test_eos_ends_the_output_like_plain_greedy(target, plain_greedy):
    expected = plain_greedy[2]
    eos = expected[7]
    out, _ = speculative_generate(target, target, PROMPTS[2], max_new_tokens=NEW, num_draft_tokens=3, eos_id=eos)
    assert out == expected[:expected.index(eos)]


def test_mismatched_vocabularies_are_a_config_error(target):
    other = GPT(ModelConfig(vocab_size=301, block_size=64, n_layer=1, n_head=2, n_embd=16))
    with pytest.raises(ConfigError, match="vocabulary"):
        speculative_generate(target, other, [1, 2], max_new_tokens=4)


def test_the_smaller_block_size_bounds_the_context(target, small_draft):
    speculative_generate(target, small_draft, [1] * 18, max_new_tokens=30)  # 48 tokens: fits the draft
    with pytest.raises(ConfigError, match="context of 48 tokens"):
        speculative_generate(target, small_draft, [1] * 19, max_new_tokens=30)
    with pytest.raises(ConfigError, match="num_draft_tokens"):
        speculative_generate(target, small_draft, [1], max_new_tokens=3, num_draft_tokens=0)


# --------------------------------------------------------------------------------------------------
V = 6


def peaked_model(seed: int) -> GPT:
    """A tiny-vocabulary model with far-from-uniform next-token distributions."""
    torch.manual_seed(seed)
    model = GPT(ModelConfig(vocab_size=V, block_size=16, n_layer=1, n_head=1, n_embd=8)).eval()
    with torch.no_grad():
        model.wte.weight.mul_(15.0)
    return model


def probs(model, ids, temperature, top_k):
    from gptforge.generate import filter_logits

    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0, -1]
    return filter_logits(logits[None], temperature=temperature, top_k=top_k).softmax(-1)[0]


@pytest.mark.slow  # a chi-square test over 1,500 speculative runs a case, the longest statistical test
@pytest.mark.parametrize("temperature,top_k", [(1.0, None), (0.7, 4)])
def test_sampling_keeps_the_targets_joint_distribution(temperature, top_k):
    target, draft, prompt = peaked_model(10), peaked_model(11), [2, 0, 3]
    p1 = probs(target, prompt, temperature, top_k)
    joint = torch.stack([p1[a] * probs(target, prompt + [a], temperature, top_k) for a in range(V)])  # (V, V)
    q1 = probs(draft, prompt, temperature, top_k)
    assert 0.5 * (p1 - q1).abs().sum() > 0.2  # the draft is a poor guess, so rejections matter

    n = 1500
    counts = torch.zeros(V, V)
    generator = torch.Generator().manual_seed(0)
    accepted = drafted = 0
    for _ in range(n):
        out, stats = speculative_generate(target, draft, prompt, max_new_tokens=2, num_draft_tokens=3,
                                          temperature=temperature, top_k=top_k, generator=generator)
        counts[out[0], out[1]] += 1
        accepted += stats["accepted"]
        drafted += stats["drafted"]
    assert 0.1 < accepted / drafted < 0.95  # both the accept and the reject paths ran many times

    expected = joint * n
    cells = [(a, b) for a, b in itertools.product(range(V), range(V)) if expected[a, b] >= 5]
    assert sum(counts[a, b] for a, b in itertools.product(range(V), range(V)) if expected[a, b] == 0) == 0
    chi2 = sum(float((counts[c] - expected[c]) ** 2 / expected[c]) for c in cells)
    # The 99.99% quantile of chi-square is below 2 * dof + 25 for these degrees of freedom.
    assert chi2 < 2 * (len(cells) - 1) + 25, (chi2, len(cells))


def test_an_unset_max_new_tokens_fills_the_context_the_models_share(target, small_draft):
    prompt = PROMPTS[2]  # 7 tokens; the draft's context (48) is the shorter
    out, _ = speculative_generate(target, small_draft, prompt, num_draft_tokens=3)  # no eos_id: runs to the end
    assert len(out) == 48 - len(prompt)
    assert out == generate_tokens(target, prompt, GenerateConfig(max_new_tokens=48 - len(prompt), temperature=0))[0]
