"""A classifier's token attributions (captum): integrated gradients add up to the output difference, and
occlusion singles out the one token that decides the label."""

from __future__ import annotations

import pytest
import torch

from gptforge.backends import prepare_for_inference, quantize_int8
from gptforge.config import ExplainConfig, ModelConfig
from gptforge.errors import ConfigError, DataError
from gptforge.evaluate.predict import classify_texts, load_for_task
from gptforge.explain import attribute, classify_with_attributions, explain_classifier
from gptforge.heads import TaskModel
from gptforge.model import GPT
from gptforge.tokenizer import CharTokenizer
from tests.explain.explain_utils import LABELS, LM_CHARS, train_z_classifier


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    path = train_z_classifier(tmp_path_factory.mktemp("explain-clf") / "z")
    return path, load_for_task(path, "classify", "cpu")


def probability(model, ids, label: int) -> float:
    with torch.no_grad():
        return float(model(torch.tensor([ids])).softmax(-1)[0, label])


def test_the_classifier_learned_its_rule(classifier):
    _, ckpt = classifier
    results = classify_texts(ckpt.model, ckpt.tokenizer, ["abcdefgh", "abczefgh", "hgfedcba", "zgfedcba"], LABELS)
    assert [r["label"] for r in results] == ["no_z", "has_z", "no_z", "has_z"]


def test_integrated_gradients_are_complete():
    """Completeness (Sundararajan et al. 2017): the attributions add up to F(text) - F(baseline), F the predicted
    label's probability and the baseline every token replaced by padding, within a small tolerance."""
    torch.manual_seed(3)
    tok = CharTokenizer(list(LM_CHARS))
    base = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=32))
    model = TaskModel(base, "classify", 3, dropout=0.0).eval()
    labels = ["x", "y", "z"]
    for text in ("the cat sat", "a", "hello, world.\n"):
        a = attribute(model, tok, text, labels, method="ig", steps=64)
        ids = tok.encode(text)
        target = labels.index(a["label"])
        difference = probability(model, ids, target) - probability(model, [tok.eos_id] * len(ids), target)
        total = sum(t["attribution"] for t in a["tokens"])
        assert abs(difference) > 1e-3  # something to attribute
        assert total == pytest.approx(difference, abs=1e-4 + 1e-3 * abs(difference)), (text, total, difference)
        assert a["delta"] == pytest.approx(total - difference, abs=1e-5)
        assert a["probabilities"][a["label"]] == pytest.approx(probability(model, ids, target), abs=1e-6)
        assert [t["id"] for t in a["tokens"]] == ids


def test_the_completeness_gap_is_reported_and_shrinks_with_more_steps(classifier):
    """The trained classifier switches sharply somewhere on the path from the baseline: few steps leave a gap,
    which the result reports honestly (delta) and which more steps close."""
    _, ckpt = classifier
    tok = ckpt.tokenizer
    ids = tok.encode("abcdefgh")
    difference = probability(ckpt.model, ids, 0) - probability(ckpt.model, [tok.eos_id] * len(ids), 0)
    gaps = []
    for steps in (64, 1024):
        a = attribute(ckpt.model, tok, "abcdefgh", LABELS, method="ig", steps=steps)
        total = sum(t["attribution"] for t in a["tokens"])
        assert a["delta"] == pytest.approx(total - difference, abs=1e-4)
        gaps.append(abs(a["delta"]))
    assert gaps[1] < gaps[0] / 4


def test_occlusion_finds_the_one_token_that_decides(classifier):
    _, ckpt = classifier
    tok, pad = ckpt.tokenizer, ckpt.tokenizer.eos_id
    text = "abczefgh"
    a = attribute(ckpt.model, tok, text, LABELS, method="occlusion")
    assert a["label"] == "has_z" and a["delta"] is None
    scores = [t["attribution"] for t in a["tokens"]]
    z = text.index("z")
    ids = tok.encode(text)
    for i, score in enumerate(scores):  # each is F(text) - F(text with that token replaced by padding)
        occluded = ids[:i] + [pad] + ids[i + 1:]
        assert score == pytest.approx(probability(ckpt.model, ids, 1) - probability(ckpt.model, occluded, 1), abs=1e-5)
    assert max(range(len(scores)), key=scores.__getitem__) == z
    assert scores[z] > 0.3 and all(abs(s) < scores[z] / 4 for i, s in enumerate(scores) if i != z)
    # integrated gradients agree on which token it is
    ig = [t["attribution"] for t in attribute(ckpt.model, tok, text, LABELS, method="ig")["tokens"]]
    assert max(range(len(ig)), key=ig.__getitem__) == z


def test_a_prepared_model_explains_alike_and_int8_refuses_gradients_clearly(classifier):
    path, ckpt = classifier
    plain = attribute(ckpt.model, ckpt.tokenizer, "abczefgh", LABELS, method="ig", steps=32)
    prepared = load_for_task(path, "classify", "cpu")
    prepare_for_inference(prepared.model)  # what the server runs: packed linears fall back to F.linear for gradients
    again = attribute(prepared.model, prepared.tokenizer, "abczefgh", LABELS, method="ig", steps=32)
    assert [t["attribution"] for t in again["tokens"]] == pytest.approx([t["attribution"] for t in plain["tokens"]],
                                                                        abs=1e-4)
    with torch.inference_mode():  # as the server's scheduler runs jobs
        inside = classify_with_attributions(prepared.model, prepared.tokenizer, ["abczefgh"], LABELS, steps=32)
    assert [t["attribution"] for t in inside[0]["attributions"]["tokens"]] == pytest.approx(
        [t["attribution"] for t in plain["tokens"]], abs=1e-4)
    quantized = load_for_task(path, "classify", "cpu")
    quantize_int8(quantized.model)
    with pytest.raises(ConfigError, match="int8-quantized"):
        attribute(quantized.model, quantized.tokenizer, "abcz", LABELS, method="ig")
    assert attribute(quantized.model, quantized.tokenizer, "abcz", LABELS, method="occlusion")["label"] == "has_z"


def test_the_classifier_report_and_bad_input(classifier):
    _, ckpt = classifier
    data = explain_classifier(ckpt.model, ckpt.tokenizer, "abczefgh", LABELS, config=ExplainConfig(ig_steps=32))
    assert data["label"] == "has_z" and set(data["attributions"]) == {"ig", "occlusion"}
    assert sum(data["probabilities"].values()) == pytest.approx(1.0)
    assert torch.tensor(data["attention"]["rollout"]).shape == (8, 8)
    with pytest.raises(DataError, match="empty"):
        attribute(ckpt.model, ckpt.tokenizer, "", LABELS)
    with pytest.raises(ConfigError, match="ig or occlusion"):
        attribute(ckpt.model, ckpt.tokenizer, "abc", LABELS, method="shap")
    with pytest.raises(ConfigError, match="classifier"):
        attribute(ckpt.model.base, ckpt.tokenizer, "abc", LABELS)
