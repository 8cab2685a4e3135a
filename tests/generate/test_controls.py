"""Logit bias and banned phrases in the one sampler: OpenAI's and transformers' semantics, and banned phrases
that never appear in the text, however the tokens split them, in batched, beam, sampled and streamed decoding."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from gptforge.backends import prepare_for_inference
from gptforge.backends.cpu import panel_available
from gptforge.config import GenerateConfig, ModelConfig
from gptforge.errors import ConfigError
from gptforge.generate import TokenHistory, generate, generate_ids, process_logits, stream
from gptforge.generate.bans import PhraseBan, TokenTable, phrase_ban
from gptforge.generate.processors import apply_logit_bias
from gptforge.generate.sampler import screened
from gptforge.model import GPT
from gptforge.tokenizer import BPETokenizer, CharTokenizer

logits_process = pytest.importorskip("transformers.generation.logits_process")

TEXT = ["the cat sat on the mat. the hat is on the cat. that man has a hat and a map.\n",
        "hello there, help the helpful hen. she held the hello sign high.\n"] * 30


@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer.train(iter(TEXT), vocab_size=320)


def trained_model(tok, block_size: int = 96) -> GPT:
    """A tiny GPT trained for a few seconds on TEXT, so that its greedy output is TEXT-like: words of several
    tokens, phrases across token boundaries (a random model repeats one token, or writes broken bytes)."""
    torch.manual_seed(3)
    m = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=32))
    ids = torch.tensor(tok.encode("".join(TEXT)))
    g = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(m.parameters(), lr=1e-2)
    for _ in range(120):
        starts = torch.randint(0, len(ids) - 49, (8,), generator=g)
        batch = torch.stack([ids[s:s + 49] for s in starts.tolist()])
        logits = m(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return m.eval()


def save_trained_bpe_checkpoint(path):
    """:func:`trained_model` with a byte-level BPE over TEXT and a 128-token context, saved at ``path`` (the
    server's and the command line's tests)."""
    from gptforge.checkpoint import save_checkpoint

    tok = BPETokenizer.train(iter(TEXT), vocab_size=320)
    model = trained_model(tok, block_size=128)
    return save_checkpoint(path, model, tok, {"model": vars(model.config)})


@pytest.fixture(scope="module")
def model(bpe):
    return trained_model(bpe)


@pytest.fixture(scope="module")
def prepared(model):
    """The model as `gptforge generate` runs it: prepacked, with the LM head's argmax screen where the native
    kernel is built (the greedy and sampling fast paths that a bias or a ban must leave)."""
    return prepare_for_inference(copy.deepcopy(model))


def greedy(**kw):
    return GenerateConfig(**{"max_new_tokens": 40, "temperature": 0.0, "ignore_eos": True, **kw})


PROMPTS = ["the cat", "hello", "she held the hat on"]


# --------------------------------------------------------------------------------------------------
# logit_bias
def test_logit_bias_equals_transformers_sequence_bias_on_the_same_logits():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g) * 4
    logits[1, 7] = float("-inf")
    bias = {7: -100.0, 3: 100.0, 11: 2.5, 0: -0.75, 49: 13.0}
    config = GenerateConfig(logit_bias=bias)
    history = TokenHistory([[1, 2]] * 4, 50, config, torch.device("cpu"))
    ours = process_logits(logits, history, config, step=0, eos_id=None)
    theirs = logits_process.SequenceBiasLogitsProcessor(sequence_bias=[[[t], b] for t, b in bias.items()])(
        torch.tensor([[1, 2]] * 4), logits.clone())
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, logits)
    assert torch.equal(apply_logit_bias(logits, torch.tensor([3]), torch.tensor([1.5]))[:, 3], logits[:, 3] + 1.5)


def test_logit_bias_keys_may_be_strings_or_text_and_bad_values_are_one_config_error():
    assert GenerateConfig(logit_bias={"5": -100, 7: 3}).logit_bias == {5: -100.0, 7: 3.0}
    assert GenerateConfig(logit_bias='{"5": -100}').logit_bias == {5: -100.0}
    assert GenerateConfig(logit_bias="5:-100, 7:2.5").logit_bias == {5: -100.0, 7: 2.5}
    assert GenerateConfig(logit_bias={}).logit_bias is None  # no bias: the plain decode path
    for bad, message in [({5: 101}, "in [-100, 100]"), ({5: float("nan")}, "in [-100, 100]"),
                         ({"x": 1}, "token ids"), ({-1: 1}, "token ids"), ({5: True}, "must be a number"),
                         ("{5: 1}", "not valid JSON"), ("5=1", "ID:BIAS"), ("5:1,5:2", "twice"), ([5], "map token ids")]:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            GenerateConfig(logit_bias=bad)


def test_a_token_id_outside_the_vocabulary_is_a_config_error(model, bpe):
    with pytest.raises(ConfigError, match=f"logit_bias has token id {bpe.vocab_size}, outside the model's vocabulary"):
        generate(model, bpe, "the", greedy(logit_bias={bpe.vocab_size: 1}))


@pytest.mark.parametrize("which", ["model", "prepared"])
def test_minus_100_bans_the_argmax_and_plus_100_forces_a_token(which, model, prepared, bpe):
    """OpenAI's documented effect, greedy and sampled, through the screened head's fast paths too."""
    m = model if which == "model" else prepared
    for prompt in PROMPTS:
        plain = generate(m, bpe, prompt, greedy())[0][0].token_ids
        first = plain[0]
        banned = generate(m, bpe, prompt, greedy(logit_bias={first: -100}))[0][0].token_ids
        assert first not in banned and banned != plain
        sampled = generate(m, bpe, [prompt] * 3, greedy(temperature=1.0, seed=5, logit_bias={first: -100}))
        assert all(first not in c[0].token_ids for c in sampled)
        forced = plain[0] + 1 if plain[0] + 1 < bpe.vocab_size else 1  # a token greedy decoding did not pick
        for config in (greedy(logit_bias={forced: 100}), greedy(temperature=1.0, seed=3, logit_bias={forced: 100})):
            assert generate(m, bpe, prompt, config)[0][0].token_ids == [forced] * 40


def test_a_zero_bias_or_a_ban_that_never_bites_changes_nothing(prepared, model, bpe):
    for m in (model, prepared):
        plain = generate(m, bpe, PROMPTS, greedy())
        assert generate(m, bpe, PROMPTS, greedy(logit_bias={5: 0.0})) == plain
        assert generate(m, bpe, PROMPTS, greedy(bad_words=["\u00e9t\u00e9"])) == plain
    # Sampling from the logits (a model without an argmax screen): the same seeded draws. (Through a screen,
    # a plain row is drawn by the screen's own rejection sampler and a biased row from its logits: the same
    # distribution, another random stream.)
    sampled = generate(model, bpe, PROMPTS, greedy(temperature=0.9, seed=1))
    assert generate(model, bpe, PROMPTS, greedy(temperature=0.9, seed=1, logit_bias={5: 0.0})) == sampled
    assert generate(model, bpe, PROMPTS, greedy(temperature=0.9, seed=1, bad_words=["\u00e9t\u00e9"])) == sampled


def test_logit_bias_in_beam_search(model, bpe):
    plain = generate(model, bpe, "the cat", greedy(num_beams=3, num_return_sequences=3, max_new_tokens=12))[0]
    first = plain[0].token_ids[0]
    biased = generate(model, bpe, "the cat", greedy(num_beams=3, num_return_sequences=3, max_new_tokens=12,
                                                    logit_bias={first: -100}))[0]
    assert all(first not in c.token_ids for c in biased)


# --------------------------------------------------------------------------------------------------
# Banned phrases: the mask is exactly the tokens that would make a phrase appear
def occurs_ending_after(text: bytes, phrase: bytes, start: int) -> bool:
    """Whether ``phrase`` occurs in ``text`` ending after byte ``start`` (i.e. not inside text[:start])."""
    return text.find(phrase, max(0, start - len(phrase) + 1)) >= 0


def brute_force_banned(table: TokenTable, phrases: list[bytes], tail: bytes) -> set[int]:
    return {i for i, b in enumerate(table.bytes)
            if any(occurs_ending_after(tail + b, p, len(tail)) for p in phrases)}


def test_the_ban_is_exactly_the_tokens_that_complete_a_phrase(bpe):
    table = TokenTable(bpe.token_bytes())
    rng = random.Random(0)
    phrase_sets = [["hello"], ["the cat", "hat"], ["e"], [" he", "l.\n"], ["ll", "hello there"]]
    for phrases in phrase_sets:
        ban = PhraseBan(table, phrases)
        encoded = [p.encode() for p in phrases]
        for _ in range(60):
            ids = [rng.randrange(bpe.vocab_size) for _ in range(rng.randrange(1, 6))]
            tail = ban.tail(ids)
            text = b"".join(table.bytes[i] for i in ids)
            assert tail == (text[max(0, len(text) - ban.keep):] if ban.keep else b"")
            got = set(ban.banned(tail).tolist())
            assert got == brute_force_banned(table, encoded, tail), (phrases, tail)
        # the ends of real phrases: every split point of every phrase
        for p in encoded:
            for k in range(1, len(p)):
                tail = p[:k]
                assert set(ban.banned(tail).tolist()) == brute_force_banned(table, encoded, tail)


def test_the_ban_covers_transformers_bad_words_ids_for_both_spellings(bpe):
    """What NoBadWordsLogitsProcessor bans for a phrase tokenised with and without a leading space is banned
    here too (and here also every other tokenization of the same text)."""
    phrases = ["hello", "the hat"]
    bad_ids = [bpe.encode(p) for p in phrases] + [bpe.encode(" " + p) for p in phrases]
    processor = logits_process.NoBadWordsLogitsProcessor(bad_words_ids=bad_ids, eos_token_id=None)
    ban = phrase_ban(bpe, phrases)
    rng = random.Random(1)
    histories = [ids[:-1] for ids in bad_ids if len(ids) > 1]
    histories += [bpe.encode(t) for t in ["say hel", "the h", "the hat and the", "x"]]
    histories += [[rng.randrange(bpe.vocab_size) for _ in range(4)] for _ in range(20)]
    for ids in histories:
        theirs = processor(torch.tensor([ids]), torch.zeros(1, bpe.vocab_size))
        their_bans = set(torch.nonzero(torch.isinf(theirs[0])).flatten().tolist())
        ours = set(ban.banned(ban.tail(ids)).tolist())
        assert their_bans <= ours, (bpe.decode(ids), their_bans - ours)
    assert len(set(ban.banned(ban.tail(bpe.encode("the h"))).tolist())) > 1  # 'at', 'a', 'a'+... : not one id


def test_a_phrase_split_another_way_is_banned_too(bpe):
    """'hello' as one token is banned outright; after 'hel' (or 'h', 'he', 'hell'), every token that starts
    with the rest is banned, so no tokenization writes it."""
    config = GenerateConfig(bad_words=["hello"])
    table = TokenTable(bpe.token_bytes())
    for head in ["h", "he", "hel", "hell", "say hel"]:
        history = TokenHistory([bpe.encode(head)], bpe.vocab_size, config, torch.device("cpu"), bpe)
        scores = process_logits(torch.zeros(1, bpe.vocab_size), history, config, step=0, eos_id=None)
        allowed = torch.isfinite(scores[0]).nonzero().flatten().tolist()
        assert all(b"hello" not in (head.encode() + table.bytes[i]) for i in allowed)
        rest = "hello"[len(head.removeprefix("say ")):]
        assert all(not torch.isfinite(scores[0, i]) for i in range(bpe.vocab_size) if table.bytes[i].startswith(rest.encode()))


def test_banned_phrases_need_a_tokenizer_and_are_checked(model):
    with pytest.raises(ConfigError, match="need a tokenizer"):
        generate_ids(model, [[1, 2]], greedy(bad_words=["the"]))
    for bad, message in [([""], "is empty"), ("the", "list of strings"), ([3], "list of strings"),
                         (["\ud800"], "not valid Unicode")]:
        with pytest.raises(ConfigError, match=message):
            greedy(bad_words=bad).validate()


# --------------------------------------------------------------------------------------------------
# Banned phrases end to end: a phrase the model writes when free never appears once banned
def holds(prompt: str, text: str, phrase: str) -> bool:
    """Whether ``phrase`` appears in prompt + text ending inside ``text`` (what a ban forbids)."""
    return phrase in prompt[max(0, len(prompt) - len(phrase) + 1):] + text


def boundary_phrase(bpe, prompt_ids, tokens) -> str:
    """A piece of the free output's text that spans a token boundary: the last two bytes of one output token
    and the first two of the next (both at least two bytes long), as text."""
    table = bpe.token_bytes()
    for a, b in zip(tokens, tokens[1:]):
        ta, tb = table[a], table[b]
        if len(ta) >= 2 and len(tb) >= 2:
            try:
                return (ta[-2:] + tb[:2]).decode("utf-8")
            except UnicodeDecodeError:
                continue
    raise AssertionError("the free output has no two neighbouring tokens of two bytes or more")


def where_the_ban_bites(bpe, prompt_ids, tokens, phrase) -> int:
    """The index of the output token that completes the first occurrence of ``phrase`` (prompt included)."""
    table = bpe.token_bytes()
    text = b"".join(table[i] for i in prompt_ids)
    start = len(text)
    for j, t in enumerate(tokens):
        text += table[t]
        if occurs_ending_after(text, phrase.encode(), start):
            return j
        start = len(text)
    raise AssertionError(f"{phrase!r} is not in the output")


@pytest.mark.parametrize("which", ["model", "prepared"])
def test_greedy_and_batched_output_never_holds_a_banned_phrase_and_is_unchanged_until_the_ban_bites(which, model,
                                                                                                     prepared, bpe):
    m = model if which == "model" else prepared
    free = generate(m, bpe, PROMPTS, greedy())
    phrases = [boundary_phrase(bpe, bpe.encode(p), c[0].token_ids) for p, c in zip(PROMPTS, free)]
    for p, c, phrase in zip(PROMPTS, free, phrases):
        assert phrase in c[0].text  # the model does write it when free: the test can fail
    banned = generate(m, bpe, PROMPTS, greedy(bad_words=phrases))  # one padded batch, every row with all bans
    for p, c_free, c in zip(PROMPTS, free, banned):
        assert not any(holds(p, c[0].text, phrase) for phrase in phrases), (c[0].text, phrases)
        first = min(where_the_ban_bites(bpe, bpe.encode(p), c_free[0].token_ids, phrase)
                    for phrase in phrases if holds(p, c_free[0].text, phrase))
        assert c[0].token_ids[:first] == c_free[0].token_ids[:first]
        assert c[0].token_ids[first] != c_free[0].token_ids[first]
    # each row alone gives what it gave in the batch
    for p, c in zip(PROMPTS, banned):
        assert generate(m, bpe, p, greedy(bad_words=phrases))[0][0].token_ids == c[0].token_ids


def test_sampled_and_streamed_output_never_holds_a_banned_phrase(prepared, bpe):
    # Short, common pieces of this tokenizer's text: sampling at a high temperature writes them all the time.
    phrases = ["he", "at", "l "]
    free = "".join(c[0].text for c in generate(prepared, bpe, PROMPTS * 4, greedy(temperature=1.5, seed=0)))
    assert all(phrase in free for phrase in phrases)
    for seed in range(4):
        config = greedy(temperature=1.5, seed=seed, top_k=40, bad_words=phrases)
        for p, c in zip(PROMPTS, generate(prepared, bpe, PROMPTS, config)):
            assert not any(holds(p, c[0].text, ph) for ph in phrases), c[0].text
        pieces = list(stream(prepared, bpe, "the cat", GenerateConfig(**{**vars(config), "max_new_tokens": 60})))
        streamed = "".join(pieces)
        assert len(streamed) > 20 and not any(holds("the cat", streamed, ph) for ph in phrases), streamed


def test_seeded_sampling_is_unchanged_until_the_ban_bites(model, bpe):
    """The ban masks the logits before the draw (no draw is rejected and redrawn), so a seeded row draws the
    same tokens as without it up to the step where a banned phrase would have been completed."""
    for seed in range(3):
        config = greedy(temperature=0.8, seed=seed)
        free = generate(model, bpe, "the cat", config)[0][0]
        phrase = boundary_phrase(bpe, bpe.encode("the cat"), free.token_ids)
        banned = generate(model, bpe, "the cat", greedy(temperature=0.8, seed=seed, bad_words=[phrase]))[0][0]
        j = where_the_ban_bites(bpe, bpe.encode("the cat"), free.token_ids, phrase)
        assert banned.token_ids[:j] == free.token_ids[:j] and banned.token_ids[j] != free.token_ids[j]
        assert not holds("the cat", banned.text, phrase)


def test_stream_with_a_ban_equals_the_batch_with_it(prepared, bpe):
    free = generate(prepared, bpe, "hello", greedy())[0][0]
    phrase = boundary_phrase(bpe, bpe.encode("hello"), free.token_ids)
    config = greedy(bad_words=[phrase], max_new_tokens=40)
    s = stream(prepared, bpe, "hello", config)
    pieces = list(s)
    assert "".join(pieces) == s.completion.text == generate(prepared, bpe, "hello", config)[0][0].text
    assert not holds("hello", s.completion.text, phrase) and phrase in free.text


def test_beam_search_never_returns_a_banned_phrase(model, bpe):
    config = greedy(num_beams=4, num_return_sequences=4, max_new_tokens=20)
    free = generate(model, bpe, "the cat", config)[0]
    phrase = boundary_phrase(bpe, bpe.encode("the cat"), free[0].token_ids)
    assert phrase in free[0].text
    banned = generate(model, bpe, "the cat", GenerateConfig(**{**vars(config), "bad_words": [phrase]}))[0]
    assert len(banned) == 4
    for c in banned:
        assert not holds("the cat", c.text, phrase) and len(c.token_ids) == 20


def test_the_ending_end_of_text_token_is_never_banned(model, bpe):
    """A phrase inside '<|endoftext|>' bans that token while it is text (ignore_eos), not when it ends the
    sequence (it adds no text then)."""
    eos = bpe.eos_id
    config = GenerateConfig(bad_words=["endoftext"])
    history = TokenHistory([[1]], bpe.vocab_size, config, torch.device("cpu"), bpe)
    as_text = process_logits(torch.zeros(1, bpe.vocab_size), history, config, step=0, eos_id=None)
    as_end = process_logits(torch.zeros(1, bpe.vocab_size), history, config, step=0, eos_id=eos)
    assert not torch.isfinite(as_text[0, eos]) and torch.isfinite(as_end[0, eos])


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_token_bytes_join_to_the_decoded_text(kind, bpe):
    tok = bpe if kind == "bpe" else CharTokenizer(list("abc é"))
    table = tok.token_bytes()
    assert len(table) == tok.vocab_size
    rng = random.Random(2)
    for _ in range(200):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 8))]
        assert b"".join(table[i] for i in ids).decode("utf-8", "replace") == tok.decode(ids)


def test_a_char_tokenizer_phrase_across_characters_is_banned():
    tok = CharTokenizer(list("abc "))
    config = GenerateConfig(bad_words=["ab c"])
    history = TokenHistory([tok.encode("xab ")], tok.vocab_size, config, torch.device("cpu"), tok)
    scores = process_logits(torch.zeros(1, tok.vocab_size), history, config, step=0, eos_id=None)
    # 'c' as its character id and as the UTF-8 byte fallback's id: both write the phrase's end
    assert set(torch.isinf(scores[0]).nonzero().flatten().tolist()) == {tok.encode("c")[0], ord("c")}
    history.append(torch.tensor([tok.encode("a")[0]]), tok.encode("a"))
    assert torch.isfinite(process_logits(torch.zeros(1, tok.vocab_size), history, config, step=1, eos_id=None)).all()


@pytest.mark.skipif("not panel_available()", reason="the argmax screen needs the native panel kernel")
def test_the_screened_head_is_left_only_by_rows_with_a_bias_or_a_ban(prepared, bpe, monkeypatch):
    assert screened(prepared)
    calls = []
    head = type(prepared.lm_head)
    original = head.argmax
    monkeypatch.setattr(head, "argmax", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    generate(prepared, bpe, "the", greedy(max_new_tokens=5))
    assert len(calls) == 5
    calls.clear()
    generate(prepared, bpe, "the", greedy(max_new_tokens=5, logit_bias={3: 1.0}))
    generate(prepared, bpe, "the", greedy(max_new_tokens=5, bad_words=["x"]))
    assert calls == []
