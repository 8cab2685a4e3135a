"""Preparing a loaded model for inference: int8 quantization and prepacked CPU weights.

``prepare_for_inference(model, quantize=None)`` is what the CLI (generate, chat) and the server run after
loading a checkpoint. It turns the model into an inference-only one, in place:

1. LoRA layers are merged into their weights (:func:`gptforge.peft.merge_lora`).
2. ``quantize="int8"``: :func:`gptforge.quant.quantize_int8` (weight-only int8 linears).
3. On CPU in float32, every remaining ``nn.Linear`` becomes a :class:`PackedLinear`: the weight is
   reordered once into oneDNN's blocked layout and multiplied with oneDNN's inner-product kernel (the
   path ``torch.compile`` takes on CPU with weight freezing). At decode sizes this matters a lot: for
   1-16 rows, MKL's ``sgemv``/``sgemm`` behind ``F.linear`` runs on one of the two cores and on a slow
   small-M path, while the prepacked kernel splits the output over all cores. A GPT-2 124M decode step
   spends about 35% less time in its linear layers at batch 1 and 40-50% less at batch 8 (see
   benchmarks/README.md, "Decoding").

The layout can be tuned to the rows a step will have: ``batch_size=1`` picks oneDNN's matrix-vector
layout, 5-15% faster at batch 1 and slower for batches, and it rounds differently from the general
layout. The CLI and the server keep the general layout (the default), so that `generate`, `chat` and the
server give the same bits for the same prompt; pass ``batch_size=1`` yourself for single-stream decoding.

A packed layer keeps no dense copy of its weight; ``layer.weight`` rebuilds one on demand (for
inspection and ``state_dict``), so memory stays the same except for the tied LM head, whose packed copy
sits next to the token embedding (the embedding needs row lookups, which a blocked layout cannot give).
Each packed layer calls oneDNN from C++ when :mod:`gptforge.native` could be built (the same call, ~20 us
less per layer than through ``torch.ops`` from Python).
The packed kernel has no backward: prepare only models that will not be trained. Inputs it cannot take
(another device or dtype) fall back to ``F.linear`` on the unpacked weight, with one warning.
"""

from __future__ import annotations

import copy
import logging
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import ConfigError

log = logging.getLogger(__name__)

QUANTIZE_CHOICES = (None, "int8")


def prepack_available() -> bool:
    """Whether this PyTorch build has oneDNN's prepacked linear kernels."""
    return (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class PackedLinear(nn.Module):
    """An inference-only float32 CPU ``nn.Linear`` whose weight lives in oneDNN's prepacked layout."""

    def __init__(self, linear: nn.Linear, batch_size: Optional[int] = None):
        super().__init__()
        weight = linear.weight.detach()
        if weight.device.type != "cpu" or weight.dtype != torch.float32:
            raise ConfigError(f"PackedLinear needs a float32 CPU weight, got {weight.dtype} on {weight.device}")
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        # The layout oneDNN picks depends on the expected number of rows: with 1 it is a matrix-vector
        # layout (5-15% faster at batch 1, slower at 8 or more); None is the general one.
        self.batch_size = batch_size
        # Not a buffer: module.to() must not try to move an opaque oneDNN tensor.
        self._set_packed(_pack(weight, batch_size))
        if linear.bias is not None:
            self.register_buffer("bias", linear.bias.detach().clone())
        else:
            self.bias = None
        self._warned = False
        self.train(linear.training)

    def _set_packed(self, packed: torch.Tensor) -> None:
        from . import native

        self._packed = packed
        # The same oneDNN call made from C++ (gptforge.native): ~20 us less per call from Python.
        self._native = native.packed_linear(packed)

    @property
    def weight(self) -> torch.Tensor:
        """The dense (out_features, in_features) weight, rebuilt from the packed one (a copy)."""
        return self._packed.to_dense()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dtype == torch.float32 and not (torch.is_grad_enabled() and x.requires_grad):
            bias = self.bias if self.bias is None or self.bias.dtype == torch.float32 else self.bias.float()
            if self._native is not None:
                return self._native(x, bias)
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, bias, "none", [], "")
        if not self._warned:
            log.warning("prepacked linear got %s input on %s; using the slower unpacked path", x.dtype, x.device)
            self._warned = True
        bias = None if self.bias is None else self.bias.to(x.device, x.dtype)
        return F.linear(x, self.weight.to(x.device, x.dtype), bias)

    def __deepcopy__(self, memo):
        # An opaque oneDNN tensor has no storage to copy: copy everything else, then repack a dense copy.
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key not in ("_packed", "_native"):
                new.__dict__[key] = copy.deepcopy(value, memo)
        new._set_packed(_pack(self._packed.to_dense(), self.batch_size))
        return new

    # state_dict holds the dense weight, so a prepared model still saves and loads like a plain one.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        if key in state_dict:
            weight = state_dict[key]
            if tuple(weight.shape) != (self.out_features, self.in_features):
                error_msgs.append(f"size mismatch for {key}: got {tuple(weight.shape)}, expected "
                                  f"{(self.out_features, self.in_features)}")
            else:
                self._set_packed(_pack(weight.detach().float().cpu(), self.batch_size))
        elif strict:
            missing_keys.append(key)
        rest = {k: v for k, v in state_dict.items() if k != key}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def linears_batch_invariant(model: nn.Module) -> bool:
    """Whether every linear layer of ``model`` gives each row the same bits whatever the number of rows.

    True for :class:`PackedLinear` in the general layout (oneDNN reduces over K in a fixed order for any
    row count; not with ``batch_size=1``, whose single rows take a matrix-vector kernel) and for
    int8 layers on the fbgemm kernel (exact integer products; the pinned row fixes the input scale).
    False as soon as one plain ``nn.Linear`` remains: BLAS picks other kernels for other row counts.
    """
    from .peft.lora import LoRALinear
    from .quant import Int8Linear

    found = False
    for module in model.modules():
        if type(module) is nn.Linear or isinstance(module, LoRALinear):  # LoRA's main product is F.linear
            return False
        if isinstance(module, Int8Linear):
            if module.resolved_kernel(module.weight.device) != "fbgemm":
                return False
            found = True
        elif isinstance(module, PackedLinear):
            if module.batch_size is not None:  # the batch-1 layout runs one row on another kernel than many
                return False
            found = True
    return found


def _pack(weight: torch.Tensor, batch_size: Optional[int]) -> torch.Tensor:
    hint = () if batch_size is None else (batch_size,)
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), *hint)


@torch.no_grad()
def prepack_linears(model: nn.Module, batch_size: Optional[int] = None) -> int:
    """Swap every float32 CPU ``nn.Linear`` for a :class:`PackedLinear`, in place; returns how many.

    ``batch_size``: the rows a decode step will mostly have, when known (1 for a single prompt).
    """
    if not prepack_available():
        return 0
    targets = [(name, m) for name, m in model.named_modules()
               if type(m) is nn.Linear and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, PackedLinear(linear, batch_size))
    return len(targets)


def prepare_for_inference(model: nn.Module, *, quantize: Optional[str] = None, prepack: bool = True,
                          batch_size: Optional[int] = None) -> nn.Module:
    """Quantize (``"int8"`` or None), then prepack CPU float32 linears; in place, returns the model.

    ``batch_size`` tells the prepacking how many rows decoding will mostly run (1: one prompt, one
    sequence, as in a chat); None (the default) suits batches and serving.

    The model is left in eval mode and is inference-only afterwards (see the module docstring).
    """
    if quantize not in QUANTIZE_CHOICES:
        raise ConfigError(f"quantize must be int8 or None, got {quantize!r}")
    from .peft.lora import LoRALinear, merge_lora

    if any(isinstance(m, LoRALinear) for m in model.modules()):
        # Fold LoRA updates into their weights first: one matrix product a layer instead of three, and
        # int8 / prepacking then apply to the real weights rather than to the low-rank factors.
        merge_lora(model)
    if quantize == "int8":
        from .quant import quantize_int8

        quantize_int8(model)
    if prepack:
        n = prepack_linears(model, batch_size)
        if n:
            log.debug("prepacked %d float32 Linear layers for oneDNN's CPU kernel", n)
    model.eval()  # last: the swapped-in layers are new modules
    return model
