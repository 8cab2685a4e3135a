"""Logits processors: the same distribution as transformers' processors on random logits; OpenAI penalties."""

import pytest
import torch

from gptforge.config import GenerateConfig
from gptforge.generate import (
    TokenHistory,
    apply_repetition_penalty,
    apply_temperature,
    ban_tokens,
    filter_logits,
    min_p_filter,
    process_logits,
    top_k_filter,
    top_p_filter,
)
from gptforge.generate.processors import NGramTable
from gptforge.generate.stopping import StopStringFilter

logits_process = pytest.importorskip("transformers.generation.logits_process")

B, V = 4, 50


@pytest.fixture()
def logits():
    return torch.randn(B, V, generator=torch.Generator().manual_seed(0)) * 3


@pytest.fixture()
def input_ids():
    # Few distinct tokens, so that n-grams repeat and several tokens are "seen".
    return torch.randint(0, 8, (B, 12), generator=torch.Generator().manual_seed(1))


def assert_same_distribution(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs)), "different tokens were removed"
    torch.testing.assert_close(ours.softmax(-1), theirs.softmax(-1), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("temperature", [0.3, 0.7, 1.5])
def test_temperature_matches_transformers(logits, input_ids, temperature):
    theirs = logits_process.TemperatureLogitsWarper(temperature)(input_ids, logits.clone())
    assert_same_distribution(apply_temperature(logits, temperature), theirs)


@pytest.mark.parametrize("k", [1, 5, 20])
def test_top_k_matches_transformers(logits, input_ids, k):
    theirs = logits_process.TopKLogitsWarper(top_k=k)(input_ids, logits.clone())
    ours = top_k_filter(logits, k)
    assert (torch.isfinite(ours).sum(-1) == k).all()
    assert_same_distribution(ours, theirs)


@pytest.mark.parametrize("p", [0.05, 0.5, 0.8, 0.95])
def test_top_p_matches_transformers(logits, input_ids, p):
    theirs = logits_process.TopPLogitsWarper(top_p=p)(input_ids, logits.clone())
    assert_same_distribution(top_p_filter(logits, p), theirs)


@pytest.mark.parametrize("min_p", [0.0, 0.05, 0.3, 1.0])
def test_min_p_matches_transformers(logits, input_ids, min_p):
    theirs = logits_process.MinPLogitsWarper(min_p=min_p)(input_ids, logits.clone())
    assert_same_distribution(min_p_filter(logits, min_p), theirs)


def test_warpers_compose_in_transformers_order(logits, input_ids):
    chain = [logits_process.TemperatureLogitsWarper(0.7), logits_process.TopKLogitsWarper(top_k=10),
             logits_process.TopPLogitsWarper(top_p=0.9), logits_process.MinPLogitsWarper(min_p=0.05)]
    theirs = logits.clone()
    for processor in chain:
        theirs = processor(input_ids, theirs)
    ours = filter_logits(logits, temperature=0.7, top_k=10, top_p=0.9, min_p=0.05)
    assert_same_distribution(ours, theirs)
    assert torch.isfinite(ours).sum() < 4 * 10  # the filters did remove tokens


@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
def test_repetition_penalty_matches_transformers(logits, input_ids, penalty):
    theirs = logits_process.RepetitionPenaltyLogitsProcessor(penalty=penalty)(input_ids, logits.clone())
    seen = torch.zeros(B, V, dtype=torch.bool).scatter_(1, input_ids, True)
    ours = apply_repetition_penalty(logits, seen, penalty)
    assert not torch.equal(ours, logits)
    assert_same_distribution(ours, theirs)
    # The same through the history the engine keeps (prompt tokens count as seen).
    history = TokenHistory(input_ids.tolist(), V, GenerateConfig(repetition_penalty=penalty), torch.device("cpu"))
    assert_same_distribution(process_logits(logits, history, GenerateConfig(repetition_penalty=penalty), step=0,
                                            eos_id=None), theirs)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_repeat_ngram_matches_transformers(logits, input_ids, n):
    theirs = logits_process.NoRepeatNGramLogitsProcessor(n)(input_ids, logits.clone())
    tables = [NGramTable(n, row) for row in input_ids.tolist()]
    ours = ban_tokens(logits, [t.banned() for t in tables])
    assert torch.isinf(ours).any()
    assert_same_distribution(ours, theirs)


def test_ngram_table_grows_one_token_at_a_time_like_a_rebuild(input_ids):
    row = input_ids[0].tolist()
    table = NGramTable(3, row[:4])
    for t in row[4:]:
        table.append(t)
    assert table.banned() == NGramTable(3, row).banned()
    copy = table.copy()
    copy.append(row[0])
    assert table.banned() == NGramTable(3, row).banned()  # the copy shares nothing mutable


def test_presence_and_frequency_penalties_follow_the_openai_formula(logits):
    config = GenerateConfig(presence_penalty=0.5, frequency_penalty=0.25)
    prompts = [[1, 2, 3]] * B
    history = TokenHistory(prompts, V, config, torch.device("cpu"))
    generated = [[7, 7, 7, 9], [9, 9, 0, 0], [3, 4, 5, 6], [1, 1, 1, 1]]
    for step in range(4):
        column = torch.tensor([g[step] for g in generated])
        history.append(column, column.tolist())
    ours = process_logits(logits, history, config, step=4, eos_id=None)
    expected = logits.clone()
    for row, tokens in enumerate(generated):
        for token in set(tokens):  # mu[j] - c[j] * alpha_frequency - (c[j] > 0) * alpha_presence
            expected[row, token] -= tokens.count(token) * 0.25 + 0.5
    torch.testing.assert_close(ours, expected)
    assert ours[0, 1] == logits[0, 1]  # prompt tokens are not penalized


def test_eos_is_suppressed_before_min_new_tokens(logits):
    config = GenerateConfig(min_new_tokens=2)
    history = TokenHistory([[1]] * B, V, config, torch.device("cpu"))
    assert torch.isinf(process_logits(logits, history, config, step=1, eos_id=5)[:, 5]).all()
    assert torch.equal(process_logits(logits, history, config, step=2, eos_id=5), logits)


# --------------------------------------------------------------------------------------------------
def run_filter(stops, pieces):
    f = StopStringFilter(stops)
    shown = [f.push(p) for p in pieces]
    if not f.stopped:
        shown.append(f.flush())
    return shown, f.stopped


def test_stop_string_split_over_pieces_is_cut_and_never_shown():
    shown, stopped = run_filter(["END"], ["abc E", "N", "D tail"])
    assert stopped and "".join(shown) == "abc "
    assert shown[0] == "abc "  # "E" was held back until it proved to be the start of "END"


def test_held_back_text_that_is_not_a_stop_string_is_released():
    shown, stopped = run_filter(["END"], ["abc E", "NX", "yz EN"])
    assert not stopped and "".join(shown) == "abc ENXyz EN"
    assert shown == ["abc ", "ENX", "yz ", "EN"]


def test_the_earliest_of_several_stop_strings_wins():
    shown, stopped = run_filter(["cd", "bcde"], ["ab", "cdef"])
    assert stopped and "".join(shown) == "a"  # "bcde" starts before "cd"
