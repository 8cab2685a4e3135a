"""Decoding: KV-cache greedy equals full recompute, batching, seeds, EOS, stop strings, streaming, logprobs."""

import logging

import pytest
import torch

from gptforge.config import GenerateConfig, ModelConfig
from gptforge.errors import ConfigError
from gptforge.generate import generate, generate_ids, generate_tokens, stream
from gptforge.model import GPT
from gptforge.tokenizer import CharTokenizer

PROMPTS = [[3, 1, 4], [1, 5, 9, 2, 6, 5, 3], [5, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6, 2]]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=300, block_size=64, n_layer=2, n_head=2, n_embd=32)).eval()


@pytest.fixture(scope="module")
def tok():
    return CharTokenizer(list("abcdefgh é"))


@pytest.fixture(scope="module")
def char_model(tok):
    torch.manual_seed(1)
    return GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=96, n_layer=1, n_head=2, n_embd=32)).eval()


def sample_cfg(**kw):
    return GenerateConfig(**{"max_new_tokens": 15, "temperature": 1.0, "seed": 7, **kw})


def text_cfg(**kw):
    """Sampling that runs the full length, so the text is long enough to hold a stop string."""
    return sample_cfg(**{"max_new_tokens": 60, "ignore_eos": True, **kw})


def full_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]))[0]


# --------------------------------------------------------------------------------------------------
def test_cached_greedy_equals_recomputing_the_whole_context(model):
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    got = generate_tokens(model, prompt, GenerateConfig(max_new_tokens=15, temperature=0))[0]
    ids = list(prompt)
    for _ in range(15):
        ids.append(int(full_logits(model, ids)[-1].argmax()))
    assert got == ids[len(prompt):]


@pytest.mark.parametrize("config", [
    GenerateConfig(max_new_tokens=12, temperature=0),
    GenerateConfig(max_new_tokens=12, temperature=0, repetition_penalty=1.5, no_repeat_ngram_size=2),
    sample_cfg(max_new_tokens=10, top_k=20, top_p=0.9, num_return_sequences=2),
    sample_cfg(max_new_tokens=10, min_p=0.05, presence_penalty=1.0, frequency_penalty=0.5, logprobs=2),
], ids=["greedy", "greedy-penalties", "sampling", "sampling-penalties-logprobs"])
def test_batched_prompts_of_different_lengths_equal_decoding_each_alone(model, config):
    batched = generate_ids(model, PROMPTS, config)
    n = config.num_return_sequences
    for i, prompt in enumerate(PROMPTS):
        # Row r of a batch samples with seed + r, so prompt i alone takes seed + i * n.
        seed = None if config.seed is None else config.seed + i * n
        alone = generate_ids(model, [prompt], GenerateConfig(**{**vars(config), "seed": seed}))[0]
        assert [c.token_ids for c in batched[i]] == [c.token_ids for c in alone]
        assert [c.prompt_tokens for c in batched[i]] == [len(prompt)] * n
        if config.logprobs:
            torch.testing.assert_close(torch.tensor(batched[i][0].logprobs), torch.tensor(alone[0].logprobs),
                                       rtol=1e-4, atol=1e-4)


def test_seed_makes_sampling_reproducible_and_samples_differ(model):
    cfg = sample_cfg(num_return_sequences=4)
    a = generate_tokens(model, [1, 2, 3], cfg)
    assert a == generate_tokens(model, [1, 2, 3], cfg)
    assert len({tuple(r) for r in a}) > 1
    assert generate_tokens(model, [1, 2, 3], sample_cfg(num_return_sequences=4, seed=8)) != a


def test_top_k_one_is_greedy(model):
    greedy = generate_tokens(model, [5, 6], GenerateConfig(max_new_tokens=10, temperature=0))
    k1 = generate_tokens(model, [5, 6], GenerateConfig(max_new_tokens=10, temperature=1.5, top_k=1, seed=1))
    assert greedy == k1


def first_new_token_index(tokens):
    return next(i for i in range(1, len(tokens)) if tokens[i] not in tokens[:i])


def test_eos_ends_a_sequence_and_ignore_eos_keeps_going(model):
    prompt = [1, 2]
    first = generate_tokens(model, prompt, GenerateConfig(max_new_tokens=20, temperature=0))[0]
    j = first_new_token_index(first)
    [stopped] = generate_ids(model, [prompt], GenerateConfig(max_new_tokens=20, temperature=0), eos_id=first[j])[0:1]
    assert stopped[0].token_ids == first[:j] and stopped[0].finish_reason == "eos"
    [kept] = generate_ids(model, [prompt], GenerateConfig(max_new_tokens=20, temperature=0, ignore_eos=True),
                          eos_id=first[j])[0]
    assert kept.token_ids == first and kept.finish_reason == "length"


def test_min_new_tokens_suppresses_eos(model):
    prompt = [4, 4]
    first = generate_tokens(model, prompt, GenerateConfig(max_new_tokens=10, temperature=0))[0]
    eos = first[0]  # the model's favourite first token: without min_new_tokens it ends at once
    assert generate_tokens(model, prompt, GenerateConfig(max_new_tokens=10, temperature=0), eos_id=eos) == [[]]
    [c] = generate_ids(model, [prompt], GenerateConfig(max_new_tokens=10, temperature=0, min_new_tokens=4), eos)[0]
    assert len(c.token_ids) >= 4 and eos not in c.token_ids[:4]


def test_no_repeat_ngram_size_leaves_no_repeated_ngram(model):
    prompt = [7, 7, 8]
    plain = generate_tokens(model, prompt, GenerateConfig(max_new_tokens=30, temperature=0))[0]
    seq = prompt + generate_tokens(model, prompt, GenerateConfig(max_new_tokens=30, temperature=0,
                                                                 no_repeat_ngram_size=2))[0]
    bigrams = list(zip(seq, seq[1:]))
    assert len(set(bigrams)) == len(bigrams)
    assert len(set(zip(plain, plain[1:]))) < len(plain) - 1  # the plain greedy output does repeat


def test_logprobs_are_the_models_log_softmax_at_the_chosen_token(model):
    prompt = [9, 8, 7]
    [c] = generate_ids(model, [prompt], sample_cfg(max_new_tokens=8, logprobs=3, repetition_penalty=1.2))[0]
    logp = full_logits(model, prompt + c.token_ids).log_softmax(-1)[len(prompt) - 1:-1]  # predicts each new token
    expected = logp[torch.arange(len(c.token_ids)), torch.tensor(c.token_ids)]
    torch.testing.assert_close(torch.tensor(c.logprobs), expected, rtol=1e-4, atol=1e-4)
    for step, top in enumerate(c.top_logprobs):
        assert len(top) == 3
        values = logp[step].topk(3)
        assert [t for t, _ in top] == values.indices.tolist()
        torch.testing.assert_close(torch.tensor([v for _, v in top]), values.values, rtol=1e-4, atol=1e-4)
    assert generate_ids(model, [prompt], sample_cfg(max_new_tokens=3))[0][0].logprobs is None


def test_context_overflow_is_a_clear_error(model):
    message = r"prompt \(60 tokens\) \+ max_new_tokens \(10\) is longer than the model's context of 64"
    with pytest.raises(ConfigError, match=message):
        generate_tokens(model, list(range(60)), GenerateConfig(max_new_tokens=10))


# --------------------------------------------------------------------------------------------------
def boundary_stop(tok, completion):
    """A two-character stop string that straddles two generated tokens of ``completion``."""
    texts = [tok.decode([t]) for t in completion.token_ids]
    for i in range(3, len(texts) - 1):
        a, b = texts[i], texts[i + 1]
        if len(a) == 1 and len(b) == 1 and "\ufffd" not in a + b and len(tok.encode(a + b)) == 2:
            return a + b
    pytest.fail("no clean token boundary in the sample")


def test_stop_string_across_tokens_ends_the_text_before_it(char_model, tok):
    [full] = generate(char_model, tok, "abc", text_cfg())[0]
    assert full.finish_reason == "length" and full.text == tok.decode(full.token_ids)
    stop = boundary_stop(tok, full)
    [cut] = generate(char_model, tok, "abc", text_cfg(stop=[stop, "never there"]))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[:full.text.index(stop)]
    assert tok.decode(cut.token_ids).endswith(stop)  # the tokens run up to the end of the stop string


def test_streaming_pieces_concatenate_to_the_text(char_model, tok):
    cfg = text_cfg(max_new_tokens=40, seed=3)
    s = stream(char_model, tok, "abc", cfg)
    pieces = list(s)
    assert all(pieces) and len(pieces) > 1
    assert "".join(pieces) == s.completion.text == generate(char_model, tok, "abc", cfg)[0][0].text


def test_streaming_never_shows_a_stop_string(char_model, tok):
    [full] = generate(char_model, tok, "abc", text_cfg())[0]
    stop = boundary_stop(tok, full)
    cfg = text_cfg(stop=[stop])
    s = stream(char_model, tok, "abc", cfg)
    shown = ""
    for piece in s:
        shown += piece
        assert stop not in shown and full.text.startswith(shown)
    assert shown == generate(char_model, tok, "abc", cfg)[0][0].text == full.text[:full.text.index(stop)]
    assert s.completion.finish_reason == "stop"


def test_stream_rejects_several_sequences_and_beams(char_model, tok):
    with pytest.raises(ConfigError, match="streaming produces one sequence"):
        stream(char_model, tok, "a", sample_cfg(num_return_sequences=2))
    with pytest.raises(ConfigError, match="streaming is not supported with beam search"):
        stream(char_model, tok, "a", GenerateConfig(temperature=0, num_beams=2))


def test_stop_strings_need_a_tokenizer(model):
    with pytest.raises(ConfigError, match="stop strings need a tokenizer"):
        generate_ids(model, [[1]], GenerateConfig(stop=["x"]))


def test_compile_is_left_off_on_cpu_with_a_warning(model, caplog):
    with caplog.at_level(logging.WARNING, logger="gptforge"):
        got = generate_tokens(model, [1, 2], GenerateConfig(max_new_tokens=5, temperature=0, compile=True))
    assert got == generate_tokens(model, [1, 2], GenerateConfig(max_new_tokens=5, temperature=0))
    assert "compile is only used on CUDA" in caplog.text


def test_an_unset_max_new_tokens_fits_each_entry_point_to_the_context():
    from gptforge.generate import generate_ids, stream_ids

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=40, block_size=24, n_layer=1, n_head=2, n_embd=16)).eval()
    config = GenerateConfig(temperature=0)
    # a batch: what the longest prompt leaves, for every row
    rows = generate_ids(model, [[1, 2, 3], [4, 5, 6, 7, 8]], config)
    assert [len(row[0].token_ids) for row in rows] == [19, 19]
    beams = generate_ids(model, [[1, 2, 3]], GenerateConfig(temperature=0, num_beams=2))
    assert len(beams[0][0].token_ids) == 21
    streamed = stream_ids(model, CharTokenizer(list("abc")), [1, 2, 3], config)
    list(streamed)
    assert len(streamed.completion.token_ids) == 21 and streamed.completion.finish_reason == "length"
    with pytest.raises(ConfigError, match=r"^the prompt \(24 tokens\) leaves no room to generate"):
        stream_ids(model, CharTokenizer(list("abc")), [1] * 24, config)  # before the first piece is asked for
