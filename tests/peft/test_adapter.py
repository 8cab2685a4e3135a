"""Bottleneck adapters: identity at init, only they train, small files that load back exactly."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from gptforge.errors import CheckpointError, ConfigError
from gptforge.model import GPT
from gptforge.peft import (Adapter, adapter_state_dict, apply_adapters, apply_lora, load_adapters, load_peft,
                           save_adapters, save_peft)
from tests.peft.peft_utils import assert_only_peft_trained, lm_steps, tiny_gpt


def make(**kw) -> GPT:
    return tiny_gpt(**{"vocab_size": 512, **kw})


def test_fresh_adapters_are_the_identity_and_keep_the_keys():
    m = make()
    x = torch.randint(0, 512, (2, 10))
    before_logits = m(x)
    before = dict(m.state_dict())
    n = apply_adapters(m, bottleneck=4)
    assert n == 2 * 2 * (32 * 4 + 4 + 4 * 32 + 32)  # two per block: down + up, with biases
    assert isinstance(m.blocks[1].mlp_adapter, Adapter)
    state = m.state_dict()
    assert all(torch.equal(state[k], v) for k, v in before.items())
    assert set(state) - set(before) == set(adapter_state_dict(m))
    assert torch.equal(m(x), before_logits)


def test_adapter_runs_after_its_sublayer():
    # With a non-zero up-projection the adapter must change the output (the hook is live) and
    # equal the Houlsby formula x + adapter(attn(ln_1(x))) computed by hand.
    m = make()
    apply_adapters(m, bottleneck=4)
    block = m.blocks[0]
    torch.nn.init.normal_(block.attn_adapter.up.weight, std=0.5)
    x = torch.randn(1, 5, 32)
    with torch.no_grad():
        h = block.attn.proj(  # attention by hand, without calling block.attn (which would run the hook)
            F.scaled_dot_product_attention(
                *[t.view(1, 5, 4, 8).transpose(1, 2) for t in block.attn.qkv(block.ln_1(x)).split(32, dim=2)],
                is_causal=True).transpose(1, 2).reshape(1, 5, 32))
        mid = x + block.attn_adapter(h)
        expected = mid + block.mlp_adapter(block.mlp(block.ln_2(mid)))
        assert torch.allclose(block(x), expected, atol=1e-6)


def test_training_changes_only_adapters_and_base_stays_bit_identical():
    m = make()
    base = {k: v.clone() for k, v in m.state_dict().items()}
    apply_adapters(m, bottleneck=4)
    adapters_before = {k: v.clone() for k, v in adapter_state_dict(m).items()}
    m.train()
    lm_steps(m)
    for name, p in m.named_parameters():
        is_adapter = "_adapter." in name
        assert p.requires_grad == is_adapter, name
        if is_adapter:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert_only_peft_trained(m, base, adapters_before)


def test_small_file_loads_onto_a_fresh_base(tmp_path):
    from safetensors.torch import save_file

    m = make()
    apply_adapters(m, bottleneck=2)
    lm_steps(m)
    m.eval()
    save_adapters(m, tmp_path / "adapters", {"task": "lm"})
    save_file({k: v.contiguous() for k, v in make().state_dict().items() if k != "lm_head.weight"},
              str(tmp_path / "base.safetensors"))
    adapter_bytes = (tmp_path / "adapters" / "adapter_model.safetensors").stat().st_size
    assert adapter_bytes < 0.05 * (tmp_path / "base.safetensors").stat().st_size
    config = json.loads((tmp_path / "adapters" / "adapter_config.json").read_text())
    assert config == {"task": "lm", "kind": "adapter", "bottleneck": 2}

    fresh = make()
    load_adapters(fresh, tmp_path / "adapters")
    x = torch.randint(0, 512, (2, 10))
    assert torch.equal(fresh(x), m(x))
    assert not torch.equal(fresh(x), make()(x))  # the trained adapters are in use


def test_deepcopy_rebinds_the_hooks_to_the_copied_adapters():
    m = make()
    apply_adapters(m, bottleneck=4)
    twin = copy.deepcopy(m)
    x = torch.randint(0, 512, (1, 8))
    before = m(x)
    with torch.no_grad():
        twin.blocks[0].mlp_adapter.up.bias.fill_(1.0)
    assert torch.equal(m(x), before)
    assert not torch.allclose(twin(x), before)


def test_errors(tmp_path):
    with pytest.raises(ConfigError, match="bottleneck must be a positive integer"):
        apply_adapters(make(), bottleneck=0)
    m = make()
    apply_lora(m)
    with pytest.raises(ConfigError, match="already has 'lora'"):
        apply_adapters(m)
    save_peft(m, tmp_path / "lora")
    with pytest.raises(CheckpointError, match="holds a 'lora' adapter, not 'adapter'"):
        load_adapters(make(), tmp_path / "lora")
    a = make()
    apply_adapters(a, bottleneck=4)
    save_adapters(a, tmp_path / "a")
    with pytest.raises(CheckpointError, match="shape"):
        load_peft(make(n_embd=64), tmp_path / "a")
