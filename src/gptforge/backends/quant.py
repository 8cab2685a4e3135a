"""int8 weight-only quantization: a module swap applied to a built model (gpt-fast style).

It lives beside, not inside, the CPU backend: the ``int8pack`` and ``dequant`` kernels serve GPUs too; the
CPU kernels come from :mod:`gptforge.backends.cpu`.

``quantize_int8(model)`` replaces every ``nn.Linear`` with an :class:`Int8Linear` that stores the weight
as int8 with one float scale per output channel (symmetric: ``scale = absmax(row) / 127``) and keeps the
bias in float. Only the weights lose precision: activations stay in floating point, or, where a kernel
multiplies in integers (``amx``, ``fbgemm``), are split per row into two int8 parts that keep ~14-16 bits,
an error far below the weight's own int8 rounding.

The tied LM head (``lm_head.weight is wte.weight``) gets a quantized *copy* of the shared matrix; the
token embedding stays a float ``nn.Embedding``. A decode step reads one embedding row per token but the
whole head matrix, so only the head's copy matters for speed, and keeping the embedding float leaves
the input exact and keeps ``model.wte.weight`` (whose dtype and device the KV cache follows) untouched.

Kernels (picked per device by ``kernel="auto"``; all compute the same weight-only product):

``amx`` (x86 CPUs with AMX-INT8, Intel Sapphire Rapids and later, when the native kernels
(:mod:`gptforge.backends.cpu`) could be built; the CPU default there)
    gptforge's own kernel on Intel AMX's tile multiply (backends/cpu/csrc, AmxInt8Linear):
    int8 weights times int8 activations in exact int32 sums. Activations are not rounded to 8 bits:
    each row is split into two int8 parts on a per-row grid, ``x ≈ step·(hi + lo/254)`` with
    ``step = max|x| / 127`` (about 16 bits; the error is ~1e-5 of the row's largest value, far below the
    weight's own rounding), both multiplied exactly, then ``((hi_sum + lo_sum/254)·step)·scale + bias``.
    A row's grid depends on that row alone and integer sums are exact, so every output has the same bits
    at any row count and thread count (batch-invariant by construction). AMX does 1024 int8
    multiply-adds a cycle, so the layer is bound by reading the weight at any decode size: GPT-2 124M's
    49 linears take ~3.3 ms at 1 row and ~4.5 ms at 16 rows on the CI machine (the panel kernel: 4.1 /
    19.9 ms, bound by float multiply-adds). Weight layout: :func:`pack_amx`.
``panel`` (x86 CPUs with AVX2 or AVX-512, when the native kernels could be built; the CPU default
where ``amx`` is not)
    gptforge's own kernel (backends/cpu/csrc), the float32 panel kernel of
    :class:`gptforge.backends.cpu.PackedLinear` reading int8 weights: the weight is packed once into panels of
    64 outputs, ``(ceil(N / 64), K, 64)`` int8, widened to float32 in registers (exact), and each output
    is one fused multiply-add chain ``sum_k x[k] * q[k]`` in order, then ``* scale``, then ``+ bias``.
    Activations are not rounded at all, and every output has the same bits at any row count, thread
    count and instruction set (batch-invariant by construction). It reads a quarter of float32's bytes:
    a GPT-2 124M decode step's linears take ~5 ms at one row on the Intel Xeon CI machine, fbgemm ~7.
``fbgemm`` (x86 CPUs)
    fbgemm's int8 GEMM on the packed weight. It multiplies int8 by int8, so each activation row is split
    into two int8 parts, ``x = s·(q1 + q2/126)`` with ``|q| <= 63`` (a per-row scale, about 14 bits in
    all), fed as 2M+1 rows together with one fixed row that pins fbgemm's own input quantization to
    scale 1, zero point 64 (lossless for these integers). Products are exact in int32, so the result
    matches the dequantized weight to about 1e-3 relative, well below the weight's own rounding (~1e-2).
    At decode sizes the GEMM is bound by memory bandwidth, so the extra rows are almost free.
    The split and the recombination run as one C++ call when the native kernels could be built (the
    same arithmetic, bit for bit; ~15 torch calls from Python otherwise, as slow as the GEMM at batch 1).
``int8pack``
    ``torch._weight_int8pack_mm`` (CUDA; CPUs with AVX-512, where its kernel is vectorized; on AVX2 it
    is scalar and ~10x slower than float32, which is why x86 uses fbgemm).
``dequant``
    ``F.linear(x, w.to(x.dtype)) * scale``: portable, but converts the whole weight on every call.

Saving and loading: quantize at load time, after the float weights are loaded (``load_checkpoint``
then ``quantize_int8``); the quantization is deterministic, so this reproduces the same int8 model.
``Int8Linear.state_dict()`` holds plain tensors (int8 ``weight``, float32 ``scales``, ``bias``) and loads
back into an ``Int8Linear`` of the same shape, should a quantized state dict ever be stored.
"""

from __future__ import annotations

import logging
import platform
import warnings
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from .cpu.layouts import AMX_MAX_INPUTS, AMX_STRIP, pack_amx, pack_panels, quantize_weight
from .cpu.ops import (amx_available, amx_int8_linear_kernel, fbgemm_int8_linear_kernel, panel_available,
                      panel_int8_linear_kernel)

log = logging.getLogger(__name__)

KERNELS = ("auto", "amx", "panel", "fbgemm", "int8pack", "dequant")


def fbgemm_available() -> bool:
    return (platform.machine().lower() in ("x86_64", "amd64")
            and "fbgemm" in torch.backends.quantized.supported_engines
            and torch.backends.quantized.engine in ("x86", "fbgemm"))


def _cpu_has_avx512() -> bool:
    try:
        return "AVX512" in torch.backends.cpu.get_cpu_capability()
    except Exception:  # older builds
        return False


def default_kernel(device: torch.device) -> str:
    """The fastest kernel known to work on ``device`` (see the module docstring)."""
    if device.type == "cuda":
        return "int8pack" if hasattr(torch, "_weight_int8pack_mm") else "dequant"
    if device.type == "cpu":
        if amx_available():
            return "amx"
        if panel_available():
            return "panel"
        if fbgemm_available():
            return "fbgemm"
        if hasattr(torch, "_weight_int8pack_mm") and (platform.machine().lower() in ("arm64", "aarch64")
                                                      or _cpu_has_avx512()):
            return "int8pack"
    return "dequant"


class Int8Linear(nn.Module):
    """A Linear layer with an int8 weight (N, K), float32 per-row scales (N,) and an optional float bias."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, kernel: str = "auto",
                 device=None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        if kernel not in KERNELS:
            raise ConfigError(f"unknown int8 kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
        self.in_features = in_features
        self.out_features = out_features
        self.kernel = kernel
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, dtype=torch.float32, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype or torch.float32, device=device))
        else:
            self.bias = None
        self._packed = None  # the kernel's packed weight, derived from ``weight``; rebuilt when that changes
        self._padded_scales: Optional[torch.Tensor] = None  # amx / panel: scales padded to whole strips / panels
        self._pin: Optional[torch.Tensor] = None  # fbgemm's extra input row, see _pin_row
        self._native = None  # the same product as one C++ call (the native kernels), when they could be built
        self._resolved: dict[str, str] = {}  # device type → kernel actually used

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, kernel: str = "auto") -> "Int8Linear":
        """An Int8Linear holding a quantized copy of ``linear``'s weight (the original is not touched)."""
        w = linear.weight
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, kernel=kernel,
                     device=w.device, dtype=w.dtype)
        q, scales = quantize_weight(w)
        module.weight.copy_(q)
        module.scales.copy_(scales)
        if linear.bias is not None:
            module.bias.copy_(linear.bias.detach())
        return module

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, kernel={self.kernel}")

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.weight.to(dtype) * self.scales.to(dtype).unsqueeze(1)

    # -- keep the derived packed weight in step with the buffers -----------------------------------
    def _apply(self, fn, *args, **kwargs):
        self._packed = self._native = self._padded_scales = None
        self._resolved.clear()
        result = super()._apply(fn, *args, **kwargs)
        if self.scales.dtype != torch.float32:  # model.to(bfloat16) must not round the scales
            self.scales = self.scales.float()
        return result

    def _load_from_state_dict(self, *args, **kwargs):
        self._packed = self._native = self._padded_scales = None
        return super()._load_from_state_dict(*args, **kwargs)

    # The native kernel object cannot be pickled: drop it, and rebuild it from the packed weight after.
    def __getstate__(self):
        state = dict(self.__dict__)
        state["_native"] = None
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_padded_scales", None)
        if self.__dict__.get("_packed") is not None:
            self._attach_native()
            if self._native is None and self._padded_scales is not None:
                # amx and panel need the native kernel, which this process lacks: pick and pack again.
                self._packed = self._padded_scales = None
                self._resolved.clear()

    def _attach_native(self) -> None:
        kernel = self._resolved.get(self.weight.device.type)
        if kernel == "amx":
            self._native = amx_int8_linear_kernel(self._packed, self._padded_scales, self.out_features,
                                                  self.in_features)
        elif kernel == "panel":
            self._native = panel_int8_linear_kernel(self._packed, self._padded_scales, self.out_features)
        else:
            self._native = fbgemm_int8_linear_kernel(self._packed, self.in_features)

    def native_decode_kernel(self):
        """(C++ kernel, bias) that forward calls for float32 CPU input, or None: what the one-call decode
        step (:class:`gptforge.backends.cpu.FusedDecodeBlocks`) runs instead of this module."""
        native = self.__dict__.get("_native")  # set by prepare() on CPU only; dropped by .to()
        if native is None:
            return None
        kernel, bias = self._resolved.get("cpu"), self._buffers.get("bias")  # (runs every decode step)
        if kernel in ("amx", "panel"):
            return native, bias if bias is None or bias.dtype == torch.float32 else bias.float()
        if kernel == "fbgemm":
            return native, bias
        return None

    # -- kernels -----------------------------------------------------------------------------------
    def resolved_kernel(self, device: torch.device) -> str:
        """The kernel this layer uses on ``device``."""
        kernel = self._resolved.get(device.type)
        if kernel is None:
            kernel = default_kernel(device) if self.kernel == "auto" else self.kernel
            if kernel == "amx" and (device.type != "cpu" or not amx_available() or self.in_features > AMX_MAX_INPUTS):
                kernel = "panel"  # and from there to what this device has
            if kernel == "panel" and (device.type != "cpu" or not panel_available()):
                kernel = default_kernel(device)
            if kernel == "fbgemm" and (device.type != "cpu" or not fbgemm_available() or self.in_features < 2):
                kernel = "dequant"
            if kernel == "int8pack" and not hasattr(torch, "_weight_int8pack_mm"):
                kernel = "dequant"
            self._resolved[device.type] = kernel
        return kernel

    def prepare(self) -> None:
        """Pack the weight now for the kernel its device uses (otherwise done on the first call)."""
        if self._packed is not None:
            return
        kernel = self.resolved_kernel(self.weight.device)
        if kernel in ("amx", "panel"):
            packed = pack_amx(self.weight) if kernel == "amx" else pack_panels(self.weight)
            width = AMX_STRIP if kernel == "amx" else packed.shape[2]
            scales = torch.zeros(packed.shape[0] * width, dtype=torch.float32)
            scales[:self.out_features] = self.scales.float()
            self._packed, self._padded_scales = packed, scales
            self._attach_native()
            if self._native is None:  # the native module refused it (warned): the next kernel down instead
                self._packed = self._padded_scales = None
                fallback = "panel" if kernel == "amx" and panel_available() else None
                self._resolved[self.weight.device.type] = fallback or ("fbgemm" if fbgemm_available() else "dequant")
                self.prepare()
        elif kernel == "fbgemm":
            self._packed = _fbgemm_pack(self.weight, self.scales)
            self._pin = _pin_row(self.in_features)
            self._attach_native()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        kernel = self.resolved_kernel(x.device)
        if kernel in ("amx", "panel"):
            if self._packed is None:
                self.prepare()
                return self.forward(x)  # the kernel may have changed (a refused layer)
            native, bias = self.native_decode_kernel()
            y = native(x2.float(), bias)
        elif kernel == "fbgemm":
            if self._packed is None:
                self.prepare()
            if self._native is not None and x2.dtype == torch.float32:
                y = self._native(x2, self.bias)
            else:
                y = _fbgemm_linear(x2, self._packed, self._pin, self.bias)
        elif kernel == "int8pack":
            try:
                y = torch._weight_int8pack_mm(x2.contiguous(), self.weight, self.scales.to(x.dtype))
            except (RuntimeError, NotImplementedError) as exc:  # dtype or device this build lacks
                log.warning("torch._weight_int8pack_mm failed on %s (%s); using the dequant kernel",
                            x.device, str(exc).splitlines()[0])
                self._resolved[x.device.type] = "dequant"
                return self.forward(x)
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
        else:
            y = F.linear(x2, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)


def _fbgemm_pack(weight: torch.Tensor, scales: torch.Tensor):
    n = weight.shape[0]
    with warnings.catch_warnings():
        # The quantized-tensor constructors are deprecated in favour of torchao; this private use only
        # feeds fbgemm's prepack and is covered by the tests, which fail if it disappears.
        warnings.simplefilter("ignore")
        qweight = torch._make_per_channel_quantized_tensor(
            weight.cpu(), scales.cpu().double(), torch.zeros(n, dtype=torch.long), 0)
        return torch.ops.quantized.linear_prepack(qweight, None)


def _pin_row(k: int) -> torch.Tensor:
    """A (1, K) row holding -64 and 63: fbgemm then quantizes the whole input with scale 1, zero point 64."""
    row = torch.zeros(1, k)
    row[0, 0], row[0, 1] = -64.0, 63.0
    return row


def _fbgemm_linear(x: torch.Tensor, packed, pin: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x (M, K) float → (M, N) float32 through fbgemm, with ~14-bit activations (see the module docstring)."""
    x = x.float()
    m = x.shape[0]
    step = x.abs().amax(dim=1, keepdim=True).clamp_(min=1e-30).div_(63.0)  # per-row grid step, (M, 1)
    t = x / step  # (M, K) in [-63, 63]
    q1 = torch.round(t)
    q2 = t.sub_(q1).mul_(126.0).round_()  # the remainder, |t - q1| <= 1/2, on a 126x finer grid
    rows = torch.cat([q1, q2, pin])  # (2M + 1, K), integers in [-64, 63]
    out = torch.ops.quantized.linear_dynamic(rows, packed, True)  # reduce_range: inputs in [0, 127]
    y = out[:m].add_(out[m:2 * m], alpha=1.0 / 126.0).mul_(step)
    return y if bias is None else y.add_(bias)

@torch.no_grad()
def quantize_int8(model: nn.Module, *, include_lm_head: bool = True, kernel: str = "auto") -> nn.Module:
    """Replace the model's ``nn.Linear`` modules with :class:`Int8Linear`, in place; returns the model.

    ``include_lm_head=False`` leaves ``model.lm_head`` in float (still tied to the embedding). Other
    modules (embeddings, LayerNorms) are not touched. Quantize after the float weights are loaded.
    """
    if kernel not in KERNELS:
        raise ConfigError(f"unknown int8 kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
    head = getattr(model, "lm_head", None)
    targets = [(name, module) for name, module in model.named_modules()
               if type(module) is nn.Linear and (include_lm_head or module is not head)]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        quantized = Int8Linear.from_linear(linear, kernel=kernel)
        quantized.prepare()
        setattr(parent, child, quantized)
    if targets:
        first = model.get_submodule(targets[0][0])
        device = first.weight.device
        log.info("quantized %d Linear layers to int8 (kernel %s on %s)", len(targets),
                 first.resolved_kernel(device), device)
    return model
