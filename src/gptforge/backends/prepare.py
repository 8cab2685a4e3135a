"""Preparing a loaded model for inference: the module swaps of the backends, applied in one call.

``prepare_for_inference(model, quantize=None)`` is what the CLI (generate, chat) and the server run after
loading a checkpoint. It turns the model into an inference-only one, in place:

1. LoRA layers are merged into their weights (:func:`gptforge.peft.merge_lora`).
2. ``quantize="int8"``: :func:`gptforge.backends.quant.quantize_int8` (weight-only int8 linears).
3. On CPU in float32, every remaining ``nn.Linear`` becomes a
   :class:`~gptforge.backends.cpu.PackedLinear` (a weight prepacked for a kernel made for decode sizes),
   GPT-2's tanh GELU the native one, and the LM head keeps an argmax screen.
4. The attention and the block stack of every GPT become the CPU backend's (native decode attention, the
   whole decode step in one native call), which fall back to the model's own code wherever they do not apply.

The packed kernels have no backward: prepare only models that will not be trained. Inputs they cannot
take (another device or dtype, or one that needs a gradient) fall back to ``F.linear`` on the unpacked
weight, with one warning.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn as nn

from ..config import KV_CACHE_DTYPES
from ..errors import ConfigError
from ..model import GPT
from ..peft.lora import LoRALinear, merge_lora
from .cpu.layers import swap_decode_layers, swap_gelu
from .cpu.linear import PackedLinear, prepack_linears
from .cpu.ops import panel_isa
from .quant import Int8Linear, quantize_int8

log = logging.getLogger(__name__)

QUANTIZE_CHOICES = (None, "int8")


def linears_batch_invariant(model: nn.Module) -> bool:
    """Whether every linear layer of ``model`` gives each row the same bits whatever the number of rows.

    True for :class:`PackedLinear` on the panel kernel (by construction) or on oneDNN in the general
    layout (oneDNN reduces over K in a fixed order for any row count; not with ``batch_size=1``, whose
    single rows take a matrix-vector kernel), and for int8 layers on the amx or panel kernel (by
    construction) or on fbgemm (exact integer products; the pinned row fixes the input scale). False as
    soon as one plain ``nn.Linear`` remains: BLAS picks other kernels for other row counts.
    """
    found = False
    for module in model.modules():
        if type(module) is nn.Linear or isinstance(module, LoRALinear):  # LoRA's main product is F.linear
            return False
        if isinstance(module, Int8Linear):
            if module.resolved_kernel(module.weight.device) not in ("amx", "fbgemm", "panel"):
                return False
            found = True
        elif isinstance(module, PackedLinear):
            if not module.batch_invariant:
                return False
            found = True
    return found


def kv_cache_dtype_of(name: Optional[str]) -> Optional[torch.dtype]:
    """``"auto"``/None (the weights' dtype) or ``"bfloat16"`` (:data:`gptforge.config.KV_CACHE_DTYPES`) as
    the KV cache dtype; anything else is a :class:`~gptforge.errors.ConfigError`."""
    if name is None or name == "auto":
        return None
    if name not in KV_CACHE_DTYPES:
        raise ConfigError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {name!r}")
    return getattr(torch, name)


def prepare_for_inference(model: nn.Module, *, quantize: Optional[str] = None, prepack: bool = True,
                          batch_size: Optional[int] = None, kv_cache_dtype: Optional[str] = None,
                          argmax_screen: bool = True) -> nn.Module:
    """Quantize (``"int8"`` or None), then prepack CPU float32 linears; in place, returns the model.

    ``batch_size`` tells the prepacking how many rows decoding will mostly run (1: one prompt, one
    sequence, as in a chat); None (the default) suits batches and serving. ``kv_cache_dtype``
    ``"bfloat16"`` makes the model's KV caches bfloat16 (:attr:`gptforge.model.GPT.kv_cache_dtype`): half
    the memory and half the bytes a decode step's attention reads, keys and values rounded to 8
    significant bits; ``"auto"`` or None keeps the weights' dtype. Under float32 weights only the native
    CPU decode step reads a bfloat16 cache directly; elsewhere (GPUs, ``GPTFORGE_NATIVE=0``) attention
    converts the cached prefix every step, which saves memory but not time.

    ``argmax_screen`` (on by default): a prepacked float32 LM head also keeps an int8 copy of itself
    (:class:`ArgmaxScreen`, a quarter of its size) from which greedy decoding finds each row's argmax
    with the same result as the full head, reading a quarter of its bytes (GPT-2's head is 31% of a
    decode step's weights). Sampling, penalties and log-probabilities still read the full head.

    Then the native decode attention and the fused decode stack are swapped in
    (:func:`gptforge.backends.cpu.swap_decode_layers`); they apply per call, where their op can run.

    The model is left in eval mode and is inference-only afterwards (see the module docstring).
    """
    if quantize not in QUANTIZE_CHOICES:
        raise ConfigError(f"quantize must be int8 or None, got {quantize!r}")
    cache_dtype = kv_cache_dtype_of(kv_cache_dtype)
    for module in model.modules():
        if isinstance(module, GPT):
            module.kv_cache_dtype = cache_dtype
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        # Fold LoRA updates into their weights first: one matrix product a layer instead of three, and
        # int8 / prepacking then apply to the real weights rather than to the low-rank factors.
        merge_lora(model)
    if quantize == "int8":
        quantize_int8(model)
    # Heads tied to their token embedding: the screen reads candidates' rows from the embedding.
    tied = {m for m in model.modules() if isinstance(m, GPT) and m.lm_head.weight is m.wte.weight}
    if prepack:
        swap_gelu(model)
        n = prepack_linears(model, batch_size)
        if n:
            kernel = next(m.kernel for m in model.modules() if isinstance(m, PackedLinear))
            isa = ""
            if kernel == "panel":
                isa = " (AVX-512)" if panel_isa() >= 2 else " (AVX2)"
            log.info("prepacked %d float32 linear layers for the %s kernel%s", n, kernel, isa)
        if argmax_screen:
            for module in model.modules():
                head = getattr(module, "lm_head", None) if isinstance(module, GPT) else None
                dense = module.wte.weight if module in tied else None
                if isinstance(head, PackedLinear) and not head.screened and head.enable_argmax_screen(dense):
                    log.info("greedy decoding reads the LM head's int8 argmax screen (%s kernel)",
                             head._screen.kernel_name)
    swap_decode_layers(model)
    model.eval()  # last: the swapped-in layers are new modules
    return model
