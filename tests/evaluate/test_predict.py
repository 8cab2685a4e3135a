"""Prediction with a task model: per-word tags from first sub-words, BIO entities, the task check on load."""

from __future__ import annotations

import pytest
import torch

from gptforge.config import ModelConfig
from gptforge.errors import ConfigError
from gptforge.evaluate.predict import bio_entities, classify_texts, load_for_task, tag_texts, word_tags
from gptforge.heads import TaskModel
from gptforge.model import GPT
from gptforge.tokenizer import CharTokenizer
from tests.model_utils import save_tiny_checkpoint


def test_word_tags_read_first_subwords_and_fill_cut_words_with_o():
    predicted = torch.tensor([1, 0, 0, 2, 0])
    assert word_tags(predicted, [0, 3], 2, ["O", "B-PER", "I-PER"]) == ["B-PER", "I-PER"]
    assert word_tags(predicted, [0], 3, ["O", "B-PER", "I-PER"]) == ["B-PER", "O", "O"]


def test_bio_entities_follow_seqeval_and_take_bare_tags_as_inside():
    words = ["John", "Smith", "visited", "New", "York", "."]
    tags = ["B-PER", "I-PER", "O", "B-LOC", "I-LOC", "O"]
    assert bio_entities(words, tags) == [{"type": "PER", "start": 0, "end": 2, "text": "John Smith"},
                                         {"type": "LOC", "start": 3, "end": 5, "text": "New York"}]
    # An I- that does not continue its type starts an entity; B- always starts one; a bare X is I-X.
    assert [(e["type"], e["start"], e["end"]) for e in bio_entities(list("abcde"), ["I-A", "I-B", "B-B", "NN", "NN"])] \
        == [("A", 0, 1), ("B", 1, 2), ("B", 2, 3), ("NN", 3, 5)]
    assert bio_entities([], []) == [] and bio_entities(["x"], ["O"]) == []


def test_load_for_task_refuses_a_checkpoint_of_another_task(tmp_path):
    path = save_tiny_checkpoint(tmp_path / "lm", "abc ", block_size=16, n_layer=1, n_embd=16)
    with pytest.raises(ConfigError, match="is a language model with no text classification head"):
        load_for_task(path, "classify", "cpu")
    assert load_for_task(path, None, "cpu").config["task"]["type"] == "lm"


def test_classify_and_tag_texts_shapes():
    torch.manual_seed(0)
    tok = CharTokenizer(list("abc "))
    base = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16))
    classifier = TaskModel(base, "classify", 2).eval()
    results = classify_texts(classifier, tok, ["abc", "c", "ab ab"], ["neg", "pos"], batch_size=2)
    assert [r["text"] for r in results] == ["abc", "c", "ab ab"]
    for r in results:
        assert set(r["probabilities"]) == {"neg", "pos"} and sum(r["probabilities"].values()) == pytest.approx(1)
        assert r["label"] == max(r["probabilities"], key=r["probabilities"].get)
    # Batching and padding change nothing: each text alone gives the same probabilities.
    alone = [classify_texts(classifier, tok, [t], ["neg", "pos"])[0] for t in ["abc", "c", "ab ab"]]
    for a, b in zip(alone, results):
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-6)
    tagger = TaskModel(base, "tokens", 3).eval()
    (tagged, empty) = tag_texts(tagger, tok, ["ab c", "  "], ["O", "B-X", "I-X"])
    assert tagged["words"] == ["ab", "c"] and len(tagged["tags"]) == 2
    assert empty == {"text": "  ", "words": [], "tags": [], "entities": []}
