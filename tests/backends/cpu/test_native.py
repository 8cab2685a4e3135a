"""gptforge.backends.cpu (ops, build, layers): the C++ decode-step kernels give the Python path's bits, and their absence is survivable."""

import copy
import logging
import math
import shutil

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from gptforge.backends import prepare_for_inference
from gptforge.backends.cpu import (FusedDecodeBlocks, NativeGELU, PackedLinear, build, layouts, ops, onednn_available,
                                   pack_panels, panel_available)
from gptforge.backends.cpu.layouts import pack_amx, quantize_weight
from gptforge.backends.quant import Int8Linear, _fbgemm_linear, amx_available, fbgemm_available, quantize_int8

from gptforge.config import ModelConfig
from gptforge.model import GPT

HAVE_COMPILER = shutil.which("c++") is not None or shutil.which("g++") is not None
needs_native = pytest.mark.skipif(not HAVE_COMPILER or not build.enabled(),
                                  reason="no C++ compiler here, or GPTFORGE_NATIVE=0")
needs_fbgemm = pytest.mark.skipif(not fbgemm_available(), reason="needs fbgemm (x86 CPU)")
# torch's AVX2/AVX-512 kernels use fused multiply-adds where the native epilogue does (std::fma);
# on a CPU without them the two paths may differ in the last bit.
FMA = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def hard_input(*shape, k):
    torch.manual_seed(3)
    x = torch.randn(*shape, k)
    x[..., min(5, k - 1)] *= 40.0  # an outlier channel
    x[0] *= 1e-3  # and a row a thousand times smaller than the others
    return x


def skip_unless_int8_kernel(kernel: str) -> None:
    """Skip the test where this CPU int8 kernel ("amx", "panel" or "fbgemm") cannot run."""
    if not {"amx": amx_available, "panel": panel_available, "fbgemm": fbgemm_available}[kernel]():
        pytest.skip(f"no {kernel} kernel here")


@pytest.fixture()
def fresh_state(monkeypatch):
    """Forget whether the kernels were loaded, so that load() tries again (restored afterwards)."""
    monkeypatch.setattr(build, "_state", {})


@needs_native
def test_the_kernels_build_here_and_the_layers_use_them():
    module = build.load()
    assert module is not None
    # the weight layouts the backend packs are the ones the kernels read
    assert (module.PANEL, module.AMX_STRIP, module.AMX_DEPTH) == (layouts.PANEL, layouts.AMX_STRIP, layouts.AMX_DEPTH)
    assert all(callable(getattr(module, name)) for name in ops.OPS)  # every op of the table is compiled
    layer = PackedLinear(nn.Linear(16, 8))
    assert layer._native is not None
    if ops.panel_isa() >= 1:
        assert layer.kernel == "panel"
    for kernel in ("amx", "panel", "fbgemm"):
        if {"amx": amx_available, "panel": panel_available, "fbgemm": fbgemm_available}[kernel]():
            q = Int8Linear.from_linear(nn.Linear(16, 8), kernel=kernel)
            q.prepare()
            assert q._native is not None and q.resolved_kernel(q.weight.device) == kernel


@needs_native
@needs_fbgemm
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 96), (3, 96), (17, 96), (2, 5, 96)])
def test_native_int8_gives_the_python_paths_result(bias, shape):
    torch.manual_seed(0)
    q = Int8Linear.from_linear(nn.Linear(96, 300, bias=bias), kernel="fbgemm")
    q.prepare()
    x = hard_input(*shape[:-1], k=shape[-1])
    y = q(x)
    x2 = x.reshape(-1, 96)
    expected = _fbgemm_linear(x2, q._packed, q._pin, q.bias).reshape(*shape[:-1], 300)
    if FMA:
        assert torch.equal(y, expected)
    else:
        torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)
    # Each row alone gives the bits it gets in the batch (what the server's batching relies on).
    rows = x2.shape[0]
    for i in (0, rows - 1):
        assert torch.equal(q(x2[i:i + 1])[0], y.reshape(rows, 300)[i])


@needs_native
@needs_fbgemm
def test_native_int8_propagates_nan_like_the_python_path():
    q = Int8Linear.from_linear(nn.Linear(32, 12), kernel="fbgemm")
    q.prepare()
    x = torch.randn(3, 32)
    x[1, 7] = float("nan")
    y = q(x)
    assert torch.isnan(y[1]).all()
    assert torch.isfinite(y[0]).all() and torch.isfinite(y[2]).all()
    assert torch.equal(torch.isnan(y), torch.isnan(_fbgemm_linear(x, q._packed, q._pin, q.bias)))


@needs_native
def test_prepared_float32_model_pickles_and_deep_copies_on_its_kernel(tmp_path):
    torch.manual_seed(0)
    model = prepare_for_inference(GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16,
                                                  vocab_size=20)).eval())
    kernel = model.lm_head.kernel
    ids = torch.randint(0, 20, (2, 5))
    with torch.inference_mode():
        expected = model(ids)
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    for twin in (loaded, copy.deepcopy(model)):
        assert twin.lm_head.kernel == kernel and twin.lm_head._native is not None
        with torch.inference_mode():
            assert torch.equal(twin(ids), expected)


@needs_native
@pytest.mark.skipif(not onednn_available(), reason="needs oneDNN")
@pytest.mark.parametrize("bias", [True, False])
def test_native_packed_linear_is_the_same_onednn_call(bias):
    torch.manual_seed(1)
    layer = PackedLinear(nn.Linear(64, 40, bias=bias), kernel="onednn")
    assert layer._native is not None
    for shape in [(1, 64), (7, 64), (2, 3, 64)]:
        x = torch.randn(*shape)
        expected = torch.ops.mkldnn._linear_pointwise(x, layer._packed, layer.bias, "none", [], "")
        assert torch.equal(layer(x), expected)


# What needs the kernels built is asked by fixtures, when a test runs: collecting the tests builds nothing.
needs_panel = pytest.mark.usefixtures("_panel_kernel")


@pytest.fixture()
def _panel_kernel():
    if not HAVE_COMPILER or not build.enabled() or ops.panel_isa() < 1:
        pytest.skip("the panel kernel's vector code needs the native build on x86 with AVX2")


@needs_panel
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("k, n", [(300, 130), (5, 7), (1, 64), (96, 1)])
def test_panel_kernel_is_invariant_by_construction_and_accurate(k, n, bias):
    # The design's promise: an output's bits do not depend on the instruction set (AVX-512, AVX2, the
    # scalar reference), on the other rows in the call, or on the thread count; and it is a float32
    # rounding of the exact product.
    module = build.load()
    torch.manual_seed(2)
    w = torch.randn(n, k) * 0.05
    b = torch.randn(n) if bias else None
    x = hard_input(13, k=k)  # two full 6-row tiles and one row
    panels = pack_panels(w)
    by_isa = [module.panel_linear(x, panels, n, b, isa) for isa in range(ops.panel_isa() + 1)]
    for level, y in enumerate(by_isa):
        assert torch.equal(y, by_isa[0]), f"isa level {level} differs from the scalar reference"
    y = by_isa[-1]
    for i in range(13):
        assert torch.equal(module.panel_linear(x[i:i + 1], panels, n, b)[0], y[i])
        assert torch.equal(module.panel_linear(x[i:i + 1], panels, n, b, prefetch=0)[0], y[i])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(module.panel_linear(x, panels, n, b), y)
    finally:
        torch.set_num_threads(threads)
    exact = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    scale = x.double().abs() @ w.double().abs().T + (0 if b is None else b.double().abs())
    assert ((y.double() - exact).abs() <= 2 * k * 2.0 ** -24 * scale + 1e-30).all()  # the textbook bound


def packed_int8_layer(n: int, k: int, pack, width: int):
    """A seeded random (n, k) layer quantized to int8: weight, scales, packed weight, scales padded to whole
    groups of ``width`` outputs, bias."""
    torch.manual_seed(4)
    q, scales = quantize_weight(torch.randn(n, k))
    packed = pack(q)
    padded = torch.zeros(packed.shape[0] * width)
    padded[:n] = scales
    return q, scales, packed, padded, torch.randn(n)


@needs_panel
@pytest.mark.parametrize("k, n", [(300, 130), (5, 7), (96, 1)])
def test_int8_panel_kernel_is_invariant_and_computes_the_dequantized_product(k, n):
    module = build.load()
    q, scales, panels, padded, b = packed_int8_layer(n, k, pack_panels, 64)
    x = hard_input(13, k=k)
    by_isa = [module.panel_int8_linear(x, panels, padded, n, b, isa) for isa in range(ops.panel_isa() + 1)]
    for level, y in enumerate(by_isa):
        assert torch.equal(y, by_isa[0]), f"isa level {level} differs from the scalar reference"
    y = by_isa[-1]
    for i in range(13):
        assert torch.equal(module.panel_int8_linear(x[i:i + 1], panels, padded, n, b)[0], y[i])
    # Activations are not rounded: the float64 product with the dequantized weight, to float32 rounding.
    exact = x.double() @ (q.double() * scales.double()[:, None]).T + b.double()
    scale = x.double().abs() @ (q.double().abs() * scales.double()[:, None]).T + b.double().abs()
    assert ((y.double() - exact).abs() <= (2 * k + 4) * 2.0 ** -24 * scale).all()
    with pytest.raises(RuntimeError, match="scales must be contiguous float32"):
        module.panel_int8_linear(x, panels, scales[:n - 1] if n > 1 else torch.zeros(3), n, b)
    with pytest.raises(RuntimeError, match="expected a contiguous Char CPU weight"):
        module.panel_int8_linear(x, panels.float(), padded, n, b)


needs_amx = pytest.mark.usefixtures("_amx_kernel")


@pytest.fixture()
def _amx_kernel():
    if not HAVE_COMPILER or not build.enabled() or not amx_available():
        pytest.skip("needs the native kernels on a CPU with AMX-INT8")


@needs_amx
@pytest.mark.parametrize("k, n", [(300, 130), (5, 7), (64, 16), (96, 1)])
def test_amx_kernel_equals_its_reference_is_invariant_and_keeps_16_bit_activations(k, n):
    module = build.load()
    q, scales, packed, padded, b = packed_int8_layer(n, k, pack_amx, 16)
    x = hard_input(37, k=k)  # 37 rows: 74 A rows, two full 32-row groups and a part-filled one
    y = module.amx_int8_linear(x, packed, padded, n, k, b)
    assert torch.equal(y, module.amx_int8_linear(x, packed, padded, n, k, b, 0)), "AMX differs from the reference"
    for i in (0, 1, 16, 36):
        assert torch.equal(module.amx_int8_linear(x[i:i + 1], packed, padded, n, k, b)[0], y[i])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(module.amx_int8_linear(x, packed, padded, n, k, b), y)
    finally:
        torch.set_num_threads(threads)
    # Each activation is off by at most step / 508 (step = the row's max / 127); then float32 roundings.
    exact = x.double() @ (q.double() * scales.double()[:, None]).T + b.double()
    wsum = (q.double().abs() * scales.double()[:, None]).sum(1)
    step = x.double().abs().amax(1, keepdim=True) / 127
    bound = step / 508 * wsum + 1e-6 * (x.double().abs() @ (q.double().abs() * scales.double()[:, None]).T
                                        + b.double().abs())
    assert ((y.double() - exact).abs() <= bound).all()
    # A row with an infinity or a NaN gives NaN, and leaves the other rows alone.
    bad = x.clone()
    bad[2, 0], bad[5, k - 1] = float("inf"), float("nan")
    out = module.amx_int8_linear(bad, packed, padded, n, k, b)
    assert out[2].isnan().all() and out[5].isnan().all()
    keep = [i for i in range(37) if i not in (2, 5)]
    assert torch.equal(out[keep], y[keep])
    assert torch.equal(out.nan_to_num(), module.amx_int8_linear(bad, packed, padded, n, k, b, 0).nan_to_num())
    with pytest.raises(RuntimeError, match="scales must be contiguous float32"):
        module.amx_int8_linear(x, packed, padded[:-1], n, k, b)
    with pytest.raises(RuntimeError, match="does not hold"):
        module.AmxInt8Linear(packed, padded, n, k + 64)
    with pytest.raises(RuntimeError, match=r"expected an input of shape \(\.\.\., "):
        module.amx_int8_linear(x[:, :-1], packed, padded, n, k, b)
    wide = 131072 + 64  # past it the int32 sums could overflow: refused, and Int8Linear picks another kernel
    with pytest.raises(RuntimeError, match="at most 131072 inputs"):
        module.AmxInt8Linear(torch.zeros(1, wide // 4, 64, dtype=torch.int8), torch.zeros(16), 1, wide)
    assert Int8Linear(wide, 1, kernel="amx").resolved_kernel(torch.device("cpu")) != "amx"


@needs_panel
def test_panel_kernel_refuses_mismatched_shapes_with_a_clear_error():
    module = build.load()
    panels = pack_panels(torch.randn(70, 16))
    with pytest.raises(RuntimeError, match=r"expected an input of shape \(\.\.\., 16\)"):
        module.panel_linear(torch.randn(2, 15), panels, 70, None)
    with pytest.raises(RuntimeError, match="does not hold 200 outputs"):
        module.PanelLinear(panels, 200)
    with pytest.raises(RuntimeError, match="bias must be float32 with 70 values"):
        module.panel_linear(torch.randn(2, 16), panels, 70, torch.zeros(69))
    with pytest.raises(RuntimeError, match="float32 CPU input"):
        module.panel_linear(torch.randn(2, 16).double(), panels, 70, None)


@needs_native
@pytest.mark.parametrize("kernel", ["amx", "panel", "fbgemm"])
def test_prepared_int8_model_deep_copies_with_working_kernels(kernel):
    skip_unless_int8_kernel(kernel)
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=97)).eval()
    model = quantize_int8(model, kernel=kernel)
    assert all(m._native is not None for m in model.modules() if isinstance(m, Int8Linear))
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.inference_mode():
        expected = model(ids)
        twin = copy.deepcopy(model)
        assert torch.equal(twin(ids), expected)


def test_disabled_by_environment(monkeypatch, fresh_state):
    monkeypatch.setenv("GPTFORGE_NATIVE", "0")
    assert not build.enabled() and build.load() is None
    assert ops.panel_isa() == 0 and not panel_available()
    layer = PackedLinear(nn.Linear(16, 8)) if onednn_available() else None
    if layer is not None:
        assert layer.kernel == "onednn" and layer._native is None
        x = torch.randn(2, 16)
        expected = torch.ops.mkldnn._linear_pointwise(x, layer._packed, layer.bias, "none", [], "")
        assert torch.equal(layer(x), expected)
    q = Int8Linear.from_linear(nn.Linear(16, 8))
    q.prepare()
    assert q._native is None and q.resolved_kernel(q.weight.device) != "panel"
    assert q(torch.randn(2, 16)).shape == (2, 8)


def test_a_failed_build_warns_once_and_keeps_the_python_path(monkeypatch, fresh_state, tmp_path, caplog):
    bad = tmp_path / "kernels.cpp"
    bad.write_text("this is not C++\n")
    monkeypatch.setenv("GPTFORGE_NATIVE", "1")
    monkeypatch.setenv("GPTFORGE_NATIVE_DIR", str(tmp_path / "build"))
    monkeypatch.setattr(build, "SOURCES", [bad])
    with caplog.at_level(logging.WARNING, logger="gptforge.backends.cpu.build"):
        assert build.load() is None
        assert build.load() is None
        assert ops.onednn_linear_kernel(torch.zeros(1)) is None
    warnings = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(warnings) == 1
    assert "GPTFORGE_NATIVE=0" in warnings[0].getMessage()
    # a layer built now works, on a Python path (the panel kernel needs the native module)
    q = Int8Linear.from_linear(nn.Linear(16, 8))
    q.prepare()
    assert q._native is None and q.resolved_kernel(q.weight.device) != "panel"
    assert q(torch.randn(1, 16)).shape == (1, 8)


def test_build_directory_depends_on_the_source(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTFORGE_NATIVE_DIR", str(tmp_path))
    a, b = tmp_path / "a.cpp", tmp_path / "b.cpp"
    a.write_text("// one\n")
    b.write_text("// two\n")
    assert build.build_directory(a) != build.build_directory(b)
    assert build.build_directory(a).parent == tmp_path
    assert torch.__version__.split("+")[0] in build.build_directory(a).name


def test_build_directory_depends_on_everything_that_changes_the_binary(tmp_path, monkeypatch):
    # Another header, another checkout, another ninja or compiler, another torch install: another folder, so
    # a second venv or checkout builds beside the first instead of evicting it.
    monkeypatch.setenv("GPTFORGE_NATIVE_DIR", str(tmp_path))
    one, two = tmp_path / "one", tmp_path / "two"
    for folder in (one, two):
        folder.mkdir()
        (folder / "k.cpp").write_text("// k\n")
        (folder / "k.h").write_text("// h\n")
    first = build.build_directory(one / "k.cpp")
    assert build.build_directory(one / "k.cpp") == first
    assert build.build_directory(two / "k.cpp") != first  # the same text in another checkout
    (one / "k.h").write_text("// h changed\n")
    changed = build.build_directory(one / "k.cpp")
    assert changed != first
    monkeypatch.setattr(build, "_ninja", lambda: str(tmp_path / "other-ninja"))
    assert build.build_directory(one / "k.cpp") != changed
    monkeypatch.setenv("CXX", "clang++")
    assert len({build.build_directory(one / "k.cpp"), changed, first}) == 3
    before = build.build_directory(one / "k.cpp")
    monkeypatch.setattr(torch, "__file__", str(tmp_path / "venv2" / "torch" / "__init__.py"))
    assert build.build_directory(one / "k.cpp") != before


def test_every_op_of_the_table_is_compiled_and_agrees_with_its_reference():
    if not HAVE_COMPILER or not build.enabled() or ops.panel_isa() < 1:
        pytest.skip("needs the native kernels with vector code")
    torch.manual_seed(5)
    x = torch.randn(5, 40)
    for name, op in ops.OPS.items():
        assert ops.native_op(name) is not None, name
    close = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ops.native_op("gelu_tanh")(x), ops.OPS["gelu_tanh"].reference(x), **close)
    torch.testing.assert_close(ops.native_op("exp_values")(x), ops.OPS["exp_values"].reference(x), **close)
    w, b = torch.randn(70, 40) * 0.1, torch.randn(70)
    panels = pack_panels(w)
    torch.testing.assert_close(ops.native_op("panel_linear")(x, panels, 70, b),
                               ops.OPS["panel_linear"].reference(x, panels, 70, b), **close)
    q, scales = quantize_weight(w)
    int8 = pack_panels(q)
    padded = torch.zeros(int8.shape[0] * 64)
    padded[:70] = scales
    torch.testing.assert_close(ops.native_op("panel_int8_linear")(x, int8, padded, 70, b),
                               ops.OPS["panel_int8_linear"].reference(x, int8, padded, 70, b), **close)
    qh, k, v = torch.randn(3, 2, 1, 8), torch.randn(3, 2, 6, 8), torch.randn(3, 2, 6, 8)
    for starts in ([], [0, 2, 5]):
        torch.testing.assert_close(ops.native_op("decode_attention")(qh, k, v, starts, 0.3),
                                   ops.OPS["decode_attention"].reference(qh, k, v, starts, 0.3), **close)


def test_a_stale_lock_does_not_hang_the_next_build_and_a_build_says_so_once(tmp_path):
    # torch's builder waits forever while its `lock` file exists; a killed build leaves one behind.
    import subprocess
    import sys
    import textwrap

    source = tmp_path / "mini.cpp"
    source.write_text('#include <pybind11/pybind11.h>\n'
                      f'PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {{ m.attr("ABI") = {build._ABI}; }}\n')
    build_dir = tmp_path / "build-0123456789ab"
    build_dir.mkdir()
    (build_dir / "lock").write_text("")
    script = textwrap.dedent(f"""
        from pathlib import Path
        from gptforge.backends.cpu import build
        module = build.build(Path({str(source)!r}), Path({str(build_dir)!r}))
        print("ABI", module.ABI)
    """)
    if not HAVE_COMPILER:
        pytest.skip("no C++ compiler here")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"ABI {build._ABI}" in done.stdout
    assert not (build_dir / "lock").exists()
    # With no logging configured, a build that compiles says so in one line (Python's last-resort handler
    # prints WARNING records); one that finds its build done says nothing.
    assert done.stderr.count("building gptforge's native CPU kernels") == 1, done.stderr[-2000:]
    again = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "building" not in again.stderr, again.stderr[-2000:]


@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated")  # torch's own unpickling of fbgemm weights
@pytest.mark.parametrize("kernel", ["amx", "panel", "fbgemm"])
def test_an_int8_prepared_model_still_pickles_whole(tmp_path, kernel):
    # torch.save(model) pickles the modules; the native kernel object is rebuilt on load.
    skip_unless_int8_kernel(kernel)
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=20)).eval()
    model = quantize_int8(model, kernel=kernel)
    assert model.lm_head.resolved_kernel(torch.device("cpu")) == kernel
    ids = torch.randint(0, 20, (2, 5))
    with torch.inference_mode():
        expected = model(ids)
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    layer = next(m for m in loaded.modules() if isinstance(m, Int8Linear))
    assert (layer._native is None) == (build.load() is None)
    with torch.inference_mode():
        assert torch.equal(loaded(ids), expected)


@needs_native
@pytest.mark.parametrize("kind", ["panel", "onednn", "int8", "int8-panel", "int8-amx"])
def test_native_calls_release_the_gil(kind):
    # The server's HTTP thread must run while the scheduler thread computes a layer: a long call in one
    # thread must leave Python free in another (it is still running when the other thread looks).
    import threading
    import time

    if kind == "int8" and not fbgemm_available():
        pytest.skip("needs fbgemm (x86 CPU)")
    if (kind in ("panel", "int8-panel") and not panel_available()) or (kind == "onednn" and not onednn_available()):
        pytest.skip(f"no {kind} kernel here")
    if kind == "int8-amx" and not amx_available():
        pytest.skip("no AMX-INT8 here")
    torch.manual_seed(0)
    linear = nn.Linear(768, 8192)
    if kind in ("panel", "onednn"):
        layer = PackedLinear(linear, kernel=kind)
    else:
        layer = Int8Linear.from_linear(linear, kernel={"int8": "fbgemm", "int8-panel": "panel", "int8-amx": "amx"}[kind])
        layer.prepare()
    assert layer._native is not None
    x = torch.randn(1024, 768)  # ~13 GFLOP: well over 20 ms on any CPU this runs on
    start = time.perf_counter()
    layer._native(x, layer.bias)
    took = time.perf_counter() - start
    worker = threading.Thread(target=layer._native, args=(x, layer.bias))
    worker.start()
    time.sleep(min(0.02, took / 5))
    still_running = worker.is_alive()  # reached only once this thread holds the GIL again
    worker.join()
    assert still_running, f"the native call ({took * 1e3:.0f} ms) held the GIL"


@needs_native
@pytest.mark.parametrize("quantize", [None, "int8"])
@pytest.mark.parametrize("ragged", [False, True])
@pytest.mark.parametrize("kv_cache_dtype", [None, "bfloat16"])
def test_one_call_decode_step_gives_the_python_loops_bits(monkeypatch, quantize, ragged, kv_cache_dtype):
    # GPT runs a prepared model's decode step as one native call (decode_blocks); it must compute what
    # the per-block Python loop computes: the same logits and the same cached keys/values, bit for bit,
    # also with a bfloat16 cache (the native step rounds its writes as torch does).
    torch.manual_seed(0)
    model = prepare_for_inference(GPT(ModelConfig(n_layer=3, n_head=4, n_embd=64, block_size=64,
                                                  vocab_size=97)).eval(), quantize=quantize,
                                  kv_cache_dtype=kv_cache_dtype)
    prompt = torch.randint(0, 97, (3, 9))
    steps = torch.randint(0, 97, (4, 3, 1))

    def decode():
        cache = model.new_kv_cache(3, 32)
        with torch.inference_mode():
            model(prompt, kv_cache=cache)
            if ragged:  # rows starting at different columns, as the server's shared cache holds them
                cache.row_starts = [0, 3, 5]
            logits = [model(tok, kv_cache=cache, position_ids=torch.full((3, 1), cache.length)) for tok in steps]
        assert cache.k.dtype == (torch.bfloat16 if kv_cache_dtype == "bfloat16" else torch.float32)
        return torch.stack(logits), cache.k.clone(), cache.v.clone()

    with torch.inference_mode():
        assert model.blocks.decode_plan(torch.zeros(3, 1, 64)) is not None
    if ops.gelu_available():  # then both paths run the native GELU
        assert all(type(block.mlp.act).__name__ == "NativeGELU" for block in model.blocks)
    fused = decode()
    monkeypatch.setattr(FusedDecodeBlocks, "decode_plan", lambda self, x: None)
    loop = decode()
    for a, b in zip(fused, loop):
        assert torch.equal(a, b)


@needs_native
def test_one_call_decode_step_steps_aside_for_hooks_training_and_gradients():
    torch.manual_seed(0)
    model = prepare_for_inference(GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32,
                                                  vocab_size=50)).eval())
    x = torch.zeros(1, 1, 32)
    with torch.inference_mode():
        assert model.blocks.decode_plan(x) is not None
        seen = []
        handle = model.blocks[1].mlp.fc.register_forward_hook(lambda m, i, o: seen.append(o.shape))
        assert model.blocks.decode_plan(x) is None  # a hook must run, so the Python loop does
        cache = model.new_kv_cache(1, 8)
        model(torch.tensor([[1, 2]]), kv_cache=cache)
        model(torch.tensor([[3]]), kv_cache=cache)
        assert seen[-1] == (1, 1, 128)
        handle.remove()
        assert model.blocks.decode_plan(x.double()) is None
    assert model.blocks.decode_plan(x) is None  # gradients enabled
    with torch.inference_mode():
        model.train()
        assert model.blocks.decode_plan(x) is None
        model.eval()
        model.blocks[0].mlp.fc = nn.Linear(32, 128)  # a plain layer: no native kernel to call
        assert model.blocks.decode_plan(x) is None


@needs_native
@pytest.mark.parametrize("head_dim", [64, 24, 20])  # AVX-512 (16 | D), AVX2 (8 | D), the scalar loop
def test_decode_attention_matches_sdpa_and_each_row_is_computed_alone(head_dim):
    module = build.load()
    torch.manual_seed(5)
    B, H, S = 5, 3, 40
    cache_k, cache_v = torch.randn(2, B, H, 64, head_dim), torch.randn(2, B, H, 64, head_dim)
    k, v = cache_k[1, :, :, :S], cache_v[1, :, :, :S]  # views of a cache, as the model passes them
    q = torch.randn(B, 1, H * head_dim).view(B, 1, H, head_dim).transpose(1, 2)
    starts = [0, 7, 39, 12, 3]
    scale = head_dim ** -0.5
    y = module.decode_attention(q, k, v, starts, scale)
    assert y.shape == (B, H, 1, head_dim)
    for i, s in enumerate(starts):
        want = F.scaled_dot_product_attention(q[i:i + 1], k[i:i + 1, :, s:], v[i:i + 1, :, s:])
        torch.testing.assert_close(y[i:i + 1], want, rtol=1e-5, atol=1e-6)
        # the same row alone, on its own keys only: the same bits
        assert torch.equal(module.decode_attention(q[i:i + 1], k[i:i + 1, :, s:], v[i:i + 1, :, s:], [], scale),
                           y[i:i + 1])
    with pytest.raises(RuntimeError, match="a start outside the 40 keys"):
        module.decode_attention(q, k, v, [0, 0, 40, 0, 0], scale)
    with pytest.raises(RuntimeError, match="expected 5 starts"):
        module.decode_attention(q, k, v, [0], scale)
    with pytest.raises(RuntimeError, match="one contiguous"):  # every other key: not one (S, D) block
        module.decode_attention(q, k[..., ::2, :], v[..., ::2, :], [], scale)
    # A bfloat16 cache: widening is exact, so the same bits as float32 keys/values holding those values.
    kb, vb = cache_k.bfloat16()[1, :, :, :S], cache_v.bfloat16()[1, :, :, :S]
    assert torch.equal(module.decode_attention(q, kb, vb, starts, scale),
                       module.decode_attention(q, kb.float(), vb.float(), starts, scale))
    with pytest.raises(RuntimeError, match="both float32 or both bfloat16"):
        module.decode_attention(q, kb, v, starts, scale)


@needs_native
def test_native_gelu_is_accurate_and_its_vector_code_equals_the_scalar_reference():
    if not ops.gelu_available():
        pytest.skip("the native GELU has vector code for AVX2 and AVX-512 only")
    module = build.load()
    torch.manual_seed(6)
    special = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e20, -1e20, 3e38, -3e38, float("inf"), float("-inf"),
                            float("nan")])
    x = torch.cat([torch.randn(40_000) * 3, torch.linspace(-60, 60, 2001), special])
    x = torch.cat([x, torch.linspace(-10.7, -10.1, 3001)])  # exp(-2u) near overflow
    vector, scalar = module.gelu_tanh(x), module.gelu_tanh(x, 0)
    nan = torch.isnan(vector)
    assert torch.equal(nan, torch.isnan(scalar)) and torch.equal(vector[~nan], scalar[~nan])
    for level in range(1, module.gelu_isa() + 1):  # each vector level: AVX2, AVX-512
        y = module.gelu_tanh(x, level)
        assert torch.equal(torch.isnan(y), nan) and torch.equal(y[~nan], scalar[~nan]), f"level {level}"
    for n in (1, 7, 9, 15, 17, 33):  # the tails: every value gets the same bits
        assert torch.equal(module.gelu_tanh(x[:n]), vector[:n])
    aten = F.gelu(x, approximate="tanh")
    assert torch.equal(torch.isnan(aten), nan)
    tail = torch.arange(len(x)) >= len(x) - len(special)
    assert torch.equal(vector[tail & ~nan], aten[tail & ~nan])  # zeros, signs, overflow, infinities as ATen
    reference = F.gelu(x.double(), approximate="tanh")
    finite = torch.isfinite(reference)
    error = (vector.double() - reference).abs()[finite]
    assert float(error.max()) < 1e-6
    big = finite & (reference.abs() > 1e-3)
    assert float(((vector.double() - reference).abs() / reference.abs())[big].max()) < 5e-6
    grid = x.view(-1)[:40_000].view(200, 200)[:, ::2]  # non-contiguous input
    assert torch.equal(module.gelu_tanh(grid), module.gelu_tanh(grid.contiguous()))


@needs_native
def test_native_exp_levels_equal_the_scalar_reference():
    module = build.load()
    # Over the clamps, into subnormal results (below about -87.3) and overflow (above about 88.7), where
    # AVX2 applies 2^n as two powers of two, and around 0 and the rounding points of n.
    x = torch.cat([torch.linspace(-110, 95, 200_001), torch.linspace(-104.5, -86, 20_001),
                   torch.linspace(88, 89.5, 5001), torch.randn(10_000) * 20,
                   torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 0.5 * math.log(2)])])
    scalar = module.exp_values(x, 0)
    nan = torch.isnan(scalar)
    assert int(nan.sum()) == 1
    for level in range(1, module.gelu_isa() + 1):
        y = module.exp_values(x, level)
        assert torch.equal(torch.isnan(y), nan) and torch.equal(y[~nan], scalar[~nan]), f"level {level}"
    reference = torch.exp(x.double().clamp(-104, 89))
    finite = torch.isfinite(reference) & (reference > 1e-37) & (reference < 3e38)
    assert float(((scalar.double() - reference).abs() / reference)[finite].max()) < 4e-7
    assert float(scalar[x < -104].max()) == 0.0 and bool(torch.isinf(scalar[(x > 89) & ~nan]).all())


@needs_native
def test_native_gelu_module_falls_back_where_the_kernel_does_not_apply():
    act = NativeGELU()
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    y = act(x)
    assert y.dtype == torch.float64 and torch.allclose(y, F.gelu(x, approximate="tanh"))
    y.sum().backward()
    assert x.grad is not None
    x32 = torch.randn(3, 5)
    assert torch.allclose(act(x32), F.gelu(x32, approximate="tanh"), atol=1e-6)
