"""gptforge.backends.prepare_for_inference and gptforge.backends.cpu.PackedLinear: prepacked CPU linears, prepare_for_inference, ragged (row_starts) decoding, and the
CLI / serve flags that turn them on."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from gptforge.config import GenerateConfig, ModelConfig, ServeConfig
from gptforge.errors import ConfigError
from gptforge.generate import generate_ids
from gptforge.backends import decode_session, linears_batch_invariant, prepare_for_inference
from gptforge.backends.cpu import (PackedLinear, onednn_available, pack_panels, panel_available, prepack_available,
                                   prepack_linears, swap_decode_layers, unpack_panels)
from gptforge.backends.quant import Int8Linear, fbgemm_available
from gptforge.model import GPT
from tests.cli_utils import run
from tests.model_utils import save_tiny_checkpoint

# The packed kernels: each test of a layer's behaviour runs on every one this machine has. What the machine
# has is asked when a test runs (fixtures), never at import: collecting the tests builds no native kernels.
KERNELS = ["panel", "onednn"]


@pytest.fixture(autouse=True)
def _skip_missing_kernel(request):
    """Skip every test where nothing prepacks, and one parametrized with a packed ``kernel`` this machine lacks."""
    if not prepack_available():
        pytest.skip("no prepacked kernel here (native panel or oneDNN)")
    callspec = getattr(request.node, "callspec", None)
    kernel = callspec.params.get("kernel") if callspec is not None else None
    if kernel in KERNELS and not {"panel": panel_available, "onednn": onednn_available}[kernel]():
        pytest.skip(f"no {kernel} kernel here")


@pytest.fixture()
def needs_panel():
    if not panel_available():
        pytest.skip("needs the native panel kernel (x86 with AVX2)")


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=97)).eval()


def make_linear(k: int, n: int, bias: bool, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    if bias:
        nn.init.normal_(lin.bias)  # a non-trivial bias
    return lin


# ------------------------------------------------------------------------------------------------ 1
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 48), (3, 48), (16, 48), (2, 5, 48), (0, 48)])
@torch.no_grad()
def test_packed_linear_matches_nn_linear(kernel, bias, shape):
    lin = make_linear(48, 40, bias)
    packed = PackedLinear(lin, kernel=kernel)
    assert packed.kernel == kernel
    x = torch.randn(*shape)
    out = packed(x)
    assert out.shape == (*shape[:-1], 40)
    torch.testing.assert_close(out, lin(x), atol=1e-5, rtol=1e-5)
    assert torch.equal(packed.weight, lin.weight)
    assert packed.weight.shape == (40, 48) and packed.weight.dtype == torch.float32
    assert (packed.bias is None) == (not bias)
    if bias:
        assert torch.equal(packed.bias, lin.bias)
    assert list(packed.parameters()) == []
    assert f"in_features=48, out_features=40, bias={bias}, kernel={kernel}" in repr(packed)


def test_the_default_kernel_is_panel_where_it_has_vector_code():
    assert PackedLinear(nn.Linear(8, 8)).kernel == ("panel" if panel_available() else "onednn")


def test_unknown_or_unavailable_kernel_is_one_clear_error():
    with pytest.raises(ConfigError, match="kernel must be one of auto, panel, onednn, got 'mkl'"):
        PackedLinear(nn.Linear(8, 8), kernel="mkl")
    if not panel_available():
        with pytest.raises(ConfigError, match="panel kernel needs"):
            PackedLinear(nn.Linear(8, 8), kernel="panel")


@pytest.mark.parametrize("n", [1, 63, 64, 65, 200])
def test_panel_layout_round_trips(n):
    w = torch.randn(n, 5)
    panels = pack_panels(w)
    assert panels.shape == (-(-n // 64), 5, 64)
    assert panels[:, 0, :].flatten()[:n].tolist() == w[:, 0].tolist()  # panel p, input k, output j
    assert torch.count_nonzero(panels.transpose(1, 2).reshape(-1, 5)[n:]) == 0  # padding is zero
    assert torch.equal(unpack_panels(panels, n), w)


def test_packed_linear_refuses_non_float32_weights():
    with pytest.raises(ConfigError, match="float32 CPU weight"):
        PackedLinear(nn.Linear(8, 8).to(torch.bfloat16))


@pytest.mark.parametrize("kernel", KERNELS)
def test_packed_linear_does_not_share_the_weight_storage(kernel):
    lin = make_linear(16, 8, True)
    packed = PackedLinear(lin, kernel=kernel)
    before = packed.weight.clone()
    with torch.no_grad():
        lin.weight.add_(1.0)
        lin.bias.add_(1.0)
        packed.weight.add_(1.0)  # a rebuilt copy: changing it changes nothing
    assert torch.equal(packed.weight, before)
    assert not torch.equal(packed.bias, lin.bias)


# ------------------------------------------------------------------------------------------------ 2
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("bias", [True, False])
@torch.no_grad()
def test_packed_linear_is_batch_invariant(kernel, bias):
    packed = PackedLinear(make_linear(128, 96, bias), kernel=kernel)
    torch.manual_seed(1)
    x = torch.randn(16, 128)
    alone = [packed(x[i:i + 1]) for i in range(16)]
    for n in (2, 5, 16):
        batch = packed(x[:n])
        for i in range(n):
            assert torch.equal(batch[i:i + 1], alone[i]), (n, i)
    # 3-D input: every (b, t) row is one row of the product
    batch3 = packed(x[:16].view(4, 4, 128))
    assert torch.equal(batch3.reshape(16, 96), torch.cat(alone))


def test_linears_batch_invariant():
    model = tiny_gpt()
    assert linears_batch_invariant(model) is False
    assert linears_batch_invariant(nn.Sequential(nn.LayerNorm(4))) is False  # no linear at all
    n = prepack_linears(model)
    assert n == 2 * 4 + 1  # qkv, attn.proj, fc, mlp.proj per block, and the LM head
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert linears_batch_invariant(model) is True
    # one plain Linear left is enough to lose the property
    model.blocks[1].mlp.fc = nn.Linear(32, 128)
    assert linears_batch_invariant(model) is False


@pytest.mark.skipif(not fbgemm_available(), reason="needs fbgemm (x86 CPU)")
def test_linears_batch_invariant_after_int8():
    model = prepare_for_inference(tiny_gpt(), quantize="int8")
    assert any(isinstance(m, Int8Linear) for m in model.modules())
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert linears_batch_invariant(model) is True


def test_prepack_leaves_other_dtypes_alone():
    model = tiny_gpt().to(torch.bfloat16)
    assert prepack_linears(model) == 0
    assert not any(isinstance(m, PackedLinear) for m in model.modules())


# ------------------------------------------------------------------------------------------------ 3
@torch.no_grad()
def test_state_dict_of_a_prepacked_model_is_the_plain_one():
    plain = tiny_gpt()
    before = plain.state_dict()
    ref_logits = plain(torch.tensor([[1, 2, 3, 4, 5]]))
    model = copy.deepcopy(plain)
    prepack_linears(model)
    swap_decode_layers(model)  # the swapped attention and block stack hold no tensors of their own
    assert type(model.blocks).__name__ == "FusedDecodeBlocks"
    assert type(model.blocks[0].attn.attend).__name__ == "NativeAttention"
    after = model.state_dict()
    assert list(after.keys()) == list(before.keys())
    assert "lm_head.weight" in after  # the tied head is saved under both names, as a plain GPT does
    for key in before:
        assert torch.equal(after[key], before[key]), key
    # it loads into a fresh, plain GPT (strict) and gives the same logits
    fresh = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=97)).eval()
    fresh.load_state_dict(after)
    assert torch.equal(fresh(torch.tensor([[1, 2, 3, 4, 5]])), ref_logits)


@torch.no_grad()
def test_load_state_dict_into_a_prepacked_model_repacks():
    idx = torch.tensor([[3, 1, 4, 1, 5, 9]])
    other = tiny_gpt(seed=7)
    want = other(idx)
    model = tiny_gpt(seed=0)
    prepack_linears(model)
    assert not torch.allclose(model(idx), want, atol=1e-3)
    result = model.load_state_dict(other.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    torch.testing.assert_close(model(idx), want, atol=1e-5, rtol=1e-5)
    assert torch.equal(model.blocks[0].attn.qkv.weight, other.blocks[0].attn.qkv.weight)
    assert torch.equal(model.lm_head.weight, other.wte.weight)
    assert isinstance(model.blocks[0].attn.qkv, PackedLinear)


def test_load_state_dict_reports_a_shape_mismatch_and_missing_weight():
    model = tiny_gpt()
    prepack_linears(model)
    state = model.state_dict()
    state["blocks.0.mlp.fc.weight"] = torch.zeros(7, 32)
    with pytest.raises(RuntimeError, match=r"size mismatch for blocks\.0\.mlp\.fc\.weight"):
        model.load_state_dict(state)
    state = model.state_dict()
    del state["blocks.1.attn.proj.weight"]
    with pytest.raises(RuntimeError, match=r"blocks\.1\.attn\.proj\.weight"):
        model.load_state_dict(state)
    result = model.load_state_dict(state, strict=False)
    assert result.missing_keys == ["blocks.1.attn.proj.weight"]


# ------------------------------------------------------------------------------------------------ 4
@torch.no_grad()
def test_prepare_for_inference_keeps_logits_and_greedy_tokens():
    plain = tiny_gpt()
    plain.train()
    model = copy.deepcopy(plain)
    out = prepare_for_inference(model)
    assert out is model
    assert not model.training and all(not m.training for m in model.modules())
    assert any(isinstance(m, PackedLinear) for m in model.modules())
    plain.eval()
    idx = torch.tensor([[5, 17, 2, 96, 40, 0, 33], [1, 2, 3, 4, 5, 6, 7]])
    torch.testing.assert_close(model(idx), plain(idx), atol=1e-5, rtol=0)
    prompts = [[5, 17, 2], [9, 8, 7, 6, 5], [60]]
    config = GenerateConfig(max_new_tokens=12, temperature=0.0)
    got = [c[0].token_ids for c in generate_ids(model, prompts, config)]
    want = [c[0].token_ids for c in generate_ids(plain, prompts, config)]
    assert got == want and all(len(t) == 12 for t in got)


def test_prepare_for_inference_without_prepack():
    model = prepare_for_inference(tiny_gpt().train(), prepack=False)
    assert not model.training
    assert not any(isinstance(m, PackedLinear) for m in model.modules())
    assert linears_batch_invariant(model) is False


@pytest.mark.parametrize("bad", ["bogus", "int4", "INT8"])
def test_prepare_for_inference_rejects_unknown_quantize(bad):
    with pytest.raises(ConfigError, match=rf"quantize must be int8 or None, got '{bad}'"):
        prepare_for_inference(tiny_gpt(), quantize=bad)


@torch.no_grad()
def test_bf16_input_falls_back_with_one_warning(caplog):
    lin = make_linear(32, 24, True)
    packed = PackedLinear(lin)
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    with caplog.at_level(logging.WARNING, logger="gptforge.backends.cpu.linear"):
        y = packed(x)
        y2 = packed(x)
    assert y.dtype == torch.bfloat16 and torch.equal(y, y2)
    want = F.linear(x, lin.weight.to(torch.bfloat16), lin.bias.to(torch.bfloat16))
    torch.testing.assert_close(y, want)
    warnings = [r for r in caplog.records if r.name == "gptforge.backends.cpu.linear" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "bfloat16" in warnings[0].getMessage()
    # float32 afterwards goes back to the packed kernel and still matches
    xf = torch.randn(3, 32)
    torch.testing.assert_close(packed(xf), lin(xf), atol=1e-5, rtol=1e-5)


def test_input_that_needs_grad_falls_back_and_gets_gradients():
    lin = make_linear(16, 8, True)
    packed = PackedLinear(lin)
    x = torch.randn(2, 16, requires_grad=True)
    packed(x).sum().backward()
    torch.testing.assert_close(x.grad, lin.weight.detach().sum(0).expand(2, 16))


# ------------------------------------------------------------------------------------------------ 5
def _ragged_setup(model, prompts, max_length=64):
    """Each prompt prefilled alone, its keys/values copied into one shared cache so that every row ends at
    the same column L (start_i = L - len_i, as the scheduler's _place does)."""
    lengths = [len(p) for p in prompts]
    L = max(lengths)
    big = model.new_kv_cache(len(prompts), max_length)
    for i, p in enumerate(prompts):
        own = model.new_kv_cache(1, max_length)
        model(torch.tensor([p]), kv_cache=own)
        big.k[:, i, :, L - len(p):L] = own.k[:, 0, :, :len(p)]
        big.v[:, i, :, L - len(p):L] = own.v[:, 0, :, :len(p)]
    big.length = L
    big.row_starts = [L - n for n in lengths]
    return big, L


@pytest.mark.parametrize("prepack", [True, False])
@torch.no_grad()
def test_ragged_decode_step_equals_each_row_alone(prepack):
    model = tiny_gpt()
    if prepack:
        prepack_linears(model)
    prompts = [[5, 6, 7, 8, 9], [1, 2, 3, 4, 5, 6, 7, 8, 9], [40, 41, 42]]
    next_tokens = [11, 22, 33]
    big, L = _ragged_setup(model, prompts)
    tokens = torch.tensor([[t] for t in next_tokens])
    positions = torch.tensor([[len(p)] for p in prompts])
    batched = model(tokens, kv_cache=big, position_ids=positions)  # (3, 1, V)
    assert batched.shape == (3, 1, 97) and big.length == L + 1
    for i, p in enumerate(prompts):
        own = model.new_kv_cache(1, 64)
        model(torch.tensor([p]), kv_cache=own)
        alone = model(tokens[i:i + 1], kv_cache=own, position_ids=positions[i:i + 1])
        if prepack:  # batch-invariant linears: the very same bits
            assert torch.equal(batched[i:i + 1], alone), i
        else:
            torch.testing.assert_close(batched[i:i + 1], alone, atol=1e-5, rtol=1e-5)
        # the step wrote the row's new keys/values at column L of the shared cache
        torch.testing.assert_close(big.k[:, i, :, L], own.k[:, 0, :, len(p)], atol=1e-6, rtol=0)
        torch.testing.assert_close(big.v[:, i, :, L], own.v[:, 0, :, len(p)], atol=1e-6, rtol=0)
        # and the full-sequence forward agrees too
        full = model(torch.tensor([p + [next_tokens[i]]]))[:, -1:]
        torch.testing.assert_close(batched[i:i + 1], full, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_ragged_decode_differs_from_attending_to_every_column():
    """Control: without row_starts the short rows see the zero columns before their start, so the logits
    change; the test above could not pass by accident."""
    model = tiny_gpt()
    prepack_linears(model)
    prompts = [[5, 6, 7, 8, 9], [1, 2, 3, 4, 5, 6, 7, 8, 9], [40, 41, 42]]
    tokens = torch.tensor([[11], [22], [33]])
    positions = torch.tensor([[5], [9], [3]])
    ragged, _ = _ragged_setup(model, prompts)
    a = model(tokens, kv_cache=ragged, position_ids=positions)
    flat, _ = _ragged_setup(model, prompts)
    flat.row_starts = None
    b = model(tokens, kv_cache=flat, position_ids=positions)
    assert torch.equal(a[1], b[1])  # the longest row starts at column 0 either way
    assert not torch.allclose(a[0], b[0], atol=1e-4)
    assert not torch.allclose(a[2], b[2], atol=1e-4)


@torch.no_grad()
def test_ragged_cache_misuse_raises():
    model = tiny_gpt()
    prepack_linears(model)
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5]]
    big, L = _ragged_setup(model, prompts)
    positions = torch.tensor([[3], [5]])
    with pytest.raises(ValueError, match="row_starts"):  # two new tokens a row
        model(torch.tensor([[1, 2], [3, 4]]), kv_cache=big, position_ids=torch.tensor([[3, 4], [5, 6]]))
    with pytest.raises(ValueError, match="row_starts"):  # an attention mask
        model(torch.tensor([[1], [2]]), kv_cache=big, position_ids=positions,
              attention_mask=torch.ones(2, L + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="row_starts"):  # no position_ids
        model(torch.tensor([[1], [2]]), kv_cache=big)
    big.row_starts = [0, 0, 0]
    with pytest.raises(ValueError, match="row_starts"):  # three starts for two rows
        model(torch.tensor([[1], [2]]), kv_cache=big, position_ids=positions)
    assert big.length == L  # nothing advanced
    big.row_starts = [2, 0]
    model.blocks[0].attn.prefix = lambda b: None  # a prefix-tuned model (the check runs before any call)
    with pytest.raises(ValueError, match="prefix-tuned"):
        model(torch.tensor([[1], [2]]), kv_cache=big, position_ids=positions)


# ------------------------------------------------------------------------------------------------ 6
@pytest.fixture()
def tiny_checkpoint(tmp_path) -> Path:
    return save_tiny_checkpoint(tmp_path / "ckpt", "abcdefghijklmnopqrstuvwxyz .\n", block_size=32, n_layer=1, n_embd=16)


@pytest.fixture()
def prepared_models(monkeypatch):
    """Record every model the CLI prepares (through gptforge.checkpoint.load_for_inference, its one loader),
    and the kinds of its linear layers afterwards."""
    import gptforge.checkpoint as checkpoint

    real = checkpoint.prepare_for_inference
    seen = []

    def spy(model, *, quantize=None, prepack=True, kv_cache_dtype=None):
        out = real(model, quantize=quantize, prepack=prepack, kv_cache_dtype=kv_cache_dtype)
        seen.append({"quantize": quantize, "prepack": prepack, "kv_cache_dtype": kv_cache_dtype,
                     "kinds": {type(m).__name__ for m in model.modules()
                               if isinstance(m, (nn.Linear, PackedLinear, Int8Linear))}})
        return out

    monkeypatch.setattr(checkpoint, "prepare_for_inference", spy)
    return seen


def test_generate_cli_prepacks_by_default_and_honours_the_flags(capsys, tiny_checkpoint, prepared_models):
    base = ["generate", "--checkpoint", str(tiny_checkpoint), "--prompt", "ab", "--max-new-tokens", "8",
            "--temperature", "0", "--device", "cpu"]
    code, packed_out, _ = run(capsys, *base)
    assert code == 0 and packed_out.startswith("ab") and len(packed_out) > 3
    assert prepared_models[-1] == {"quantize": None, "prepack": True, "kv_cache_dtype": "auto",
                                   "kinds": {"PackedLinear"}}

    code, plain_out, _ = run(capsys, *base, "--no-prepack")
    assert code == 0
    assert prepared_models[-1] == {"quantize": None, "prepack": False, "kv_cache_dtype": "auto",
                                   "kinds": {"Linear"}}
    assert plain_out == packed_out  # greedy: prepacking does not change the text

    code, int8_out, _ = run(capsys, *base, "--quantize", "int8")
    assert code == 0 and int8_out.startswith("ab") and len(int8_out) > 3
    assert prepared_models[-1]["quantize"] == "int8"
    assert prepared_models[-1]["kinds"] == {"Int8Linear"}

    code, bf16_out, _ = run(capsys, *base, "--kv-cache-dtype", "bfloat16")
    assert code == 0 and bf16_out.startswith("ab") and prepared_models[-1]["kv_cache_dtype"] == "bfloat16"

    code, _, err = run(capsys, *base, "--quantize", "int4")
    assert code != 0 and "--quantize" in err


def test_chat_help_lists_the_inference_flags(capsys):
    code, out, _ = run(capsys, "chat", "--help")
    assert code == 0
    assert "--quantize" in out and "--no-prepack" in out and "--kv-cache-dtype" in out
    from gptforge.cli import build_parser

    args, _ = build_parser().parse_known_args(["chat", "--checkpoint", "x"])
    assert args.quantize is None and args.prepack is True
    args, _ = build_parser().parse_known_args(["serve", "--checkpoint", "x", "--quantize", "int8", "--no-prepack"])
    assert args.quantize == "int8" and args.prepack is False


def test_serve_config_validates_quantize():
    with pytest.raises(ConfigError, match="quantize"):
        ServeConfig(checkpoint="x", quantize="int4").validate()
    ServeConfig(checkpoint="x", quantize="int8").validate()
    ServeConfig(checkpoint="x", quantize=None, prepack=False).validate()


def test_load_served_checkpoint_prepares_the_model(tiny_checkpoint):
    from gptforge.serve.app import load_served_checkpoint
    from gptforge.serve.scheduler import Scheduler

    ckpt = load_served_checkpoint(ServeConfig(checkpoint=str(tiny_checkpoint), device="cpu"))
    assert not ckpt.model.training
    assert linears_batch_invariant(ckpt.model)
    assert Scheduler(ckpt.model, ckpt.tokenizer)._ragged is True
    ckpt = load_served_checkpoint(ServeConfig(checkpoint=str(tiny_checkpoint), device="cpu", prepack=False))
    assert not any(isinstance(m, PackedLinear) for m in ckpt.model.modules())
    assert Scheduler(ckpt.model, ckpt.tokenizer)._ragged is False


@pytest.mark.skipif(not onednn_available(), reason="needs oneDNN")
def test_onednn_batch_size_1_layout_is_correct_but_not_counted_as_batch_invariant():
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=97)).eval()
    reference = copy.deepcopy(model)
    idx = torch.randint(0, 97, (3, 9))
    assert prepack_linears(model, batch_size=1, kernel="onednn") == 9
    assert all(m.batch_size == 1 for m in model.modules() if isinstance(m, PackedLinear))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), reference(idx), atol=1e-5, rtol=1e-5)
    assert not linears_batch_invariant(model)  # one row takes another kernel than several
    # A reload keeps the layout it was made with.
    model.load_state_dict(reference.state_dict())
    assert all(m.batch_size == 1 for m in model.modules() if isinstance(m, PackedLinear))


@pytest.mark.usefixtures("needs_panel")
def test_panel_kernel_ignores_the_batch_size_hint_and_stays_invariant():
    model = tiny_gpt()
    assert prepack_linears(model, batch_size=1, kernel="panel") == 9
    assert linears_batch_invariant(model)


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_lora_is_merged_before_quantizing_and_prepacking(quantize):
    from gptforge.peft import LoRALinear, apply_lora

    if quantize == "int8" and not fbgemm_available():
        pytest.skip("fbgemm is not available")
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=97))
    apply_lora(model, rank=4)
    for m in model.modules():  # a trained-looking update, so that merging matters
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_b.weight, std=0.5)
    model.eval()
    assert not linears_batch_invariant(model)  # LoRA's main product is a plain F.linear
    idx = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        expected = model(idx)
    prepare_for_inference(model, quantize=quantize)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    kinds = {type(m) for m in model.modules() if isinstance(m, (nn.Linear, PackedLinear, Int8Linear))}
    assert kinds == ({Int8Linear} if quantize else {PackedLinear})  # no quantized low-rank factors
    assert all(m.in_features > 4 and m.out_features > 4 for m in model.modules() if type(m) in kinds)
    with torch.no_grad():
        got = model(idx)
    torch.testing.assert_close(got, expected, atol=0.05 if quantize else 1e-5, rtol=0.05 if quantize else 1e-5)
    assert linears_batch_invariant(model)


@pytest.mark.parametrize("kernel", ["fbgemm", "panel"])
def test_int8_cpu_linear_is_batch_invariant(kernel):
    if kernel == "fbgemm" and not fbgemm_available():
        pytest.skip("fbgemm is not available")
    if kernel == "panel" and not panel_available():
        pytest.skip("the native panel kernel is not available")
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(nn.Linear(96, 200), kernel=kernel)
    assert layer.resolved_kernel(torch.device("cpu")) == kernel
    x = torch.randn(16, 96) * 3
    with torch.no_grad():
        alone = torch.cat([layer(x[i:i + 1]) for i in range(16)])
        for m in (2, 5, 16):
            assert torch.equal(layer(x[:m]), alone[:m])


def test_a_prepared_model_can_be_deep_copied():
    torch.manual_seed(0)
    model = prepare_for_inference(GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=50)))
    clone = copy.deepcopy(model)
    idx = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(clone(idx), model(idx))
        layer = clone.blocks[0].mlp.fc
        layer.load_state_dict({"weight": torch.zeros_like(layer.weight), "bias": layer.bias})
        assert not torch.equal(clone(idx), model(idx))  # the copy has its own packed weight


def test_bfloat16_kv_cache_halves_the_cache_and_stays_close_to_float32():
    from gptforge.errors import ConfigError

    torch.manual_seed(0)
    model = tiny_gpt()
    prompt = torch.randint(0, model.config.vocab_size, (2, 7))
    steps = torch.randint(0, model.config.vocab_size, (5, 2, 1))

    def decode(kv_cache_dtype):
        prepare_for_inference(model, kv_cache_dtype=kv_cache_dtype)
        cache = model.new_kv_cache(2, 16)
        with torch.inference_mode():
            out = [model(prompt, kv_cache=cache)[:, -1]]
            out += [model(tok, kv_cache=cache)[:, -1] for tok in steps]
        return torch.stack(out), cache

    full, full_cache = decode("auto")
    half, half_cache = decode("bfloat16")
    assert full_cache.k.dtype == torch.float32 and half_cache.k.dtype == torch.bfloat16
    assert half_cache.k.element_size() * 2 == full_cache.k.element_size()
    # the cached values are the float32 ones rounded to bfloat16; logits move by that rounding only
    torch.testing.assert_close(half_cache.k[:, :, :, :12].float(), full_cache.k[:, :, :, :12].bfloat16().float(),
                               rtol=0.02, atol=1e-2)
    assert not torch.equal(half, full)
    torch.testing.assert_close(half, full, rtol=0.05, atol=0.05)
    assert model.new_kv_cache(1, 4, dtype=torch.float32).k.dtype == torch.float32  # an explicit dtype wins
    with pytest.raises(ConfigError, match="kv_cache_dtype must be one of auto, bfloat16, got 'float16'"):
        prepare_for_inference(model, kv_cache_dtype="float16")


# ------------------------------------------------------------------------------------------------ 6
@pytest.mark.usefixtures("needs_panel")  # the one-call decode step
@torch.no_grad()
def test_decode_session_gathers_the_plan_once(monkeypatch):
    from gptforge.generate import engine

    model = prepare_for_inference(tiny_gpt())
    x = torch.zeros(1, 1, 32)
    first = model.blocks.decode_plan(x)
    assert first is not None and model.blocks.decode_plan(x)[1] is not first[1]  # gathered anew each call
    with decode_session(model):
        inside = model.blocks.decode_plan(x)
        assert model.blocks.decode_plan(x)[1] is inside[1]
        assert model.blocks.decode_plan(x.double()) is None  # the per-step checks still run
    assert model.blocks.decode_plan(x)[1] is not inside[1]
    with decode_session(model):  # nested blocks (or other threads) share the plan until the last ends
        outer = model.blocks.decode_plan(x)
        with decode_session(model):
            assert model.blocks.decode_plan(x)[1] is outer[1]
        assert model.blocks.decode_plan(x)[1] is outer[1]
        copy.deepcopy(model)  # the plan is not the module's attribute: copying still works mid-generation
    assert model.blocks.decode_plan(x)[1] is not outer[1]
    builds = []
    original = type(model.blocks)._build_plan
    monkeypatch.setattr(type(model.blocks), "_build_plan", lambda self: builds.append(1) or original(self))
    config = GenerateConfig(max_new_tokens=10, temperature=0.0)
    generate_ids(model, [[1, 2, 3], [4, 5, 6]], config)  # equal lengths: no mask, the one-call step
    assert len(builds) == 1
    # The engine's steps run in inference mode, the consumer's code between them does not.
    states = [engine.SequenceState([1, 2, 3], config, model)]
    for _ in engine._decode(model, states, config):
        assert not torch.is_inference_mode_enabled()
    assert len(states[0].token_ids) == 10
