"""Strategies train what they say and nothing else: frozen weights stay bit-identical; adapter folders
are small, record their base and load back onto it."""

from __future__ import annotations

import json
import os

import pytest
import torch

from gptforge.checkpoint import MODEL_FILE, file_checksum, load_state_dict, load_task_checkpoint
from gptforge.errors import ConfigError
from gptforge.finetune import finetune

pytestmark = pytest.mark.integration


def base_tensors(model) -> dict[str, torch.Tensor]:
    gpt = model if not hasattr(model, "base") else model.base
    return {k: v for k, v in gpt.state_dict().items() if "lora_" not in k and "adapter" not in k
            and "prefix" not in k and k != "lm_head.weight"}


@pytest.mark.parametrize("strategy, trained", [
    ("head", set()),
    ("top-k", {"blocks.1.", "ln_f."}),
    ("lora", set()),
    ("adapter", set()),
    ("prefix", set()),
])
def test_only_the_chosen_weights_change(make_config, base_checkpoint, strategy, trained):
    config = make_config("classify", strategy=strategy, top_k_layers=1, max_steps=3, eval_interval=3,
                         learning_rate=1e-2, weight_decay=0.1)
    result = finetune(config, progress=False)
    before = load_state_dict(base_checkpoint / MODEL_FILE)
    after = base_tensors(result.model)
    assert set(after) == set(before)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert all(any(k.startswith(prefix) for prefix in trained) for k in changed), sorted(changed)
    if trained:
        assert changed, "top-k trained nothing"
    assert 0 < result.trainable_parameters < result.total_parameters


def test_full_fine_tuning_trains_every_weight(make_config, base_checkpoint):
    result = finetune(make_config("classify", max_steps=2, eval_interval=2), progress=False)
    before = load_state_dict(base_checkpoint / MODEL_FILE)
    after = base_tensors(result.model)
    assert all(not torch.equal(before[k], after[k]) for k in before)
    assert result.trainable_parameters == result.total_parameters


@pytest.mark.parametrize("strategy", ["lora", "adapter", "prefix"])
def test_adapter_folder_is_small_records_its_base_and_reloads(make_config, base_checkpoint, strategy):
    config = make_config("classify", strategy=strategy, max_steps=3, eval_interval=3, learning_rate=1e-2)
    result = finetune(config, progress=False)
    best = result.best_checkpoint
    saved = json.loads((best / "config.json").read_text())
    assert saved["adapter"] == {"strategy": strategy, "base_checkpoint": str(base_checkpoint.resolve()),
                                "base_relative": os.path.relpath(base_checkpoint.resolve(), best.resolve()),
                                "base_fingerprint": "sha256:" + file_checksum(base_checkpoint / MODEL_FILE)}
    assert (best / "adapter_model.safetensors").is_file() and (best / "adapter_config.json").is_file()
    assert set(load_state_dict(best / MODEL_FILE)) == {"head.weight", "head.bias"}
    base_bytes = (base_checkpoint / MODEL_FILE).stat().st_size
    assert (best / "adapter_model.safetensors").stat().st_size < base_bytes / 2

    loaded = load_task_checkpoint(best)
    ids = torch.tensor([[3, 4, 5, 6], [7, 8, 9, 10]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids, attention_mask=mask), result.model(ids, attention_mask=mask))


def test_lora_merge_writes_a_full_checkpoint_with_the_same_outputs(make_config):
    config = make_config("classify", strategy="lora", merge=True, max_steps=3, eval_interval=3, learning_rate=1e-2)
    result = finetune(config, progress=False)
    merged = load_task_checkpoint(result.merged_checkpoint)
    adapter = load_task_checkpoint(result.best_checkpoint)
    assert "adapter" not in json.loads((result.merged_checkpoint / "config.json").read_text())
    assert not any("lora" in k for k in load_state_dict(result.merged_checkpoint / MODEL_FILE))
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        torch.testing.assert_close(merged.model(ids), adapter.model(ids), rtol=1e-5, atol=1e-5)


def test_head_only_has_no_meaning_for_a_language_model(make_config):
    with pytest.raises(ConfigError, match="task 'lm' has none"):
        make_config("lm", strategy="head")
