"""int8 weight-only quantization: per-channel rounding, each kernel, the module swap, a trained model's quality."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from gptforge.config import GenerateConfig, ModelConfig
from gptforge.errors import ConfigError
from gptforge.evaluate import evaluate_lm
from gptforge.generate import generate_tokens
from gptforge.model import GPT
from gptforge.backends.cpu.layouts import pack_amx, quantize_weight, unpack_amx
from gptforge.backends.quant import (Int8Linear, amx_available, default_kernel, fbgemm_available, panel_available,
                                     quantize_int8)

KERNELS = ["dequant", "int8pack", "fbgemm", "panel", "amx"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def hard_input(*shape, k: int) -> torch.Tensor:
    """Rows of very different scale with one outlier channel: per-tensor activation rounding fails on it."""
    torch.manual_seed(3)
    x = torch.randn(*shape, k)
    x[..., 5] *= 40.0
    x[0] *= 1e-3
    return x


def test_quantize_weight_is_symmetric_per_output_channel():
    torch.manual_seed(0)
    w = torch.randn(6, 40) * torch.logspace(-3, 1, 6).unsqueeze(1)  # rows spanning four decades
    w[2] = 0.0
    q, scales = quantize_weight(w)
    assert q.dtype == torch.int8 and scales.dtype == torch.float32
    assert int(q.abs().max()) == 127 and int(q.min()) >= -127
    nonzero = [i for i in range(6) if i != 2]
    torch.testing.assert_close(scales[nonzero], w[nonzero].abs().amax(1) / 127)
    assert (q.float() * scales.unsqueeze(1) - w).abs().le(scales.unsqueeze(1) / 2 + 1e-7).all()
    assert (q[2] == 0).all() and scales[2] == 1.0  # an all-zero row gets no NaN scale


@pytest.mark.parametrize("kernel", KERNELS)
def test_each_kernel_computes_the_dequantized_product(kernel):
    if kernel == "fbgemm" and not fbgemm_available():
        pytest.skip("fbgemm is not available on this machine")
    if kernel == "panel" and not panel_available():
        pytest.skip("the native panel kernel is not available on this machine")
    if kernel == "amx" and not amx_available():
        pytest.skip("this CPU has no AMX-INT8 (or the native kernels are unavailable)")
    torch.manual_seed(1)
    linear = nn.Linear(96, 200)
    module = Int8Linear.from_linear(linear, kernel=kernel)
    assert module.resolved_kernel(torch.device("cpu")) == kernel
    x = hard_input(3, 5, k=96)
    y = module(x)
    reference = F.linear(x, module.dequantized_weight(), module.bias)
    assert y.shape == (3, 5, 200) and y.dtype == torch.float32
    # Weight-only: the activations are not rounded (fbgemm's split keeps ~14 bits, amx's ~16, even for the
    # 1e-3 row and the outlier channel).
    bound = {"panel": 1e-5, "amx": 3e-4}.get(kernel, 2e-3)  # panel: float x
    for row in range(3):
        assert rel_err(y[row], reference[row]) < bound
    assert rel_err(y, linear(x)) < 2e-2  # what is left is the weight's own rounding


def test_pack_amx_is_the_b_tile_layout_and_round_trips():
    torch.manual_seed(0)
    w = torch.randint(-127, 128, (37, 70), dtype=torch.int8)
    packed = pack_amx(w)
    assert packed.shape == (3, 32, 64) and packed.dtype == torch.int8  # 37 -> 3 strips, 70 -> 128 inputs
    assert int(packed[1, 5, 4 * 3 + 2]) == int(w[16 + 3, 4 * 5 + 2])  # strip 1, k-group 5, output 3, byte 2
    assert torch.equal(unpack_amx(packed, 37, 70), w)
    assert int(packed[2, :, 4 * 5:].abs().sum()) == 0 and int(packed[:, 18:].abs().sum()) == 0  # zero padding


def test_quantize_int8_swaps_only_linear_layers():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32)).eval()
    linear_names = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    others = {n: m for n, m in model.named_modules() if n and not isinstance(m, nn.Linear)}
    wte = model.wte.weight.detach().clone()
    assert quantize_int8(model) is model
    assert {n for n, m in model.named_modules() if isinstance(m, Int8Linear)} == linear_names
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    for name, module in others.items():  # embeddings, LayerNorms, containers: the very same objects
        assert model.get_submodule(name) is module
    # The tied head got a quantized copy; the embedding itself stays float and unchanged.
    assert model.wte.weight.dtype == torch.float32 and torch.equal(model.wte.weight, wte)
    assert rel_err(model.lm_head.dequantized_weight(), wte) < 1e-2


def test_include_lm_head_false_keeps_the_tied_float_head():
    model = GPT(ModelConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=32))
    quantize_int8(model, include_lm_head=False)
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.wte.weight
    assert isinstance(model.blocks[0].mlp.fc, Int8Linear)


def test_unknown_kernel_is_a_config_error():
    with pytest.raises(ConfigError, match="int8 kernel"):
        quantize_int8(GPT(ModelConfig(vocab_size=10, block_size=8, n_layer=1, n_head=1, n_embd=8)), kernel="fp4")


def test_cpu_default_kernel_is_a_fast_one():
    kernel = default_kernel(torch.device("cpu"))
    assert kernel in KERNELS
    if amx_available():
        assert kernel == "amx"  # int8 tiles: weight-bandwidth-bound at every decode size
    elif panel_available():
        assert kernel == "panel"  # gptforge's own: faster than fbgemm at decode sizes, batch-invariant
    elif fbgemm_available():
        assert kernel == "fbgemm"  # _weight_int8pack_mm is scalar (10x slower than fp32) on AVX2


def test_state_dict_round_trip_rebuilds_the_packed_weight():
    cfg = ModelConfig(vocab_size=40, block_size=16, n_layer=1, n_head=2, n_embd=32)
    torch.manual_seed(0)
    a = quantize_int8(GPT(cfg).eval())
    torch.manual_seed(1)
    b = quantize_int8(GPT(cfg).eval())
    idx = torch.randint(40, (2, 10))
    with torch.no_grad():
        before = b(idx)
        b.load_state_dict(a.state_dict())
        after = b(idx)
        expected = a(idx)
    assert a.state_dict()["blocks.0.mlp.fc.weight"].dtype == torch.int8
    assert not torch.allclose(before, expected)
    torch.testing.assert_close(after, expected)


def test_bfloat16_model_keeps_float32_scales():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=40, block_size=16, n_layer=1, n_head=2, n_embd=32)).eval()
    idx = torch.randint(40, (1, 8))
    with torch.no_grad():
        ref = model(idx)
        quantize_int8(model).to(torch.bfloat16)
        out = model(idx)
    assert model.lm_head.scales.dtype == torch.float32 and out.dtype == torch.bfloat16
    assert rel_err(out.float(), ref) < 5e-2


# --------------------------------------------------------------------------------------------------
TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, "
    "it was the season of Darkness, it was the spring of hope, it was the winter of despair. "
)


@pytest.fixture(scope="module")
def trained():
    """A tiny character model trained for a few seconds, and held-out-ish data to score it on."""
    chars = sorted(set(TEXT))
    data = np.array([chars.index(c) for c in TEXT * 12], dtype=np.uint16)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=len(chars), block_size=32, n_layer=2, n_head=4, n_embd=64))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(120):
        starts = torch.randint(len(data) - 33, (16,), generator=gen)
        rows = torch.from_numpy(np.stack([data[s:s + 33] for s in starts.tolist()]).astype(np.int64))
        loss = F.cross_entropy(model(rows[:, :-1]).flatten(0, 1), rows[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), data


def test_trained_model_keeps_its_perplexity_and_greedy_text(trained):
    model, data = trained
    args = dict(block_size=32, batch_size=16, num_batches=4, bytes_per_token=1.0, device="cpu", seed=5)
    fp32 = evaluate_lm(model, data, **args)
    prompts = [list(data[i:i + 8]) for i in (0, 41, 97, 150)]
    cfg = GenerateConfig(max_new_tokens=24, temperature=0)
    fp32_text = [generate_tokens(model, p, cfg)[0] for p in prompts]
    quantize_int8(model)
    int8 = evaluate_lm(model, data, **args)
    int8_text = [generate_tokens(model, p, cfg)[0] for p in prompts]

    assert fp32["perplexity"] < 4.0  # it learned something, so the comparison means something
    assert abs(int8["perplexity"] / fp32["perplexity"] - 1) < 0.01
    agree = sum(a == b for x, y in zip(fp32_text, int8_text) for a, b in zip(x, y))
    assert all(len(t) == 24 for t in int8_text)
    assert agree >= 0.9 * 24 * len(prompts)
