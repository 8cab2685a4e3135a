"""Scoring given texts: equal to the slow full forward, shared prefix equal to alone, ranks, normalisations,
top log-probabilities and greedy flags, LoRA and prefix models, and every bad input one clear error."""

import math

import pytest
import torch

from gptforge.config import ModelConfig
from gptforge.errors import ConfigError, InvalidTextError
from gptforge.generate import encode_pair, prompt_logprobs, rank_scores, score, score_ids
from gptforge.model import GPT
from gptforge.tokenizer import BPETokenizer

CONTEXT = [5, 17, 3, 42, 8, 8, 91]
CANDIDATES = [[4, 4, 9], [77], [12, 30, 2, 2, 61, 7, 19], [4, 4, 9], [100, 1], [88, 3, 5, 6]]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=128, block_size=24, n_layer=2, n_head=2, n_embd=32)).eval()


@pytest.fixture(scope="module")
def tok():
    text = ["The cat sat on the mat. The dog sat on the log.\n", "A bird flew over the house; the end.\n"] * 30
    return BPETokenizer.train(iter(text), vocab_size=300)


@pytest.fixture(scope="module")
def text_model(tok):
    torch.manual_seed(1)
    return GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32)).eval()


def slow_logprobs(model, context, candidate):
    """The slow way: one full forward over context + candidate, log_softmax, gather."""
    with torch.no_grad():
        logp = model(torch.tensor([context + candidate])).log_softmax(-1)[0]
    return logp[len(context) - 1:len(context) - 1 + len(candidate)], [
        logp[len(context) - 1 + i, t].item() for i, t in enumerate(candidate)]


# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_size", [None, 1, 2, 4])
def test_scores_equal_the_slow_full_forward(model, batch_size):
    got = score_ids(model, CONTEXT, CANDIDATES, batch_size=batch_size)
    assert len(got) == len(CANDIDATES)
    for cand, scores in zip(CANDIDATES, got):
        _, expected = slow_logprobs(model, CONTEXT, cand)
        assert scores.token_ids == cand
        assert scores.logprobs == pytest.approx(expected, abs=1e-5)
        assert scores.total == pytest.approx(sum(expected), abs=1e-5)


def test_shared_prefix_scoring_equals_scoring_each_candidate_alone(model):
    together = score_ids(model, CONTEXT, CANDIDATES)
    for cand, scores in zip(CANDIDATES, together):
        alone = score_ids(model, CONTEXT, [cand])[0]
        assert scores.logprobs == pytest.approx(alone.logprobs, abs=1e-5)


def test_identical_candidates_get_identical_scores_and_their_own_lists(model):
    got = score_ids(model, CONTEXT, CANDIDATES, batch_size=1)
    assert got[0].logprobs == got[3].logprobs  # exactly: scored once
    got[0].logprobs.append(0.0)
    assert len(got[3].logprobs) == 3


def test_top_logprobs_and_greedy_agree_with_the_full_forward(model):
    # A candidate made of the model's own argmax continuation is greedy at every position.
    ids = list(CONTEXT)
    for _ in range(5):
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    greedy_cand = ids[len(CONTEXT):]
    cands = [greedy_cand, CANDIDATES[2]]
    got = score_ids(model, CONTEXT, cands, top_logprobs=3)
    assert got[0].greedy == [True] * 5
    for cand, scores in zip(cands, got):
        logp, _ = slow_logprobs(model, CONTEXT, cand)
        top = torch.topk(logp, 3, dim=-1)
        assert len(scores.top) == len(cand)
        for pos, pairs in enumerate(scores.top):
            assert [t for t, _ in pairs] == top.indices[pos].tolist()
            assert [v for _, v in pairs] == pytest.approx(top.values[pos].tolist(), abs=1e-5)
        assert scores.greedy == [logp[i].argmax().item() == t for i, t in enumerate(cand)]
    assert got[1].greedy != [True] * len(CANDIDATES[2])  # the check could fail


def test_no_top_logprobs_unless_asked(model):
    assert score_ids(model, CONTEXT, CANDIDATES[:2])[0].top is None


def test_the_longest_candidate_that_fits_the_context(model):
    block = model.config.block_size
    cand = list(range(1, block - len(CONTEXT) + 2))  # feeds exactly block_size tokens
    _, expected = slow_logprobs(model, CONTEXT, cand[:-1])  # the full forward cannot take one more
    got = score_ids(model, CONTEXT, [cand, [3]])[0]
    assert got.logprobs[:-1] == pytest.approx(expected, abs=1e-5)
    with pytest.raises(ConfigError, match=r"candidate 1 \(.* tokens\) after the context \(7 tokens\) needs 25 "
                                          r"positions; the model's block_size is 24"):
        score_ids(model, CONTEXT, [[1], cand + [2]])


def test_prompt_logprobs_reads_every_token_after_its_prefix(model):
    ids = CONTEXT + CANDIDATES[2]
    got = prompt_logprobs(model, ids, top_logprobs=2)
    _, expected = slow_logprobs(model, ids[:1], ids[1:])
    assert got.token_ids == ids
    assert got.logprobs[0] is None and got.top[0] is None and got.greedy[0] is None
    assert got.logprobs[1:] == pytest.approx(expected, abs=1e-5)
    assert len(got.top[1]) == 2
    one = prompt_logprobs(model, [7])
    assert one.logprobs == [None] and one.total == 0.0


def test_lora_and_prefix_models_score_as_their_own_full_forward(model):
    import copy

    from gptforge.peft.lora import apply_lora
    from gptforge.peft.prefix import apply_prefix

    for apply in (lambda m: apply_lora(m, rank=4), lambda m: apply_prefix(m, prefix_length=3)):
        m = copy.deepcopy(model)
        apply(m)
        torch.manual_seed(2)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if "lora" in name or "prefix" in name:
                    p.normal_(0, 0.2)
        m.eval()
        got = score_ids(m, CONTEXT, CANDIDATES, batch_size=3)
        for cand, scores in zip(CANDIDATES, got):
            _, expected = slow_logprobs(m, CONTEXT, cand)
            assert scores.logprobs == pytest.approx(expected, abs=1e-5)
        _, base = slow_logprobs(model, CONTEXT, CANDIDATES[2])
        assert got[2].logprobs != pytest.approx(base, abs=1e-3)  # the adapter does change the scores


def test_prepared_model_scores_as_the_plain_one(model):
    import copy

    from gptforge.backends import prepare_for_inference

    m = prepare_for_inference(copy.deepcopy(model))
    got = score_ids(m, CONTEXT, CANDIDATES)
    for cand, scores in zip(CANDIDATES, got):
        _, expected = slow_logprobs(model, CONTEXT, cand)
        assert scores.logprobs == pytest.approx(expected, abs=1e-4)


def test_training_mode_is_restored_and_dropout_does_not_apply(model):
    m = GPT(ModelConfig(vocab_size=128, block_size=24, n_layer=1, n_head=2, n_embd=16, dropout=0.5))
    m.train()
    a = score_ids(m, CONTEXT, CANDIDATES)
    b = score_ids(m, CONTEXT, CANDIDATES)
    assert m.training
    assert [s.logprobs for s in a] == [s.logprobs for s in b]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_scores_equal_the_cpu_ones(model):
    import copy

    cpu = score_ids(model, CONTEXT, CANDIDATES, top_logprobs=2)
    gpu = score_ids(copy.deepcopy(model).cuda(), CONTEXT, CANDIDATES, top_logprobs=2)
    for a, b in zip(cpu, gpu):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)


# --------------------------------------------------------------------------------------------------
# Text level
def test_rank_scores_is_competition_ranking():
    assert rank_scores([-3.0, -1.0, -3.0, -2.0]) == [3, 1, 3, 2]
    assert rank_scores([-1.0, -1.0, -1.0]) == [1, 1, 1]
    assert rank_scores([0.5, float("nan"), -9.0]) == [1, 3, 2]


def test_encode_pair_moves_trailing_whitespace_to_the_candidate(tok):
    ctx, cand = encode_pair(tok, "The cat sat on the ", "mat.")
    assert ctx == tok.encode("The cat sat on the")
    assert ctx + cand == tok.encode("The cat sat on the mat.")
    ctx, cand = encode_pair(tok, "", "The dog")
    assert ctx == [tok.eos_id] and cand == tok.encode("The dog")


def test_score_totals_normalisations_and_ranks(tok, text_model):
    context = "The cat sat on the"
    candidates = [" mat.", " log.", " house; the end.", " mat.", " bird"]
    by = {n: score(text_model, tok, context, candidates, normalize=n) for n in ("none", "token", "byte")}
    for i, text in enumerate(candidates):
        ctx_ids, ids = encode_pair(tok, context, text)
        _, expected = slow_logprobs(text_model, ctx_ids, ids)
        item = by["none"][i]
        assert item.text == text and item.tokens == len(ids) and item.bytes == len(text.encode())
        assert item.logprob == pytest.approx(sum(expected), abs=1e-5)
        assert item.mean_logprob == pytest.approx(sum(expected) / len(ids), abs=1e-5)
        assert item.score == item.logprob
        assert by["token"][i].score == pytest.approx(item.mean_logprob)
        assert by["byte"][i].score == pytest.approx(item.logprob / item.bytes)
    for n, items in by.items():
        assert [c.rank for c in items] == rank_scores([c.score for c in items])
        assert items[0].rank == items[3].rank  # the duplicates tie
    # the long candidate loses on its total but not per byte: normalising changes the order
    assert by["none"][2].rank > by["byte"][2].rank


def test_score_with_a_context_ending_in_a_space_equals_the_stripped_context(tok, text_model):
    a = score(text_model, tok, "The cat sat on the ", ["mat."])[0]
    b = score(text_model, tok, "The cat sat on the", [" mat."])[0]
    assert a.logprob == pytest.approx(b.logprob, abs=1e-6) and a.tokens == b.tokens


def test_empty_context_starts_from_end_of_text(tok, text_model):
    got = score(text_model, tok, "", ["The dog sat"])[0]
    _, expected = slow_logprobs(text_model, [tok.eos_id], tok.encode("The dog sat"))
    assert got.logprob == pytest.approx(sum(expected), abs=1e-5)


# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("call, message", [
    (lambda m: score_ids(m, [], [[1]]), "the context has no tokens"),
    (lambda m: score_ids(m, [1], []), "there are no candidates to score"),
    (lambda m: score_ids(m, [1], [[2], []]), "candidate 1 has no tokens to score"),
    (lambda m: score_ids(m, [1], [[2], [3, 500]]), "candidate 1 holds token id 500, outside the model's vocabulary"),
    (lambda m: score_ids(m, [-1], [[2]]), "the context holds token id -1"),
    (lambda m: score_ids(m, [1], ["ab"]), "candidate 0 must be a sequence of token ids, not text"),
    (lambda m: score_ids(m, [1], [[2]], top_logprobs=-1), "top_logprobs must be a non-negative integer"),
    (lambda m: score_ids(m, [1], [[2]], batch_size=0), "batch_size must be a positive integer"),
    (lambda m: score_ids(torch.nn.Linear(2, 2), [1], [[2]]), "scoring needs a language model"),
    (lambda m: prompt_logprobs(m, []), "the text has no tokens"),
    (lambda m: prompt_logprobs(m, list(range(26))), "the text has 26 tokens; scoring it feeds 25"),
])
def test_bad_token_inputs_are_one_clear_error(model, call, message):
    with pytest.raises(ConfigError, match=message):
        call(model)


@pytest.mark.parametrize("context, candidates, kw, message", [
    ("The cat", [], {}, "there are no candidates to score"),
    ("The cat", "mat", {}, "there are no candidates to score"),
    ("The cat", [" sat", ""], {}, "candidate 1 is empty"),
    ("The cat", [" sat", 3], {}, "candidate 1 must be a string"),
    ("The cat", [" sat"], {"normalize": "chars"}, "normalize must be one of none, token, byte"),
    ("The cat", [" sat " * 40], {}, "candidate 0 .* after the context"),
])
def test_bad_text_inputs_are_one_clear_error(tok, text_model, context, candidates, kw, message):
    with pytest.raises(ConfigError, match=message):
        score(text_model, tok, context, candidates, **kw)


def test_text_that_is_not_unicode_is_refused(tok, text_model):
    with pytest.raises(InvalidTextError, match="candidate 0 holds a lone surrogate"):
        score(text_model, tok, "The cat", ["\udcff"])
    with pytest.raises(InvalidTextError, match="the context holds a lone surrogate"):
        score(text_model, tok, "\udcff", ["x"])


def test_scores_are_finite(tok, text_model):
    for item in score(text_model, tok, "The", [" cat", " dog"]):
        assert math.isfinite(item.logprob) and item.logprob < 0
