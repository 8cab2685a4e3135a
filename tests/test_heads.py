"""TaskModel: a classifier on the GPT's last real token, or one label per token."""

import pytest
import torch

from gptforge.config import ModelConfig
from gptforge.errors import CheckpointError, ConfigError
from gptforge.heads import TaskModel, head_state_dict, load_head
from gptforge.model import GPT


def make(**kw) -> GPT:
    torch.manual_seed(0)
    cfg = dict(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32)
    cfg.update(kw)
    return GPT(ModelConfig(**cfg))


def test_classify_reads_the_last_real_token_of_right_padded_rows():
    tm = TaskModel(make(), "classify", num_labels=3).eval()
    a = torch.randint(1, 97, (1, 9))
    b = torch.randint(1, 97, (1, 5))
    batch = torch.cat([a, torch.cat([b, torch.zeros(1, 4, dtype=torch.long)], dim=1)])
    mask = torch.tensor([[1] * 9, [1] * 5 + [0] * 4])
    out = tm(batch, attention_mask=mask)
    assert out.shape == (2, 3)
    assert torch.allclose(out[0], tm(a)[0], atol=1e-5)
    assert torch.allclose(out[1], tm(b)[0], atol=1e-5)
    # without the mask the padded row is read at its last (padding) position, which differs
    assert not torch.allclose(tm(batch)[1], out[1], atol=1e-4)
    # and the logits are the head applied to that hidden state
    hidden = tm.base.hidden_states(b)[0, -1]
    assert torch.allclose(out[1], tm.head(hidden), atol=1e-5)


def test_tokens_gives_one_prediction_per_position():
    tm = TaskModel(make(), "tokens", num_labels=5).eval()
    x = torch.randint(0, 97, (3, 7))
    out = tm(x, attention_mask=torch.ones(3, 7))
    assert out.shape == (3, 7, 5)
    assert torch.allclose(out, tm.head(tm.base.hidden_states(x)), atol=1e-6)


def test_head_dropout_is_active_only_in_training():
    tm = TaskModel(make(), "classify", num_labels=2, dropout=0.5)
    x = torch.randint(0, 97, (4, 6))
    tm.train()
    assert not torch.equal(tm(x), tm(x))
    tm.eval()
    assert torch.equal(tm(x), tm(x))


def test_submodule_names_and_gradients():
    tm = TaskModel(make(), "classify", num_labels=4)
    assert dict(tm.named_children()).keys() >= {"base", "head"}
    assert {k for k in tm.state_dict() if not k.startswith("base.")} == {"head.weight", "head.bias"}
    tm(torch.randint(0, 97, (2, 6))).sum().backward()
    assert tm.head.weight.grad is not None and tm.base.blocks[0].attn.qkv.weight.grad is not None


@pytest.mark.parametrize("task, num_labels, message", [
    ("regress", 2, "unknown task 'regress'"),
    ("classify", 1, "num_labels must be an integer of at least 2"),
    ("tokens", 0, "num_labels must be an integer of at least 2"),
])
def test_bad_settings_are_config_errors(task, num_labels, message):
    with pytest.raises(ConfigError, match=message):
        TaskModel(make(), task, num_labels)


def test_head_state_round_trip_and_mismatch():
    trained = TaskModel(make(), "classify", num_labels=3)
    with torch.no_grad():
        trained.head.bias.fill_(0.7)
    state = head_state_dict(trained)
    assert set(state) == {"head.weight", "head.bias"} and state["head.weight"].shape == (3, 32)
    fresh = TaskModel(make(), "classify", num_labels=3).eval()
    load_head(fresh, state)
    x = torch.randint(0, 97, (2, 6))
    assert torch.equal(fresh(x), trained.eval()(x))
    with pytest.raises(CheckpointError, match="num_labels 4"):
        load_head(TaskModel(make(), "classify", num_labels=4), state)
    with pytest.raises(CheckpointError, match="lack 'head.bias'"):
        load_head(fresh, {"head.weight": state["head.weight"]})
