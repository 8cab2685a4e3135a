"""Prefix-tuning: learned keys/values every query attends to; causal order, padding and KV cache intact."""

import json

import pytest
import torch

from gptforge.errors import CheckpointError, ConfigError
from gptforge.model import GPT
from gptforge.peft import (PrefixEncoder, apply_prefix, fold_prefix, load_peft, load_prefix, prefix_state_dict,
                           save_prefix)
from tests.model_utils import assert_left_padding_matches_unpadded
from tests.peft.peft_utils import assert_only_peft_trained, lm_steps
from tests.peft.peft_utils import tiny_gpt as make


def prefixed(prefix_length=4, **kw) -> GPT:
    m = make()
    apply_prefix(m, prefix_length, **kw)
    with torch.no_grad():  # larger than the init so that the tests below are sensitive to it
        for p in m.prefix_encoder.parameters():
            p.normal_(std=0.5)
    return m


def test_without_a_prefix_the_hook_is_off():
    m = make()
    assert all(block.attn.prefix is None for block in m.blocks)


def test_prefix_is_attended_and_keeps_causality_and_keys():
    m = make()
    x = torch.randint(0, 97, (2, 12))
    base_logits = m(x)
    keys = set(m.state_dict())
    assert apply_prefix(m, 4) == 2 * 2 * 4 * 4 * 8  # layers * (k, v) * heads * P * head_dim
    assert set(m.state_dict()) - keys == {"prefix_encoder.table"}
    out = m(x)
    assert not torch.allclose(out, base_logits, atol=1e-4)  # even at init, every position sees the prefix
    assert not torch.allclose(out[:, 0], base_logits[:, 0], atol=1e-4)
    y = x.clone()
    y[:, 8:] = (y[:, 8:] + 1) % 97
    assert torch.allclose(m(y)[:, :8], out[:, :8], atol=1e-6)  # future tokens still invisible


def test_prefix_attention_matches_a_reference():
    # One layer by hand: softmax over [prefix keys, causal real keys].
    m = prefixed(3)
    attn = m.blocks[0].attn
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        q, k, v = [t.view(2, 5, 4, 8).transpose(1, 2) for t in attn.qkv(x).split(32, dim=2)]
        kp, vp = m.prefix_encoder(0, 2)
        scores = q @ torch.cat([kp, k], 2).transpose(-1, -2) / 8 ** 0.5  # (B, H, T, P + T)
        causal = torch.ones(5, 5, dtype=torch.bool).tril()
        allowed = torch.cat([torch.ones(5, 3, dtype=torch.bool), causal], 1)
        y = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ torch.cat([vp, v], 2)
        expected = attn.proj(y.transpose(1, 2).reshape(2, 5, 32))
        assert torch.allclose(attn(x, None, None), expected, atol=1e-5)


@pytest.mark.parametrize("reparameterize", [False, True])
def test_kv_cache_decoding_equals_full_recompute(reparameterize):
    m = prefixed(5, reparameterize=reparameterize, hidden_size=16)
    x = torch.randint(0, 97, (2, 16))
    full = m(x)
    cache = m.new_kv_cache(2)
    parts = [m(x[:, :6], kv_cache=cache), m(x[:, 6:9], kv_cache=cache)]
    parts += [m(x[:, i:i + 1], kv_cache=cache) for i in range(9, 16)]
    assert cache.length == 16  # the cache holds only the real tokens
    assert torch.allclose(full, torch.cat(parts, dim=1), atol=1e-5)


def test_left_padding_keeps_the_prefix_visible():
    assert_left_padding_matches_unpadded(prefixed(4), 97)


@pytest.mark.parametrize("reparameterize", [False, True])
def test_training_changes_only_the_prefix(reparameterize):
    m = make()
    base = {k: v.clone() for k, v in m.state_dict().items()}
    apply_prefix(m, 4, reparameterize=reparameterize, hidden_size=16)
    before = {k: v.clone() for k, v in prefix_state_dict(m).items()}
    m.train()
    lm_steps(m)
    for name, p in m.named_parameters():
        assert p.requires_grad == name.startswith("prefix_encoder."), name
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert_only_peft_trained(m, base, before)


def test_fold_keeps_the_prefixes():
    m = prefixed(3, reparameterize=True, hidden_size=16)
    x = torch.randint(0, 97, (2, 8))
    before = m(x)
    fold_prefix(m)
    assert not m.prefix_encoder.reparameterized
    assert set(prefix_state_dict(m)) == {"prefix_encoder.table"}
    assert torch.allclose(m(x), before, atol=1e-6)


@pytest.mark.parametrize("reparameterize", [False, True])
def test_save_and_load_onto_a_fresh_base(tmp_path, reparameterize):
    m = prefixed(3, reparameterize=reparameterize, hidden_size=16)
    save_prefix(m, tmp_path / "prefix")
    config = json.loads((tmp_path / "prefix" / "adapter_config.json").read_text())
    assert config == {"kind": "prefix", "prefix_length": 3, "reparameterize": reparameterize, "hidden_size": 16}
    fresh = make()
    load_peft(fresh, tmp_path / "prefix")
    x = torch.randint(0, 97, (2, 8))
    assert torch.equal(fresh(x), m(x))


def test_errors(tmp_path):
    with pytest.raises(ConfigError, match="prefix_length must be a positive integer"):
        apply_prefix(make(), 0)
    with pytest.raises(ConfigError, match="no prefix to fold"):
        fold_prefix(make())
    m = prefixed(3)
    save_prefix(m, tmp_path / "p")
    other = make()
    apply_prefix(other, 5)
    with pytest.raises(CheckpointError, match="shape"):
        load_prefix(other, tmp_path / "p")


def test_encoder_shapes_broadcast_over_the_batch():
    enc = PrefixEncoder(n_layer=3, n_head=2, head_dim=4, prefix_length=5)
    k, v = enc(2, batch_size=7)
    assert k.shape == v.shape == (7, 2, 5, 4)
    assert torch.equal(k[0], enc.table[2, 0]) and torch.equal(v[6], enc.table[2, 1])
