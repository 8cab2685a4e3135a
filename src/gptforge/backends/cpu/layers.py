"""The CPU decode step's swapped-in modules: the native GELU, decode attention and the fused block stack.

Each is a subclass (or a drop-in) of the model's own module that runs a native op (:mod:`.ops`) where it
applies and the model's torch code everywhere else, so a swapped model computes what it did, with the same
parameters and state-dict keys. :func:`swap_decode_layers` puts them in (``prepare_for_inference`` calls it).
"""

from __future__ import annotations

import contextlib
import math
import threading
import weakref
from typing import Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...model.gpt import MLP, Attention, Block, Blocks, CausalSelfAttention, GPT
from ...model.kv_cache import KVCache
from .ops import gelu_available, native_op


class NativeGELU(nn.Module):
    """``nn.GELU(approximate="tanh")`` (GPT-2's activation) on gptforge's native kernel for float32 CPU
    input: ``x / (1 + exp(-2u))``, the same function as ``0.5 x (1 + tanh(u))``, with its own vectorized
    exp (the op ``gelu_tanh``); within a few float32 roundings of ATen's, ~4.5x faster on 16 decode rows
    (ATen's was the largest op left in a decode step). Other input (another device or dtype, or one that
    needs a gradient) takes ``F.gelu``. ``prepare_for_inference`` swaps it in where AVX2 or AVX-512 is there, and
    the one-call decode step runs the same kernel, so both paths keep giving the same bits."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dtype == torch.float32 and not (torch.is_grad_enabled() and x.requires_grad):
            gelu = native_op("gelu_tanh")
            if gelu is not None:
                return gelu(x)
        return F.gelu(x, approximate="tanh")


def _replace(model: nn.Module, targets: list[str], make) -> int:
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(parent.get_submodule(child)))
    return len(targets)


def swap_gelu(model: nn.Module) -> int:
    """Replace every ``nn.GELU(approximate="tanh")`` with a :class:`NativeGELU`, in place, where the native
    kernel has vector code here; returns how many."""
    if not gelu_available():
        return 0
    targets = [name for name, m in model.named_modules() if type(m) is nn.GELU and m.approximate == "tanh"]
    return _replace(model, targets, lambda old: NativeGELU())


def _native_attention_fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the native decode attention takes these tensors: float32 queries on CPU, keys and values
    float32 or bfloat16, no gradient, each row's keys one contiguous block per head, as a KV cache holds
    them."""
    return not (q.device.type != "cpu" or q.dtype != torch.float32 or k.dtype not in (torch.float32, torch.bfloat16)
                or v.dtype != k.dtype
                or (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
                or k.stride(-1) != 1 or k.stride(-2) != k.shape[-1] or v.stride(-1) != 1
                or v.stride(-2) != v.shape[-1])


class NativeAttention(Attention):
    """A decode step's attention (one new token a row, a KV cache, no mask) on CPU as one native call for all
    rows and heads, each row over its own keys (``row_starts``) and computed alone, so batching leaves every
    row's result unchanged; 2-3x faster than SDPA here. Everything else: :class:`Attention`."""

    def forward(self, q, k, v, mask, kv_cache: Optional[KVCache], dropout_p: float) -> torch.Tensor:
        if kv_cache is not None and mask is None and q.shape[2] == 1 and _native_attention_fits(q, k, v):
            decode = native_op("decode_attention")
            if decode is not None:
                return decode(q, k, v, kv_cache.row_starts or [], 1.0 / math.sqrt(q.shape[-1]))
        return super().forward(q, k, v, mask, kv_cache, dropout_p)


# FusedDecodeBlocks' plan reuse (decode_session): blocks -> [open sessions, the plan gathered in them or
# _NO_PLAN]. Kept outside the module, so copying or pickling the model never meets it.
_PLAN_REUSE: "weakref.WeakKeyDictionary[nn.Module, list]" = weakref.WeakKeyDictionary()
_PLAN_LOCK = threading.Lock()
_NO_PLAN = object()


def _has_hooks() -> bool:
    """Whether global module hooks are registered (a fused decode step would skip them)."""
    from torch.nn.modules import module as module_mod

    return bool(module_mod._global_forward_hooks or module_mod._global_forward_pre_hooks)


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _native_linear(layer: nn.Module):
    """(native kernel, bias) of a layer that offers one (``native_decode_kernel``: the prepared inference
    layers, PackedLinear and Int8Linear), or None."""
    offer = getattr(layer, "native_decode_kernel", None)
    if offer is None or _hooked(layer):
        return None
    return offer()


def _plain_layer_norm(norm: nn.Module):
    """(weight, bias, eps) of an affine float32 LayerNorm over the last dimension, or None."""
    if type(norm) is not nn.LayerNorm or _hooked(norm):
        return None
    weight = norm._parameters.get("weight")
    if weight is None or weight.dtype != torch.float32 or len(norm.normalized_shape) != 1:
        return None
    return weight, norm._parameters.get("bias"), norm.eps


class FusedDecodeBlocks(Blocks):
    """The model's block stack, whose CPU decode step (one new token a row, a KV cache, no mask) runs every
    block in one native call (the op ``decode_blocks``): the same ATen ops and layer kernels as the loop,
    the same bits. It applies to float32 without gradients in evaluation mode, plain blocks whose linear
    layers have native kernels (the prepared inference layers), no prefix and no hooks; every other call
    runs the loop (:class:`Blocks`)."""

    def __init__(self, blocks: Blocks, n_head: int):
        super().__init__(blocks)
        self.n_head = n_head
        self.train(blocks.training)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor], kv_cache: Optional[KVCache]) -> torch.Tensor:
        plan = self.decode_plan(x) if kv_cache is not None and x.shape[1] == 1 and mask is None else None
        if plan is None:
            return super().forward(x, mask, kv_cache)
        decode, blocks = plan
        kv_cache.room_for(1)
        return decode(x, blocks, self.n_head, kv_cache.k, kv_cache.v, kv_cache.length, kv_cache.row_starts or [])

    def decode_plan(self, x: torch.Tensor):
        """(the native op, one tuple a block) when a decode step on ``x`` (B, 1, C) can run all blocks
        natively, else None. Within :func:`decode_session` the tuples are gathered once; the checks on
        ``x`` and on the process (device, dtype, gradients, training mode, global hooks) run every step."""
        if (x.device.type != "cpu" or x.dtype != torch.float32 or torch.is_grad_enabled() or self.training
                or x.shape[-1] % self.n_head):
            return None
        decode = native_op("decode_blocks")
        if decode is None or _has_hooks():
            return None
        reuse = _PLAN_REUSE.get(self)  # [depth, plan or _NO_PLAN], while a decode session is open
        if reuse is not None and reuse[0] > 0:
            blocks = reuse[1]
            if blocks is _NO_PLAN:
                blocks = reuse[1] = self._build_plan()
        else:
            blocks = self._build_plan()
        return None if blocks is None else (decode, blocks)

    def _build_plan(self) -> Optional[list[tuple]]:
        # Read submodules and parameters from the modules' own dicts: nn.Module.__getattr__ would cost more
        # than the whole plan (this runs every step outside a decode session).
        plan = []
        for block in self._modules.values():
            if type(block) is not Block or _hooked(block):
                return None
            parts = block._modules
            attn, mlp = parts["attn"], parts["mlp"]
            if type(attn) is not CausalSelfAttention or attn.prefix is not None or type(mlp) is not MLP:
                return None
            a, m = attn._modules, mlp._modules
            act, attend = m["act"], a["attend"]
            if (type(act) not in (nn.GELU, NativeGELU) or type(attend) not in (Attention, NativeAttention)
                    or any(_hooked(sub) for sub in (attn, mlp, act, attend, m["dropout"], a["resid_dropout"]))):
                return None
            qkv, proj, fc, out = (_native_linear(a["qkv"]), _native_linear(a["proj"]), _native_linear(m["fc"]),
                                  _native_linear(m["proj"]))
            ln_1, ln_2 = _plain_layer_norm(parts["ln_1"]), _plain_layer_norm(parts["ln_2"])
            if qkv is None or proj is None or fc is None or out is None or ln_1 is None or ln_2 is None:
                return None
            gelu = "native" if type(act) is NativeGELU else act.approximate
            plan.append((*ln_1, *qkv, *proj, *ln_2, *fc, *out, gelu))
        return plan


@contextlib.contextmanager
def _reuse_plan(blocks: FusedDecodeBlocks) -> Iterator[None]:
    with _PLAN_LOCK:
        reuse = _PLAN_REUSE.setdefault(blocks, [0, _NO_PLAN])
        reuse[0] += 1
    try:
        yield
    finally:
        with _PLAN_LOCK:
            reuse[0] -= 1
            if reuse[0] == 0:
                reuse[1] = _NO_PLAN


@contextlib.contextmanager
def decode_session(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, the fused decode step's plan (which kernels and weights each block's step runs:
    ~0.3 ms to gather on GPT-2 124M, 7% of an int8 batch-1 step) is gathered at the first step and reused.
    The generation engine and the server's scheduler decode inside one; the model must not change there
    (no module swaps, hooks on its blocks, or weights loaded again), or the steps would not see it. The
    per-step checks still run. Sessions may nest and run in several threads at once; the plan is dropped
    when the last one ends. A no-op for a model without :class:`FusedDecodeBlocks` (not prepared)."""
    with contextlib.ExitStack() as stack:
        for module in model.modules():
            if isinstance(module, FusedDecodeBlocks):
                stack.enter_context(_reuse_plan(module))
        yield model


def swap_decode_layers(model: nn.Module) -> None:
    """Give every GPT in ``model`` the native decode attention and the fused block stack, in place. The
    swapped modules decide per call whether their native op applies (and build the native kernels only
    then), so this is safe on any device."""
    attention = [name for name, m in model.named_modules() if type(m) is Attention]
    _replace(model, attention, lambda old: NativeAttention())
    for gpt in [m for m in model.modules() if isinstance(m, GPT) and type(m.blocks) is Blocks]:
        gpt.blocks = FusedDecodeBlocks(gpt.blocks, gpt.config.n_head)
