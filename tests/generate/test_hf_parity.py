"""Greedy and beam search give transformers' exact tokens on the same random tiny GPT-2 weights."""

from __future__ import annotations

import pytest
import torch

from gptforge.config import GenerateConfig
from gptforge.convert import load_hf_folder
from gptforge.generate import generate, generate_ids
from tests.hf_utils import make_hf_gpt2_folder

pytest.importorskip("transformers")

PROMPT = "First Citizen: hear me speak"
MAX_NEW = 16


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf-gen") / "gpt2"
    hf_model = make_hf_gpt2_folder(path, seed=0)
    hf_model.generation_config.pad_token_id = 0
    ckpt = load_hf_folder(path)
    return hf_model, ckpt.model, ckpt.tokenizer


@pytest.fixture(scope="module")
def prompt_and_greedy(models):
    _, model, tok = models
    prompt = tok.encode(PROMPT)
    greedy = generate_ids(model, [prompt], GenerateConfig(max_new_tokens=MAX_NEW, temperature=0))[0][0].token_ids
    return prompt, greedy


def hf_generate(hf_model, prompt, eos_id, **kwargs) -> tuple[list[list[int]], list[float] | None]:
    """transformers' new tokens per returned sequence, cut at (and without) the EOS token, and beam scores."""
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=MAX_NEW, do_sample=False,
                                eos_token_id=eos_id, output_scores=True, return_dict_in_generate=True, **kwargs)
    rows = []
    for row in out.sequences[:, len(prompt):].tolist():
        rows.append(row[:row.index(eos_id)] if eos_id is not None and eos_id in row else row)
    scores = getattr(out, "sequences_scores", None)
    return rows, None if scores is None else scores.tolist()


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(repetition_penalty=1.3),
    dict(no_repeat_ngram_size=2),
    dict(repetition_penalty=0.8, no_repeat_ngram_size=3),
], ids=["plain", "repetition", "ngram", "both"])
def test_greedy_matches_transformers(models, prompt_and_greedy, kwargs):
    hf_model, model, _ = models
    prompt, _ = prompt_and_greedy
    ours = generate_ids(model, [prompt], GenerateConfig(max_new_tokens=MAX_NEW, temperature=0, **kwargs))[0][0]
    assert ours.token_ids == hf_generate(hf_model, prompt, None, **kwargs)[0][0]
    assert ours.finish_reason == "length"


def test_greedy_min_new_tokens_matches_transformers(models, prompt_and_greedy):
    hf_model, model, _ = models
    prompt, greedy = prompt_and_greedy
    eos = greedy[1]  # ends after two tokens unless min_new_tokens holds it back
    ours = generate_ids(model, [prompt], GenerateConfig(max_new_tokens=MAX_NEW, temperature=0, min_new_tokens=5),
                        eos_id=eos)[0][0]
    assert ours.token_ids == hf_generate(hf_model, prompt, eos, min_new_tokens=5)[0][0]
    assert len(ours.token_ids) >= 5


# (num_beams, length_penalty, early_stopping, index into the greedy tokens of the token used as EOS, extra)
BEAM_CASES = [
    (3, 1.0, False, 6, {}),
    (3, 1.0, True, 6, {}),
    (4, 2.0, False, 3, {}),
    (4, 2.0, True, 3, {}),
    (4, -1.0, False, None, {}),
    (3, 0.5, False, 6, dict(no_repeat_ngram_size=2, repetition_penalty=1.3)),
]


@pytest.mark.parametrize("num_beams, length_penalty, early_stopping, eos_index, extra", BEAM_CASES)
def test_beam_search_matches_transformers(models, prompt_and_greedy, num_beams, length_penalty, early_stopping,
                                          eos_index, extra):
    hf_model, model, _ = models
    prompt, greedy = prompt_and_greedy
    eos = None if eos_index is None else greedy[eos_index]
    settings = dict(num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping,
                    num_return_sequences=2, **extra)
    theirs, their_scores = hf_generate(hf_model, prompt, eos, **settings)
    ours = generate_ids(model, [prompt], GenerateConfig(max_new_tokens=MAX_NEW, temperature=0, **settings), eos)[0]
    assert [c.token_ids for c in ours] == theirs
    torch.testing.assert_close(torch.tensor([c.score for c in ours]), torch.tensor(their_scores),
                               rtol=1e-5, atol=1e-5)
    assert ours[0].score >= ours[1].score
    for c in ours:
        assert c.finish_reason == "eos" or (c.finish_reason == "length" and len(c.token_ids) == MAX_NEW)


def test_early_stopping_changes_the_beams_in_these_cases(models, prompt_and_greedy):
    """Guards the parity cases above: early_stopping and EOS really matter for them."""
    _, model, _ = models
    prompt, greedy = prompt_and_greedy
    results = {}
    for es in (False, True):
        cfg = GenerateConfig(max_new_tokens=MAX_NEW, temperature=0, num_beams=3, early_stopping=es)
        results[es] = generate_ids(model, [prompt], cfg, greedy[6])[0][0]
    assert results[True].token_ids != results[False].token_ids
    assert results[True].finish_reason == "eos"


def test_beam_search_batched_equals_alone_and_reports_logprobs(models):
    _, model, tok = models
    prompts = ["First Citizen:", "All: Speak, speak. You are all resolved"]
    cfg = GenerateConfig(max_new_tokens=8, temperature=0, num_beams=3, num_return_sequences=2, logprobs=2)
    batched = generate(model, tok, prompts, cfg)
    for prompt, got in zip(prompts, batched):
        alone = generate(model, tok, prompt, cfg)[0]
        assert [c.token_ids for c in got] == [c.token_ids for c in alone]
        assert got[0].text == tok.decode(got[0].token_ids)
    best = batched[1][0]
    ids = tok.encode(prompts[1])
    with torch.no_grad():
        logp = model(torch.tensor([ids + best.token_ids]))[0].log_softmax(-1)[len(ids) - 1:-1]
    expected = logp[torch.arange(len(best.token_ids)), torch.tensor(best.token_ids)]
    torch.testing.assert_close(torch.tensor(best.logprobs), expected, rtol=1e-4, atol=1e-4)
    assert [t for t, _ in best.top_logprobs[0]] == logp[0].topk(2).indices.tolist()
