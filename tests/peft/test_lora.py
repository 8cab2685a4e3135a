"""LoRA: a module swap that keeps the base's keys, trains only A and B, and merges back exactly."""

import json

import pytest
import torch
import torch.nn as nn

from gptforge.errors import CheckpointError, ConfigError
from gptforge.heads import TaskModel
from gptforge.peft import (LoRALinear, apply_lora, apply_peft, load_lora, load_peft, lora_state_dict,
                           merge_lora, save_lora, save_peft, trainable_parameters)
from tests.peft.peft_utils import assert_only_peft_trained, lm_steps
from tests.peft.peft_utils import tiny_gpt as make


def test_fresh_lora_keeps_keys_and_logits():
    m = make()
    x = torch.randint(0, 97, (2, 10))
    before_logits = m(x)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    swapped = apply_lora(m, rank=4)
    assert swapped == [f"blocks.{i}.{n}" for i in range(2) for n in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")]
    assert isinstance(m.blocks[0].attn.qkv, LoRALinear) and type(m.lm_head) is nn.Linear
    after = m.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert set(after) - set(before) == set(lora_state_dict(m))
    assert "blocks.0.attn.qkv.lora_a.weight" in lora_state_dict(m)
    assert torch.equal(m(x), before_logits)  # B starts at zero


def test_training_changes_only_lora_and_base_stays_bit_identical():
    m = make()
    base = {k: v.clone() for k, v in m.state_dict().items()}
    apply_lora(m, rank=4, alpha=8)
    lora_before = {k: v.clone() for k, v in lora_state_dict(m).items()}
    m.train()
    lm_steps(m)
    for name, p in m.named_parameters():
        if "lora_" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None and not p.requires_grad, name
    assert_only_peft_trained(m, base, lora_before)


def test_merged_model_matches_and_is_a_plain_gpt_again():
    m = make()
    keys = list(m.state_dict())
    apply_lora(m, rank=4)
    lm_steps(m)
    m.eval()
    x = torch.randint(0, 97, (2, 10))
    unmerged = m(x)
    merge_lora(m)
    assert not any(isinstance(mod, LoRALinear) for mod in m.modules())
    assert type(m.blocks[1].mlp.fc) is nn.Linear
    assert list(m.state_dict()) == keys
    assert not torch.equal(m(x), make()(x))  # the update really went into the weights
    assert torch.allclose(m(x), unmerged, atol=1e-5)
    assert not hasattr(m, "peft_config")


def test_layer_merge_is_idempotent():
    torch.manual_seed(0)
    layer = LoRALinear.from_linear(nn.Linear(8, 6), rank=2)
    nn.init.normal_(layer.lora_b.weight)
    x = torch.randn(3, 8)
    y = layer(x)
    layer.merge()
    layer.merge()
    assert layer.merged and torch.allclose(layer(x), y, atol=1e-6)


def test_targets_match_dotted_suffixes_and_never_the_lm_head():
    m = make()
    assert apply_lora(m, targets=("mlp.proj",)) == ["blocks.0.mlp.proj", "blocks.1.mlp.proj"]
    assert type(m.blocks[0].attn.proj) is nn.Linear
    with pytest.raises(ConfigError, match="no Linear layer in model.blocks matches"):
        apply_lora(make(), targets=("lm_head",))


@pytest.mark.parametrize("options, message", [
    (dict(rank=0), "rank must be a positive integer"),
    (dict(alpha=0), "alpha must be positive"),
    (dict(dropout=1.0), "dropout must be in"),
    (dict(targets=()), "at least one layer"),
])
def test_bad_settings_are_config_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        apply_lora(make(), **options)


def test_applying_twice_is_an_error():
    m = make()
    apply_lora(m)
    with pytest.raises(ConfigError, match="already has 'lora'"):
        apply_lora(m)


def test_task_model_keeps_its_head_trainable():
    tm = TaskModel(make(), "classify", num_labels=3)
    apply_lora(tm, rank=2)
    trainable = {n for n, p in tm.named_parameters() if p.requires_grad}
    assert {"head.weight", "head.bias"} <= trainable
    assert all("lora_" in n or n.startswith("head.") for n in trainable)
    frozen_head = TaskModel(make(), "classify", num_labels=3)
    apply_lora(frozen_head, trainable=())
    assert not frozen_head.head.weight.requires_grad


def test_save_and_load_onto_a_fresh_base(tmp_path):
    m = make()
    apply_lora(m, rank=4, alpha=8, targets=("qkv", "fc"))
    lm_steps(m)
    m.eval()
    save_lora(m, tmp_path / "lora", {"base": "tiny-test", "rank": 4})
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config == {"base": "tiny-test", "kind": "lora", "rank": 4, "alpha": 8, "dropout": 0.0,
                      "targets": ["qkv", "fc"]}
    fresh = make()
    load_lora(fresh, tmp_path / "lora")
    x = torch.randint(0, 97, (2, 10))
    assert torch.equal(fresh(x), m(x))
    assert type(fresh.blocks[0].attn.proj) is nn.Linear  # the recorded targets were used
    # a TaskModel wrapping a fresh GPT takes the same file (keys are relative to the GPT)
    tm = TaskModel(make(), "tokens", num_labels=2)
    load_peft(tm, tmp_path / "lora")
    assert torch.equal(tm.base(x), m(x))


def test_save_refuses_a_conflicting_setting_and_load_refuses_the_wrong_shape(tmp_path):
    m = make()
    apply_lora(m, rank=4)
    with pytest.raises(ConfigError, match="rank=8"):
        save_lora(m, tmp_path / "x", {"rank": 8})
    save_lora(m, tmp_path / "lora")
    with pytest.raises(CheckpointError, match="shape"):
        load_lora(make(n_embd=64), tmp_path / "lora")
    with pytest.raises(CheckpointError, match="adapter_config.json"):
        load_lora(make(), tmp_path / "missing")


def test_apply_peft_dispatches_and_checks_options(tmp_path):
    m = make()
    assert apply_peft(m, "lora", rank=2)[0] == "blocks.0.attn.qkv"
    trainable, total = trainable_parameters(m)
    assert trainable == sum(p.numel() for p in lora_state_dict(m).values())
    assert total == make().num_parameters() + trainable
    save_peft(m, tmp_path / "p")
    fresh = make()
    load_peft(fresh, tmp_path / "p")
    assert isinstance(fresh.blocks[0].mlp.fc, LoRALinear)
    with pytest.raises(ConfigError, match="unknown PEFT strategy 'ia3'"):
        apply_peft(make(), "ia3")
    with pytest.raises(ConfigError, match="takes no option 'bottleneck'"):
        apply_peft(make(), "lora", bottleneck=4)
    with pytest.raises(ConfigError, match="no PEFT applied"):
        save_peft(make(), tmp_path / "q")


def test_lora_dropout_acts_on_the_branch_only_while_training():
    torch.manual_seed(0)
    layer = LoRALinear.from_linear(nn.Linear(16, 16), rank=4, dropout=0.5)
    x = torch.randn(2, 16)
    base = layer(x)
    nn.init.normal_(layer.lora_b.weight)
    layer.train()
    assert not torch.equal(layer(x), layer(x))
    layer.eval()
    assert torch.equal(layer(x), layer(x)) and not torch.allclose(layer(x), base)


def test_merge_lora_on_a_task_model():
    tm = TaskModel(make(), "classify", num_labels=2).eval()
    apply_lora(tm, rank=2)
    with torch.no_grad():
        for name, p in tm.named_parameters():
            if "lora_b" in name:
                p.normal_(std=0.1)
    x = torch.randint(0, 97, (2, 6))
    before = tm(x)
    merge_lora(tm)
    assert type(tm.base.blocks[0].attn.qkv) is nn.Linear
    assert torch.allclose(tm(x), before, atol=1e-5)
