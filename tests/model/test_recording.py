"""The eager attention path (gptforge.model.recording): the probabilities it records are the model's own
(recomputed here from a block's weights), the outputs are those of the normal path, and the normal path is
restored on exit, also on error and on a model whose attention and block stack a backend swapped."""

from __future__ import annotations

import math

import pytest
import torch

from gptforge.config import ModelConfig
from gptforge.model import GPT
from gptforge.model.gpt import Attention
from gptforge.model.recording import RecordingAttention, prefix_length, recording_attention


def tiny_gpt(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    config = dict(vocab_size=40, block_size=32, n_layer=3, n_head=4, n_embd=32)
    return GPT(ModelConfig(**{**config, **overrides})).eval()


@torch.no_grad()
def slow_attention(model: GPT, idx: torch.Tensor, layer: int) -> torch.Tensor:
    """Layer ``layer``'s attention probabilities (B, H, T, T), the slow way: the residual stream up to that
    block, its LayerNorm, q and k from its qkv weights, masked softmax of q k^T / sqrt(D)."""
    B, T = idx.shape
    x = model.wte(idx) + model.wpe(torch.arange(T).unsqueeze(0))
    for block in list(model.blocks)[:layer]:
        x = block(x)
    block = model.blocks[layer]
    h = block.ln_1(x)
    C, H = model.config.n_embd, model.config.n_head
    D = C // H
    w, b = block.attn.qkv.weight, block.attn.qkv.bias
    q = (h @ w[:C].T + b[:C]).view(B, T, H, D).transpose(1, 2)
    k = (h @ w[C:2 * C].T + b[C:2 * C]).view(B, T, H, D).transpose(1, 2)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(D)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(-1)


def test_recorded_probabilities_are_the_models_own():
    model = tiny_gpt()
    idx = torch.randint(0, 40, (2, 11))
    with torch.no_grad(), recording_attention(model) as layers:
        model(idx)
    assert len(layers) == 3
    for layer, probs in enumerate(layers):
        assert probs.shape == (2, 4, 11, 11)
        assert torch.allclose(probs.sum(-1), torch.ones(2, 4, 11), atol=1e-5)  # rows sum to 1
        assert (probs.triu(diagonal=1) == 0).all()  # causal: no query sees a later key
        assert torch.allclose(probs, slow_attention(model, idx, layer), atol=1e-5)


def test_recorded_path_gives_the_normal_paths_logits():
    model = tiny_gpt(1)
    idx = torch.randint(0, 40, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0  # left padding: the masked path
    with torch.no_grad():
        plain = model(idx)
        padded = model(idx, attention_mask=mask)
        with recording_attention(model) as layers:
            recorded = model(idx)
            recorded_padded = model(idx, attention_mask=mask)
        assert torch.allclose(recorded, plain, atol=1e-5)
        assert torch.allclose(recorded_padded, padded, atol=1e-5)
        assert (layers[0][1, :, 3:, :3] == 0).all()  # real queries give padding no attention


def test_a_cached_decode_step_records_its_row():
    model = tiny_gpt(2)
    idx = torch.randint(0, 40, (1, 8))
    with torch.no_grad():
        full = model(idx)
        with recording_attention(model) as layers:
            cache = model.new_kv_cache(1)
            model(idx[:, :7], kv_cache=cache)
            step = model(idx[:, 7:], kv_cache=cache)
    assert torch.allclose(step[0, -1], full[0, -1], atol=1e-5)
    assert layers[1].shape == (1, 4, 1, 8)
    assert torch.allclose(layers[1][0, :, 0], slow_attention(model, idx, 1)[0, :, -1], atol=1e-5)


def test_the_normal_path_is_restored_on_exit_and_on_error():
    model = tiny_gpt(3)
    originals = [block.attn.attend for block in model.blocks]
    idx = torch.randint(0, 40, (1, 6))
    with torch.no_grad():
        with recording_attention(model) as layers:
            assert all(type(block.attn.attend) is RecordingAttention for block in model.blocks)
            model(idx)
        seen = [t.clone() for t in layers]
        assert [block.attn.attend for block in model.blocks] == originals
        assert all(type(a) is Attention for a in originals)
        model(torch.randint(0, 40, (1, 4)))  # runs the normal path: nothing is recorded any more
        assert all(torch.equal(a, b) for a, b in zip(layers, seen))
        with pytest.raises(ZeroDivisionError):
            with recording_attention(model):
                1 / 0
        assert [block.attn.attend for block in model.blocks] == originals
        with recording_attention(model):
            with pytest.raises(RuntimeError, match="already being recorded"):
                with recording_attention(model):
                    pass
        assert [block.attn.attend for block in model.blocks] == originals


def test_recording_a_prepared_model_runs_the_torch_path_and_restores_its_kernels():
    """prepare_for_inference swaps in the CPU backend's attention and fused block stack (and packed linears);
    recording replaces whichever attention a block has, the fused stack then runs the model's own loop, and
    the backend's modules are back afterwards."""
    from gptforge.backends import prepare_for_inference
    from gptforge.backends.cpu import FusedDecodeBlocks, NativeAttention

    model = tiny_gpt(4)
    idx = torch.randint(0, 40, (1, 10))
    with torch.no_grad():
        reference = [slow_attention(model, idx, layer) for layer in range(3)]
        logits = model(idx)
    prepare_for_inference(model)
    assert isinstance(model.blocks, FusedDecodeBlocks)
    assert all(type(block.attn.attend) is NativeAttention for block in model.blocks)
    with torch.no_grad():
        prepared_logits = model(idx)
        with recording_attention(model) as layers:
            recorded = model(idx)
    assert torch.allclose(recorded, prepared_logits, atol=1e-4)
    assert torch.allclose(recorded, logits, atol=1e-4)
    assert all(type(block.attn.attend) is NativeAttention for block in model.blocks)
    with torch.no_grad(), recording_attention(model) as layers:
        model(idx)
    for got, want in zip(layers, reference):
        assert torch.allclose(got, want, atol=1e-4)
    with torch.no_grad(), recording_attention(model) as layers:  # a decode step: the fused stack steps aside
        cache = model.new_kv_cache(1)
        model(idx[:, :9], kv_cache=cache)
        model(idx[:, 9:], kv_cache=cache)
    assert layers[2].shape == (1, 4, 1, 10)
    assert torch.allclose(layers[2][0, :, 0], reference[2][0, :, -1], atol=1e-4)


def test_a_prefix_tuned_model_records_its_prefix_keys_first():
    from gptforge.peft.prefix import apply_prefix

    model = tiny_gpt(5)
    apply_prefix(model, prefix_length=3)
    model.eval()
    assert prefix_length(model) == 3
    idx = torch.randint(0, 40, (1, 7))
    with torch.no_grad():
        plain = model(idx)
        with recording_attention(model) as layers:
            recorded = model(idx)
    assert torch.allclose(recorded, plain, atol=1e-5)
    probs = layers[0]
    assert probs.shape == (1, 4, 7, 3 + 7)
    assert torch.allclose(probs.sum(-1), torch.ones(1, 4, 7), atol=1e-5)
    assert (probs[..., 3:].triu(diagonal=1) == 0).all()  # the tokens' part stays causal
    assert (probs[..., :3] > 0).all()  # every query sees the whole prefix
    assert prefix_length(tiny_gpt()) == 0
