"""The CPU backend's native ops: one table, each op with its torch reference.

Everything the rest of gptforge runs on the C++ extension (csrc/, built on first use by :mod:`.build`)
goes through this module: the ops of :data:`OPS` (:func:`native_op` gives the compiled one, or None where
the extension is unavailable), the per-layer kernel objects (``*_kernel``), and what this CPU can run
(``*_available``). Each op's ``reference`` computes the same thing in torch, with the same arguments: the
tests compare the two, and it documents what the C++ computes (the C++ keeps its own promises on top, such
as the same bits at any row count, which the tests check against the scalar code paths). The references are for tests and reading, not a fallback: a layer that cannot run an op
natively keeps its own Python path.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ...model.sampling import draw_from_logits
from .build import enabled, load
from .layouts import unpack_amx, unpack_panels

log = logging.getLogger(__name__)


def _panel_linear(x, packed, out_features, bias, isa=-1, prefetch=32):
    return F.linear(x, unpack_panels(packed, out_features), bias)


def _dequantized(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return q.float() * scales[:q.shape[0], None]


def _panel_int8_linear(x, packed, scales, out_features, bias, isa=-1, prefetch=64):
    return F.linear(x, _dequantized(unpack_panels(packed, out_features), scales), bias)


def _amx_int8_linear(x, packed, scales, out_features, in_features, bias, isa=-1, prefetch=4):
    return F.linear(x, _dequantized(unpack_amx(packed, out_features, in_features), scales), bias)


def _decode_attention(q, k, v, starts, scale):
    k, v = k.to(q.dtype), v.to(q.dtype)
    starts = starts or [0] * q.shape[0]
    return torch.cat([F.scaled_dot_product_attention(q[i:i + 1], k[i:i + 1, :, s:], v[i:i + 1, :, s:], scale=scale)
                      for i, s in enumerate(starts)])


def _gelu_tanh(x, isa=-1):
    return F.gelu(x, approximate="tanh")


def _exp_values(x, isa=-1):
    return torch.exp(x)


def _screen_logits(x, panels, dense, out_features):
    weight = dense if dense is not None else unpack_panels(panels, out_features)
    return F.linear(x, weight)


def _screen_argmax(x, s, err, norm, err_max, norm_max, split_inputs, suppress, panels, dense, max_candidates,
                   isa=-1):
    logits = _screen_logits(x, panels, dense, s.shape[1])
    if suppress >= 0:
        logits[:, suppress] = float("-inf")
    return logits.argmax(dim=1), 0


def _screen_sample(x, s, err, norm, split_inputs, suppress, panels, dense, temperature, seeds, max_tries, isa=-1):
    # The same distribution; the draws themselves use the random numbers otherwise.
    return draw_from_logits(_screen_logits(x, panels, dense, s.shape[1]), temperature, seeds, suppress), 0


def _decode_blocks(x, plan, n_head, cache_k, cache_v, length, starts):
    B, _, C = x.shape
    D = C // n_head
    for layer, (w1, b1, eps1, qkv, qkv_b, proj, proj_b, w2, b2, eps2, fc, fc_b, out, out_b, gelu) in enumerate(plan):
        q, k, v = qkv(F.layer_norm(x, (C,), w1, b1, eps1), qkv_b).split(C, dim=2)
        q, k, v = (t.reshape(B, 1, n_head, D).transpose(1, 2) for t in (q, k, v))  # (B, H, 1, D)
        cache_k[layer, :, :, length:length + 1] = k
        cache_v[layer, :, :, length:length + 1] = v
        y = _decode_attention(q, cache_k[layer, :, :, :length + 1], cache_v[layer, :, :, :length + 1], starts,
                              1.0 / math.sqrt(D))
        x = x + proj(y.transpose(1, 2).reshape(B, 1, C), proj_b)
        f = fc(F.layer_norm(x, (C,), w2, b2, eps2), fc_b)
        x = x + out(_gelu_tanh(f) if gelu == "native" else F.gelu(f, approximate=gelu), out_b)
    return x


@dataclass(frozen=True)
class Op:
    """One native op: its torch ``reference`` (same arguments, the same result up to float32 rounding; for
    the two sampling ops, the same distribution) and what it computes."""

    reference: Callable
    doc: str


OPS: dict[str, Op] = {
    "panel_linear": Op(_panel_linear, "x (..., K) float32 times a pack_panels weight, + bias: each output "
                       "one fused multiply-add chain over k in order (batch-invariant by construction)"),
    "panel_int8_linear": Op(_panel_int8_linear, "the panel kernel on int8 panels with per-output scales"),
    "amx_int8_linear": Op(_amx_int8_linear, "int8 weights (pack_amx) times each row split into two int8 "
                          "parts (~16 bits) on AMX tiles, exact int32 sums"),
    "decode_attention": Op(_decode_attention, "one query a row over its cached keys from starts[row], "
                           "each (row, head) alone; keys and values float32 or bfloat16"),
    "gelu_tanh": Op(_gelu_tanh, "GPT-2's tanh GELU as x / (1 + exp(-2u)), vectorized exp"),
    "exp_values": Op(_exp_values, "the vectorized exp that gelu_tanh and attention use"),
    "screen_argmax": Op(_screen_argmax, "each row's first argmax of the panel-packed layer's float32 "
                        "outputs, from an int8 copy's outputs s plus exact outputs of the few candidates; "
                        "(tokens, candidates), tokens empty when the screen cannot settle"),
    "screen_sample": Op(_screen_sample, "a draw a row from softmax(outputs / T) by rejection from the "
                        "screen's upper ends (the same distribution); (tokens, proposals), -1 where unsettled"),
    "decode_blocks": Op(_decode_blocks, "a decode step's whole stack of blocks from a plan of per-block "
                        "LayerNorms, layer kernels and GELU, each layer's cache write and attention fused"),
}


def native_op(name: str) -> Optional[Callable]:
    """The compiled op ``name`` of :data:`OPS`, or None where the native kernels are unavailable."""
    if name not in OPS:
        raise KeyError(f"no native op {name!r}; the table has {', '.join(OPS)}")
    module = load()
    return None if module is None else getattr(module, name)


def extension_constant(name: str) -> Optional[int]:
    """A constant the extension reports (``PANEL``, ``AMX_STRIP``, ``AMX_DEPTH``, ``ABI``), or None."""
    module = load()
    return None if module is None else int(getattr(module, name))


def _kernel(class_name: str, *args):
    """An instance of the extension's ``class_name`` for one layer, or None (unavailable, or refused)."""
    module = load()
    if module is None:
        return None
    try:
        return getattr(module, class_name)(*args)
    except Exception as exc:
        log.warning("native %s kernel refused a layer (%s); using the Python path", class_name, exc)
        return None


def fbgemm_int8_linear_kernel(packed, in_features: int):
    """A native callable ``(x (M, K) float32, bias) -> y`` for an fbgemm-packed int8 weight, or None: the
    arithmetic of :func:`gptforge.backends.quant._fbgemm_linear` (its reference), bit for bit."""
    return _kernel("Int8Linear", packed, in_features)


def onednn_linear_kernel(packed_weight: torch.Tensor):
    """A native callable ``(x, bias) -> y`` for a oneDNN-prepacked float32 weight, or None: the same call as
    ``torch.ops.mkldnn._linear_pointwise`` (its reference), made from C++."""
    return _kernel("PackedLinear", packed_weight)


def panel_linear_kernel(panels: torch.Tensor, out_features: int):
    """A native callable ``(x (..., K) float32, bias) -> y (..., N)`` for a weight packed by
    :func:`~.layouts.pack_panels`, or None: the op ``panel_linear`` bound to one layer."""
    return _kernel("PanelLinear", panels, out_features)


def panel_int8_linear_kernel(panels: torch.Tensor, scales: torch.Tensor, out_features: int):
    """A native callable ``(x (..., K) float32, bias) -> y (..., N)`` for an int8 weight packed by
    :func:`~.layouts.pack_panels` with its per-output scales padded to whole panels, or None: the op
    ``panel_int8_linear`` bound to one layer."""
    return _kernel("PanelInt8Linear", panels, scales, out_features)


def amx_int8_linear_kernel(packed: torch.Tensor, scales: torch.Tensor, out_features: int, in_features: int):
    """A native callable ``(x (..., K) float32, bias) -> y (..., N)`` for an int8 weight packed by
    :func:`~.layouts.pack_amx` with its per-output scales padded to whole strips, or None: the op
    ``amx_int8_linear`` bound to one layer."""
    return _kernel("AmxInt8Linear", packed, scales, out_features, in_features)


def panel_isa() -> int:
    """The vector code the panel kernel runs here: 2 AVX-512, 1 AVX2 + FMA, 0 none or no native kernels."""
    module = load()
    return int(module.panel_isa()) if module is not None else 0


def panel_available() -> bool:
    """Whether the panel kernel runs here with vector code (native kernels built; x86 with AVX2 or AVX-512).
    Both its users (PackedLinear for float32, Int8Linear for int8) pick it only then."""
    return panel_isa() >= 1


def amx_available() -> bool:
    """Whether the AMX int8 kernel runs here (native kernels built; an x86 CPU with AMX-INT8, Intel
    Sapphire Rapids or later, on an OS that lets this process use it)."""
    module = load()
    return module is not None and int(module.amx_isa()) >= 1


def gelu_available() -> bool:
    """Whether the native tanh GELU runs here with vector code (native kernels built; AVX2 or AVX-512)."""
    module = load()
    return module is not None and int(module.gelu_isa()) >= 1


__all__ = ["OPS", "Op", "native_op", "extension_constant", "enabled", "panel_isa", "panel_available",
           "amx_available", "gelu_available", "fbgemm_int8_linear_kernel", "onednn_linear_kernel",
           "panel_linear_kernel", "panel_int8_linear_kernel", "amx_int8_linear_kernel"]
