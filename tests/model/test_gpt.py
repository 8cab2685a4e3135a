"""The model: shapes, causality, tied head, scaled init, KV cache, padding masks."""

import math

import pytest
import torch

from gptforge.config import ModelConfig
from gptforge.errors import ConfigError
from gptforge.model import GPT
from tests.model_utils import assert_left_padding_matches_unpadded


def make(**kw) -> GPT:
    torch.manual_seed(0)
    cfg = dict(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32)
    cfg.update(kw)
    return GPT(ModelConfig(**cfg)).eval()


def test_logits_shape_and_tied_head():
    m = make()
    x = torch.randint(0, 97, (3, 10))
    assert m(x).shape == (3, 10, 97)
    assert m(x, last_only=True).shape == (3, 1, 97)
    assert m.lm_head.weight.data_ptr() == m.wte.weight.data_ptr()
    untied = make(tie_embeddings=False)
    assert untied.lm_head.weight.data_ptr() != untied.wte.weight.data_ptr()


def test_future_tokens_do_not_change_past_logits():
    m = make()
    x = torch.randint(0, 97, (1, 12))
    y = x.clone()
    y[0, 8:] = (y[0, 8:] + 1) % 97
    assert torch.allclose(m(x)[:, :8], m(y)[:, :8], atol=1e-6)
    assert not torch.allclose(m(x)[:, 8:], m(y)[:, 8:])


def test_residual_projections_get_scaled_init():
    m = make(n_layer=8, n_embd=64, n_head=4)
    std_proj = m.blocks[0].attn.proj.weight.std().item()
    std_qkv = m.blocks[0].attn.qkv.weight.std().item()
    assert std_qkv == pytest.approx(0.02, rel=0.1)
    assert std_proj == pytest.approx(0.02 / math.sqrt(16), rel=0.15)


def test_kv_cache_matches_full_recompute():
    m = make()
    x = torch.randint(0, 97, (2, 20))
    full = m(x)
    cache = m.new_kv_cache(2)
    parts = [m(x[:, :7], kv_cache=cache), m(x[:, 7:12], kv_cache=cache)]
    parts += [m(x[:, i:i + 1], kv_cache=cache) for i in range(12, 20)]
    assert cache.length == 20
    assert torch.allclose(full, torch.cat(parts, dim=1), atol=1e-5)


def test_left_padding_with_mask_matches_unpadded():
    assert_left_padding_matches_unpadded(make(), 97)


def test_context_longer_than_block_size_is_a_clear_error():
    m = make(block_size=8)
    with pytest.raises(ConfigError, match="context of 9 tokens is longer than the model's block_size \\(8\\)"):
        m(torch.zeros(1, 9, dtype=torch.long))


def test_training_mode_dropout_is_active():
    m = make(dropout=0.5).train()
    x = torch.randint(0, 97, (1, 10))
    assert not torch.allclose(m(x), m(x))


def test_parameter_count_of_gpt2_small_on_meta_device():
    with torch.device("meta"):
        m = GPT(ModelConfig.from_preset("gpt2"))
    assert m.num_parameters() == 124_439_808  # the published 124M


def test_attention_and_the_block_stack_are_swappable_without_changing_keys():
    # What a backend swaps in (gptforge.backends): a subclass of Attention or of Blocks, holding no tensors.
    from gptforge.model import Attention, Blocks

    m, plain = make(), make()
    seen = []

    class SpyAttention(Attention):
        def forward(self, q, k, v, mask, kv_cache, dropout_p):
            seen.append(q.shape)
            return super().forward(q, k, v, mask, kv_cache, dropout_p)

    class SpyBlocks(Blocks):
        def forward(self, x, mask, kv_cache):
            seen.append("blocks")
            return super().forward(x, mask, kv_cache)

    for block in m.blocks:
        block.attn.attend = SpyAttention()
    m.blocks = SpyBlocks(m.blocks)
    x = torch.randint(0, 97, (2, 7))
    assert torch.equal(m(x), plain(x))
    assert seen == ["blocks", (2, 4, 7, 8), (2, 4, 7, 8)]
    assert list(m.state_dict()) == list(plain.state_dict())
