"""Each task learns its tiny data set, reports before and after, and saves a checkpoint that loads back."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gptforge.checkpoint import load_checkpoint, load_pretrained, load_task_checkpoint
from gptforge.data.finetune import IGNORE_INDEX, collate, encode_lm_examples, load_lm_examples
from gptforge.evaluate.predict import classify_texts, tag_texts
from gptforge.finetune import finetune
from gptforge.heads import forward_loss
from gptforge.train.metrics import read_metrics

pytestmark = pytest.mark.integration


def test_classification_learns_and_reports_before_and_after(make_config):
    config = make_config("classify", max_steps=40, eval_interval=20, dropout=0.1)
    result = finetune(config, progress=False)
    out = Path(config.out_dir)

    assert result.labels == ["neg", "pos"]
    assert result.before["metrics"]["accuracy"] < 0.9
    assert result.after["metrics"]["accuracy"] >= 0.9  # the threshold this tiny task must reach
    assert result.after["metrics"]["val_loss"] < result.before["metrics"]["val_loss"]
    report = result.after["report"]
    assert set(report["per_class"]) == {"neg", "pos"} and len(report["confusion_matrix"]) == 2
    assert (out / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((out / "report.json").read_text())
    assert saved["after"]["metrics"] == result.after["metrics"] and saved["before"] == result.before
    vals = [r["step"] for r in read_metrics(out / "metrics.jsonl") if "val_accuracy" in r]
    assert vals == [0, 20, 40]

    # The best checkpoint is a task checkpoint: base tensors plus head.weight / head.bias.
    loaded = load_task_checkpoint(result.best_checkpoint)
    assert loaded.config["task"] == {"type": "classify", "labels": ["neg", "pos"], "chat_template": None}
    predictions = classify_texts(loaded.model, loaded.tokenizer, ["the good movie", "very bad plot"], ["neg", "pos"])
    assert [p["label"] for p in predictions] == ["pos", "neg"]
    assert sum(predictions[0]["probabilities"].values()) == pytest.approx(1.0)


def test_a_classifier_checkpoint_still_loads_as_a_language_model(make_config, caplog):
    config = make_config("classify", max_steps=2, eval_interval=2)
    result = finetune(config, progress=False)
    with caplog.at_level(logging.WARNING, logger="gptforge"):
        lm = load_checkpoint(result.best_checkpoint)
    assert "fine-tuned for task 'classify'" in caplog.text
    trained_base = result.model.base
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(lm.model(ids), trained_base(ids), rtol=0, atol=0)


def test_token_tagging_learns_entities(make_config):
    config = make_config("tokens", max_steps=60, eval_interval=30, learning_rate=5e-3)
    result = finetune(config, progress=False)
    metrics = result.after["metrics"]
    assert result.labels == ["B-LOC", "B-PER", "I-LOC", "O"]
    assert metrics["entity_f1"] >= 0.9, metrics  # the threshold this tiny task must reach
    assert metrics["entity_f1"] > result.before["metrics"]["entity_f1"]
    assert set(result.after["report"]["per_class"]) == {"LOC", "PER"}

    loaded = load_task_checkpoint(result.best_checkpoint)
    tagged = tag_texts(loaded.model, loaded.tokenizer, ["zed visited upper jena"], loaded.config["task"]["labels"])[0]
    assert tagged["tags"] == ["B-PER", "O", "B-LOC", "I-LOC"]
    assert [(e["type"], e["text"]) for e in tagged["entities"]] == [("PER", "zed"), ("LOC", "upper jena")]


def test_lm_fine_tuning_lowers_validation_loss_and_keeps_the_template(make_config):
    config = make_config("lm", max_steps=20, eval_interval=10)
    result = finetune(config, progress=False)
    before, after = result.before["metrics"], result.after["metrics"]
    assert after["val_loss"] < before["val_loss"] - 0.5
    assert after["perplexity"] == pytest.approx(torch.tensor(after["val_loss"]).exp().item(), rel=1e-5)
    assert after["bits_per_byte"] > 0
    loaded = load_task_checkpoint(result.best_checkpoint)
    assert loaded.config["task"]["type"] == "lm" and "{content}" in loaded.config["task"]["chat_template"]


def test_masked_prompt_tokens_contribute_nothing_to_the_loss(base_checkpoint, datasets):
    source = load_pretrained(base_checkpoint)
    model, tok = source.model, source.tokenizer
    examples = load_lm_examples(datasets["lm"][0])[:4]
    template = "{content}{end}"
    masked = encode_lm_examples(tok, examples, template=template, max_length=64)
    full = encode_lm_examples(tok, examples, template=template, train_on_prompt=True, max_length=64)
    assert [e.input_ids for e in masked] == [e.input_ids for e in full]
    assert all(IGNORE_INDEX in e.labels for e in masked) and all(IGNORE_INDEX not in e.labels for e in full)

    batch = collate(masked, pad_id=tok.eos_id)
    with torch.no_grad():
        loss_sum, scored, logits = forward_loss(model, batch, "lm")
        # By hand: next-token cross-entropy at the unmasked positions only.
        expected, count = 0.0, 0
        for row, example in enumerate(masked):
            for t in range(1, len(example.input_ids)):
                if example.labels[t] != IGNORE_INDEX:
                    expected += F.cross_entropy(logits[row, t - 1], torch.tensor(example.input_ids[t])).item()
                    count += 1
    assert int(scored) == count
    assert loss_sum.item() == pytest.approx(expected, rel=1e-5)

    # Training on the prompt as well scores more tokens, and the same ids give a larger total.
    with torch.no_grad():
        full_sum, full_scored, _ = forward_loss(model, collate(full, pad_id=tok.eos_id), "lm")
    assert int(full_scored) > count and full_sum.item() > loss_sum.item()
