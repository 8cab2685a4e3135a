"""The explanation's numbers are the model's own: token probabilities, alternatives and entropy from a plain full
forward and softmax; attention from q and k recomputed from a block's weights; rollout on hand-made patterns."""

from __future__ import annotations

import math

import pytest
import torch

from gptforge.checkpoint import load_checkpoint
from gptforge.config import ExplainConfig, GenerateConfig
from gptforge.errors import ConfigError, DataError
from gptforge.explain import attention_rollout, explain_checkpoint, explain_language_model
from gptforge.generate import generate_ids
from tests.explain.explain_utils import save_lm
from tests.model.test_recording import slow_attention


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    path = save_lm(tmp_path_factory.mktemp("explain") / "lm")
    return path, load_checkpoint(path)


def test_token_probabilities_equal_a_full_forward_and_softmax(lm):
    _, ckpt = lm
    text = "the cat sat on the mat."
    data = explain_language_model(ckpt.model, ckpt.tokenizer, text=text, config=ExplainConfig(top_k=4))
    ids = ckpt.tokenizer.encode(text)
    with torch.no_grad():
        probs = ckpt.model(torch.tensor([ids]))[0].softmax(-1)  # (T, V), the slow way
    tokens = data["tokens"]
    assert [t["id"] for t in tokens] == ids and "".join(t["text"] for t in tokens) == text
    assert "prob" not in tokens[0]  # the first token has no prediction
    for i in range(1, len(ids)):
        row = probs[i - 1]
        t = tokens[i]
        assert t["prob"] == pytest.approx(float(row[ids[i]]), rel=1e-5)
        assert t["logprob"] == pytest.approx(math.log(float(row[ids[i]])), abs=1e-5)
        assert t["rank"] == int((row > row[ids[i]]).sum()) + 1
        assert t["entropy"] == pytest.approx(float(-(row * row.log()).sum()), rel=1e-4)
        top = row.topk(4)
        assert [a["id"] for a in t["alternatives"]] == top.indices.tolist()
        assert [a["prob"] for a in t["alternatives"]] == pytest.approx(top.values.tolist(), rel=1e-5)
        assert [a["text"] for a in t["alternatives"]] == [ckpt.tokenizer.decode([j]) for j in top.indices.tolist()]
    scored = sorted(range(1, len(ids)), key=lambda i: tokens[i]["prob"])
    assert data["least_sure"][0] == scored[0] and data["most_sure"][0] == scored[-1]


def test_attention_maps_equal_q_and_k_recomputed_from_the_weights(lm):
    _, ckpt = lm
    text = "a bad cab"
    data = explain_language_model(ckpt.model, ckpt.tokenizer, text=text)
    idx = torch.tensor([ckpt.tokenizer.encode(text)])
    att = data["attention"]
    assert att["layers"] == [0, 1] and att["heads"] == [0, 1]
    for layer in (0, 1):
        want = slow_attention(ckpt.model, idx, layer)[0]
        for h in (0, 1):
            got = torch.tensor(att["maps"][str(layer)][str(h)])
            assert torch.allclose(got, want[h], atol=1e-5)
            assert torch.allclose(got.sum(-1), torch.ones(len(text)), atol=1e-5)
            assert (got.triu(diagonal=1) == 0).all()
        assert torch.allclose(torch.tensor(att["head_mean"][str(layer)]), want.mean(0), atol=1e-5)
    # --layer / --head choose what is shown
    one = explain_language_model(ckpt.model, ckpt.tokenizer, text=text, config=ExplainConfig(layer=1, head=0))
    assert one["attention"]["layers"] == [1] and list(one["attention"]["maps"]) == ["1"]
    assert list(one["attention"]["maps"]["1"]) == ["0"]
    assert torch.allclose(torch.tensor(one["attention"]["rollout"]), torch.tensor(att["rollout"]))  # every layer


def test_a_prompt_is_continued_greedily_by_the_engine(lm):
    _, ckpt = lm
    data = explain_language_model(ckpt.model, ckpt.tokenizer, prompt="the ", config=ExplainConfig(max_new_tokens=6))
    want = generate_ids(ckpt.model, [ckpt.tokenizer.encode("the ")], GenerateConfig(max_new_tokens=6, temperature=0),
                        ckpt.tokenizer.eos_id)[0][0].token_ids
    tokens = data["tokens"]
    assert data["n_prompt_tokens"] == 4
    assert [t["id"] for t in tokens if t["generated"]] == want
    assert all(t["rank"] == 1 for t in tokens if t["generated"])  # greedy: each was the most likely


def test_rollout_on_known_patterns():
    T = 3
    # every head attends to itself only: the identity, whatever the depth
    assert torch.allclose(attention_rollout(torch.eye(T).expand(2, 4, T, T)), torch.eye(T))
    # every query attends to the first token: A + I normalised is [[1,0,0],[.5,.5,0],[.5,0,.5]]; two layers: A @ A
    first = torch.zeros(T, T)
    first[:, 0] = 1.0
    maps = torch.stack([torch.stack([first, first])] * 2)  # (L=2, H=2, T, T)
    expected = torch.tensor([[1.0, 0.0, 0.0], [0.75, 0.25, 0.0], [0.75, 0.0, 0.25]])
    assert torch.allclose(attention_rollout(maps), expected)
    # heads are averaged before the identity is added: one head on the first token, one on itself
    mixed = torch.stack([torch.stack([first, torch.eye(T)])])  # (L=1, H=2, T, T)
    expected = torch.tensor([[1.0, 0.0, 0.0], [0.25, 0.75, 0.0], [0.25, 0.0, 0.75]])
    assert torch.allclose(attention_rollout(mixed), expected)
    assert torch.allclose(attention_rollout(maps).sum(-1), torch.ones(T))


def test_bad_choices_are_one_clear_error(lm):
    path, ckpt = lm
    with pytest.raises(ConfigError, match="layer must be from 0 to 1"):
        explain_language_model(ckpt.model, ckpt.tokenizer, text="abc", config=ExplainConfig(layer=2))
    with pytest.raises(ConfigError, match="head must be from 0 to 1"):
        explain_language_model(ckpt.model, ckpt.tokenizer, text="abc", config=ExplainConfig(head=5))
    with pytest.raises(ConfigError, match="top_k"):
        explain_language_model(ckpt.model, ckpt.tokenizer, text="abc", config=ExplainConfig(top_k=0))
    with pytest.raises(DataError, match="at least two tokens"):
        explain_language_model(ckpt.model, ckpt.tokenizer, text="a")
    with pytest.raises(DataError, match="context is 64 tokens"):
        explain_language_model(ckpt.model, ckpt.tokenizer, text="ab" * 40)
    with pytest.raises(ConfigError, match="either a prompt"):
        explain_checkpoint(path, prompt="a", text="b")


def test_a_prefix_tuned_models_maps_leave_the_prefix_keys_out(lm):
    from gptforge.peft.prefix import apply_prefix

    path, _ = lm
    ckpt = load_checkpoint(path)
    apply_prefix(ckpt.model, prefix_length=4)
    with torch.no_grad():
        for name, p in ckpt.model.named_parameters():
            if "prefix" in name:
                p.normal_(0, 1.0)  # prefixes that draw real attention
    ckpt.model.eval()
    data = explain_language_model(ckpt.model, ckpt.tokenizer, text="a cab")
    att = data["attention"]
    assert att["prefix_keys"] == 4
    rows = torch.tensor(att["maps"]["0"]["0"]).sum(-1)
    assert (rows < 1 - 1e-3).all() and (rows > 0).all()  # the tokens' share; the rest went to the prefix
    with torch.no_grad():
        probs = ckpt.model(torch.tensor([ckpt.tokenizer.encode("a cab")]))[0].softmax(-1)
    assert data["tokens"][1]["prob"] == pytest.approx(float(probs[0, data["tokens"][1]["id"]]), rel=1e-5)
