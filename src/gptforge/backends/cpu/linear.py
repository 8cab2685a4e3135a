"""Prepacked float32 CPU linear layers: :class:`PackedLinear`, swapped in by :func:`prepack_linears`.

:func:`gptforge.backends.prepare_for_inference` swaps them in on CPU in float32: every ``nn.Linear`` left
after quantization becomes a :class:`PackedLinear`, whose weight is reordered once for a kernel made for
decode sizes. At 1-16 rows, MKL's ``sgemv``/``sgemm`` behind ``F.linear`` takes slow small-M paths and
gives other bits for other row counts; a packed layer splits the outputs over all cores and gives each row
the same bits whatever rows share the call.

The kernel, by what this machine has:

- ``"panel"`` (x86 with AVX2 or AVX-512, when the native kernels could be built): gptforge's own. The
  weight is stored in panels of 64 outputs, ``(ceil(N / 64), K, 64)``; each output is one fused
  multiply-add chain over ``k = 0 .. K-1`` in order, so its bits do not depend on the row count, the
  thread count or the instruction set, by construction. On the Intel Xeon CI machine the 49 linear layers
  of a GPT-2 124M decode step run 1.2-1.4x faster than on oneDNN at 1-32 rows, and faster than MKL at
  every row count (benchmarks/panel_kernel.py); on an AMD Zen 3 (AVX2 only) about as fast as oneDNN at
  4-8 rows, 1.15-1.25x faster at 16-32, and 0.8x at 1 row.
- ``"onednn"`` elsewhere: oneDNN's blocked layout and inner product (the path ``torch.compile`` takes on
  CPU with weight freezing), whose reduction order was measured not to depend on the row count.
  ``batch_size=1`` picks its matrix-vector layout: 5-15% faster at batch 1, slower for batches, and it
  rounds one row differently from many, so the CLI and the server keep the general layout.

A packed layer keeps no dense copy of its weight; ``layer.weight`` rebuilds one on demand (for
inspection and ``state_dict``), so memory stays the same except for the tied LM head, whose packed copy
sits next to the token embedding (the embedding needs row lookups, which a packed layout cannot give).
The packed kernels have no backward: prepare only models that will not be trained. Inputs they cannot
take (another device or dtype, or one that needs a gradient) fall back to ``F.linear`` on the unpacked
weight, with one warning.
"""

from __future__ import annotations

import copy
import logging
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...errors import ConfigError
from ...model.sampling import draw_from_logits
from .layouts import pack_panels, unpack_panels
from .ops import onednn_linear_kernel, panel_available, panel_linear_kernel
from .screen import ArgmaxScreen

log = logging.getLogger(__name__)


def onednn_available() -> bool:
    """Whether this PyTorch build has oneDNN's prepacked linear kernels."""
    return (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def prepack_available() -> bool:
    """Whether float32 CPU linears can be prepacked here (the panel kernel or oneDNN)."""
    return panel_available() or onednn_available()


KERNELS = ("auto", "panel", "onednn")
class PackedLinear(nn.Module):
    """An inference-only float32 CPU ``nn.Linear`` whose weight lives in a prepacked layout.

    ``kernel``: ``"panel"`` (gptforge's, batch-invariant by construction), ``"onednn"``, or ``"auto"`` (the
    default: panel where it has vector code, else oneDNN); see the module docstring. The one used is in
    ``self.kernel``. ``batch_size`` is a layout hint that only oneDNN uses.
    """

    def __init__(self, linear: nn.Linear, batch_size: Optional[int] = None, kernel: str = "auto"):
        super().__init__()
        if kernel not in KERNELS:
            raise ConfigError(f"PackedLinear kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
        if kernel == "panel" and not panel_available():
            raise ConfigError("the panel kernel needs gptforge's native kernels built on an x86 CPU with AVX2")
        if kernel == "onednn" and not onednn_available():
            raise ConfigError("this PyTorch build has no oneDNN prepacked linears")
        weight = linear.weight.detach()
        if weight.device.type != "cpu" or weight.dtype != torch.float32:
            raise ConfigError(f"PackedLinear needs a float32 CPU weight, got {weight.dtype} on {weight.device}")
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        # oneDNN's layout depends on the expected number of rows: with 1 it is a matrix-vector layout
        # (5-15% faster at batch 1, slower at 8 or more); None is the general one.
        self.batch_size = batch_size
        self.requested_kernel = kernel  # what was asked; self.kernel is what runs (set by _set_weight)
        self.screened = False  # whether argmax() keeps an ArgmaxScreen (see enable_argmax_screen)
        # Not a buffer: module.to() must not try to move a packed layout.
        self._set_weight(weight)
        if linear.bias is not None:
            self.register_buffer("bias", linear.bias.detach().clone())
        else:
            self.bias = None
        self._warned = False
        self.train(linear.training)

    def _set_weight(self, weight: torch.Tensor) -> None:
        """Pack a dense (out_features, in_features) float32 weight for the best kernel here."""
        weight = weight.detach().to("cpu", torch.float32).contiguous()
        wanted = self.requested_kernel
        if wanted == "panel" or (wanted == "auto" and panel_available()):
            panels = pack_panels(weight)
            kernel = panel_linear_kernel(panels, self.out_features)
            if kernel is not None:
                self.kernel, self._packed, self._native = "panel", panels, kernel
                self._screen = None
                if self.__dict__.get("screened"):
                    self._build_screen()
                return
            if wanted == "panel":
                raise ConfigError("gptforge's native panel kernel refused the layer (see the warning above)")
        if not onednn_available():
            raise ConfigError("PackedLinear needs gptforge's native kernels or a PyTorch build with oneDNN")
        self.kernel = "onednn"
        self._screen = None
        hint = () if self.batch_size is None else (self.batch_size,)
        self._packed = torch.ops.mkldnn._reorder_linear_weight(weight, *hint)
        # The same oneDNN call made from C++ (the native kernels): ~20 us less per call than from Python.
        self._native = onednn_linear_kernel(self._packed)

    def enable_argmax_screen(self, dense: Optional[torch.Tensor] = None) -> bool:
        """Keep an :class:`ArgmaxScreen` (an int8 copy of the weight, a quarter of its bytes), so that
        :meth:`argmax` reads it instead of the whole weight; True when it could (the panel kernel, no
        bias, finite weights). Rebuilt whenever the weight is set again. ``prepare_for_inference`` asks
        this of the LM head. ``dense``: the same weight as a dense (N, K) tensor that stays (a tied token
        embedding), which the screen then reads candidates' rows from; checked equal, else ignored."""
        if self.kernel != "panel" or self._buffers.get("bias") is not None:
            return False
        self.screened = True
        self.__dict__["_screen_dense"] = dense  # a plain attribute: not registered as this module's parameter
        self._build_screen()
        return self.screened

    def _build_screen(self) -> None:
        try:
            self._screen = ArgmaxScreen(self._packed, self.out_features, self.__dict__.get("_screen_dense"))
        except ConfigError as exc:
            log.warning("no argmax screen for this layer: %s", exc)
            self.screened, self._screen = False, None

    def argmax(self, x: torch.Tensor, suppress: Optional[int] = None) -> torch.Tensor:
        """``self(x).argmax(-1)`` for ``x`` (M, in_features), the same indices (ties: the first), through the
        argmax screen when it is on and ``x`` is a float32 CPU tensor. ``suppress``: an output that must
        not win, as if set to -inf first."""
        screen = self.__dict__.get("_screen")
        if screen is not None and x.device.type == "cpu" and x.dtype == torch.float32 and not x.requires_grad:
            return screen(x, self.forward, suppress)
        return ArgmaxScreen._full_argmax(self.forward(x), suppress)

    def sample(self, x: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor,
               suppress: torch.Tensor) -> torch.Tensor:
        """One draw a row from ``softmax(self(x) / temperature)``, (M,), through the screen when it is on
        (:meth:`ArgmaxScreen.sample`: without computing the outputs), else from the outputs. ``temperature``
        (M,) float64 > 0; ``seeds`` (M,) int64: each row's draw depends on its seed and its own input alone;
        ``suppress`` (M,) int64: an output a row must not draw (-1: none)."""
        screen = self.__dict__.get("_screen")
        if screen is not None and x.device.type == "cpu" and x.dtype == torch.float32 and not x.requires_grad:
            return screen.sample(x, self.forward, temperature, seeds, suppress)
        return draw_from_logits(self.forward(x), temperature, seeds, suppress)

    @property
    def weight(self) -> torch.Tensor:
        """The dense (out_features, in_features) weight, rebuilt from the packed one (a copy)."""
        if self.kernel == "panel":
            return unpack_panels(self._packed, self.out_features)
        return self._packed.to_dense()

    def native_decode_kernel(self):
        """(C++ kernel, bias) that forward calls for float32 CPU input, or None: what the one-call decode
        step (:class:`~.layers.FusedDecodeBlocks`) runs instead of this module."""
        native = self.__dict__.get("_native")
        return None if native is None else (native, self._float32_bias())

    def _float32_bias(self) -> Optional[torch.Tensor]:
        bias = self._buffers.get("bias")  # not self.bias: nn.Module.__getattr__ is slow (every decode step)
        return bias if bias is None or bias.dtype == torch.float32 else bias.float()

    @property
    def batch_invariant(self) -> bool:
        """Whether each row gets the same bits whatever the number of rows (see linears_batch_invariant)."""
        return self.kernel == "panel" or self.batch_size is None

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, kernel={self.kernel}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dtype == torch.float32 and not (torch.is_grad_enabled() and x.requires_grad):
            offer = self.native_decode_kernel()
            if offer is not None:
                kernel, bias = offer
                return kernel(x, bias)
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, self._float32_bias(), "none", [], "")
        if not self._warned:
            log.warning("prepacked linear got %s input on %s%s; using the slower unpacked path", x.dtype,
                        x.device, " that needs a gradient" if x.requires_grad else "")
            self._warned = True
        bias = None if self.bias is None else self.bias.to(x.device, x.dtype)
        return F.linear(x, self.weight.to(x.device, x.dtype), bias)

    def __deepcopy__(self, memo):
        # The kernel object cannot be copied (nor can an opaque oneDNN tensor): copy everything else,
        # then pack a dense copy of the weight again.
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key not in ("_packed", "_native", "_screen"):  # _screen_dense: the copied model's embedding
                new.__dict__[key] = copy.deepcopy(value, memo)
        new._set_weight(self.weight)
        return new

    # torch.save(model) pickles modules: keep the dense weight, pack again on load (on the loading
    # machine's kernel).
    def __getstate__(self):
        state = {k: v for k, v in self.__dict__.items() if k not in ("_packed", "_native", "_screen")}
        state["_dense_weight"] = self.weight
        return state

    def __setstate__(self, state):
        state = dict(state)
        weight = state.pop("_dense_weight")
        super().__setstate__(state)
        self._set_weight(weight)

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
                self._set_weight(weight)
        elif strict:
            missing_keys.append(key)
        rest = {k: v for k, v in state_dict.items() if k != key}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


@torch.no_grad()
def prepack_linears(model: nn.Module, batch_size: Optional[int] = None, kernel: str = "auto") -> int:
    """Swap every float32 CPU ``nn.Linear`` for a :class:`PackedLinear`, in place; returns how many.

    ``batch_size``: the rows a decode step will mostly have, when known (1 for a single prompt); only the
    oneDNN kernel uses it. ``kernel``: see :class:`PackedLinear`.
    """
    if kernel == "auto" and not prepack_available():
        return 0
    targets = [(name, m) for name, m in model.named_modules()
               if type(m) is nn.Linear and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, PackedLinear(linear, batch_size, kernel))
    return len(targets)
