"""Preparing a loaded model for inference: int8 quantization and prepacked CPU weights.

``prepare_for_inference(model, quantize=None)`` is what the CLI (generate, chat) and the server run after
loading a checkpoint. It turns the model into an inference-only one, in place:

1. LoRA layers are merged into their weights (:func:`gptforge.peft.merge_lora`).
2. ``quantize="int8"``: :func:`gptforge.quant.quantize_int8` (weight-only int8 linears).
3. On CPU in float32, every remaining ``nn.Linear`` becomes a :class:`PackedLinear`, whose weight is
   reordered once for a kernel made for decode sizes. At 1-16 rows, MKL's ``sgemv``/``sgemm`` behind
   ``F.linear`` takes slow small-M paths and gives other bits for other row counts; a packed layer splits
   the outputs over all cores and gives each row the same bits whatever rows share the call.

The kernel, by what this machine has:

- ``"panel"`` (x86 with AVX2 or AVX-512, when :mod:`gptforge.native` could be built): gptforge's own. The
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

from .config import KV_CACHE_DTYPES
from .errors import ConfigError
from .model.sampling import draw_from_logits
from .native import panel_available

log = logging.getLogger(__name__)

QUANTIZE_CHOICES = (None, "int8")


def onednn_available() -> bool:
    """Whether this PyTorch build has oneDNN's prepacked linear kernels."""
    return (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def prepack_available() -> bool:
    """Whether float32 CPU linears can be prepacked here (the panel kernel or oneDNN)."""
    return panel_available() or onednn_available()


KERNELS = ("auto", "panel", "onednn")
PANEL = 64  # outputs per panel; kPanel in gptforge/native/kernels.cpp (tests/test_native.py checks)


def pack_panels(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (N, K) as the panel kernel reads it: (ceil(N / 64), K, 64), outputs zero-padded."""
    n, k = weight.shape
    panels = -(-n // PANEL)
    padded = weight.new_zeros(panels * PANEL, k)
    padded[:n] = weight
    return padded.view(panels, PANEL, k).transpose(1, 2).contiguous()


def unpack_panels(panels: torch.Tensor, out_features: int) -> torch.Tensor:
    """The (N, K) weight back from :func:`pack_panels`' layout (a new tensor)."""
    return panels.transpose(1, 2).reshape(-1, panels.shape[1])[:out_features].clone()


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
        from . import native

        weight = weight.detach().to("cpu", torch.float32).contiguous()
        wanted = self.requested_kernel
        if wanted == "panel" or (wanted == "auto" and panel_available()):
            panels = pack_panels(weight)
            kernel = native.panel_linear(panels, self.out_features)
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
        # The same oneDNN call made from C++ (gptforge.native): ~20 us less per call than from Python.
        self._native = native.packed_linear(self._packed)

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
        """(C++ kernel, bias) that forward calls for float32 CPU input, or None: what GPT's one-call decode
        step (gptforge.model.gpt) runs instead of this module."""
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


_SCREEN_CHUNK = 4096  # rows per chunk when measuring the int8 copy's error (float64 temporaries)


class ArgmaxScreen:
    """The index of each row's largest output of a panel-packed float32 layer (``PackedLinear``, kernel
    ``"panel"``), exactly ``layer(x).argmax(-1)`` but reading about a quarter of the weight's bytes.

    What greedy decoding needs from the LM head is the argmax, not the 50k logits. The screen keeps an
    int8 copy of the weight (per-output scales, the ``amx`` or ``panel`` int8 kernel of
    :mod:`gptforge.quant`) and, per output, the norms of the weight, of its int8 copy and of the
    difference. For a row ``x`` it computes the int8 outputs ``s_v`` and a bound ``b_v`` with
    ``|s_v - l_v| <= b_v`` for the float32 output ``l_v`` the layer would give, from Cauchy-Schwarz:

        |s_v - l_v| <= |x| |w~_v - w_v| + |x~ - x| |w~_v| + (float32 rounding of both, (2K + 16) u |x| |w_v|)

    (``w~`` the int8 copy, ``x~`` the input as the amx kernel splits it, ``|x~ - x| <= sqrt(K) max|x| /
    (127 * 500)``; 0 on the panel kernel, which does not round inputs), times 1.25. Every output whose
    upper end ``s_v + b_v`` reaches the largest lower end ``max(s_u - b_u)`` is a candidate; any output
    equal to the row's maximum ``l`` is among them. The candidates' float32 outputs are then computed by
    the panel kernel itself, over the same weights in the same order (each output is one fused
    multiply-add chain over k, wherever its panel sits), so they have the layer's bits, and the first
    largest wins, as in ``torch.argmax``. On a GPT-2 head a row keeps some tens of candidates out of
    50,257. Rows with a non-finite value, or too many candidates, take the full layer instead.
    """

    def __init__(self, panels: torch.Tensor, out_features: int, dense: Optional[torch.Tensor] = None,
                 kernel: str = "auto"):
        from . import native
        from .quant import AMX_MAX_INPUTS, AMX_STRIP, pack_amx, quantize_weight

        weight = unpack_panels(panels, out_features)  # (N, K)
        n, k = weight.shape
        if not bool(torch.isfinite(weight).all()):
            raise ConfigError("the argmax screen needs finite weights")
        if dense is not None and not (dense.dtype == torch.float32 and dense.device.type == "cpu"
                                      and dense.is_contiguous() and torch.equal(dense, weight)):
            dense = None  # not the same weight (or not usable as is): gather from the panels
        # Candidates' rows are read from `dense` (a tied embedding: one contiguous row each) when there is
        # one, else gathered from the panels (one cache line per weight: ~15 us a candidate here).
        self._dense = dense
        q, scales = quantize_weight(weight)
        if kernel not in ("auto", "amx", "panel"):
            raise ConfigError(f"the argmax screen's kernel must be auto, amx or panel, got {kernel!r}")
        amx = native.amx_available() and k <= AMX_MAX_INPUTS
        if kernel == "amx" and not amx:
            raise ConfigError("the amx kernel needs an x86 CPU with AMX-INT8 and gptforge's native kernels")
        self.kernel_name = "amx" if amx and kernel != "panel" else "panel"
        packed = pack_amx(q) if self.kernel_name == "amx" else pack_panels(q)
        width = AMX_STRIP if self.kernel_name == "amx" else PANEL
        padded = torch.zeros(packed.shape[0] * width, dtype=torch.float32)
        padded[:n] = scales
        self._int8 = (native.amx_int8_linear(packed, padded, n, k) if self.kernel_name == "amx"
                      else native.panel_int8_linear(packed, padded, n))
        if self._int8 is None:
            raise ConfigError("gptforge's native int8 kernel refused the argmax screen (see the warning above)")
        # Per output: |w~ - w| (int8 error) and |w| (exact, float64), rounded up into float32.
        err = torch.empty(n, dtype=torch.float64)
        norm = torch.empty(n, dtype=torch.float64)
        for start in range(0, n, _SCREEN_CHUNK):
            w = weight[start:start + _SCREEN_CHUNK].double()
            approx = q[start:start + _SCREEN_CHUNK].double() * scales[start:start + _SCREEN_CHUNK].double()[:, None]
            err[start:start + _SCREEN_CHUNK] = (approx - w).norm(dim=1)
            norm[start:start + _SCREEN_CHUNK] = w.norm(dim=1)
        self._err = (err * (1 + 1e-6)).float()
        self._norm = (norm * (1 + 1e-6)).float()
        self._err_max, self._norm_max = float(self._err.max()), float(self._norm.max())
        # What a call reads besides the few candidates' rows: the int8 copy, its scales, the two norms.
        self.nbytes = packed.numel() + 3 * 4 * n
        self._panels = panels
        self.out_features, self.in_features = n, k
        self.max_candidates = max(64, n // 16)
        # Proposals a row may draw in sample() before the full layer decides it (~2 us each). Where the bounds
        # are wide against the temperature (T -> 0) nearly every proposal is rejected, and the full layer
        # should take over soon; at the usual acceptance rates (0.5 or more) 64 all fail once in 1e19.
        self.max_tries = 64
        self.isa = -1  # the row scans' vector code: -1 the best here, 1 AVX2 at most, 0 the scalar code (tests)
        self.last_candidates = 0  # candidates of the last call (all rows together), for benchmarks and logs
        self.last_proposals = 0  # proposals of the last sample() call (all rows together)

    def __call__(self, x: torch.Tensor, full, suppress: Optional[int] = None) -> torch.Tensor:
        """Each row's argmax, (M,), for ``x`` (M, K) float32; ``full(x)`` gives the layer's outputs (the
        fallback). ``suppress``: an output that must not win (end-of-text before ``min_new_tokens``), as if
        set to -inf first."""
        from . import native

        x = x.contiguous()
        s = self._int8(x, None)  # (M, N)
        # The bound's per-row factors (from |x| and max|x|), the candidates and their float32 outputs: one
        # native call (kernels.cpp, screen_argmax).
        tokens, self.last_candidates = native.load().screen_argmax(
            x, s, self._err, self._norm, self._err_max, self._norm_max, self.kernel_name == "amx",
            -1 if suppress is None else suppress, self._panels, self._dense, self.max_candidates, self.isa)
        if tokens.numel() == 0:  # a non-finite value, or too many candidates
            log.debug("argmax screen: %d candidates; computing the full layer", self.last_candidates)
            return self._full_argmax(full(x), suppress)
        return tokens

    def sample(self, x: torch.Tensor, full, temperature: torch.Tensor, seeds: torch.Tensor,
               suppress: torch.Tensor) -> torch.Tensor:
        """A draw from ``softmax(l / temperature)`` for each row of the layer's float32 outputs ``l``, (M,),
        without computing ``l``: rejection sampling from the screen's upper ends ``u = s + b >= l``.

        A row proposes ``v`` with probability proportional to ``exp((u_v - max u) / T)``, computes the
        layer's own float32 output ``l_v`` for it (one row of the weight), and accepts it with probability
        ``exp((l_v - u_v) / T)``; so an accepted token has probability proportional to ``exp(l_v / T)``:
        the softmax, exactly (up to float rounding, as any softmax). A few proposals a row: about 1.1 at
        T = 1 on the demo model; more where the bounds are wide against T (kernels.cpp, screen_sample).
        The uniforms come from a stream seeded by ``seeds[r]``, so a row's token depends on its own input,
        temperature, ``suppress[r]`` (an output it must not draw; -1: none) and seed alone. A row the screen
        cannot settle (a non-finite value, or ``max_tries`` rejections) is drawn from ``softmax(full(x) /
        T)`` with a generator seeded by ``seeds[r]``.
        """
        from . import native

        x = x.contiguous()
        s = self._int8(x, None)  # (M, N)
        tokens, self.last_proposals = native.load().screen_sample(
            x, s, self._err, self._norm, self.kernel_name == "amx", suppress.contiguous(), self._panels,
            self._dense, temperature.contiguous(), seeds.contiguous(), self.max_tries, self.isa)
        missing = (tokens < 0).nonzero().flatten()
        if missing.numel():
            log.debug("argmax screen: %d rows sampled from the full layer", missing.numel())
            tokens[missing] = draw_from_logits(full(x[missing]), temperature[missing], seeds[missing],
                                               suppress[missing])
        return tokens

    @staticmethod
    def _full_argmax(logits: torch.Tensor, suppress: Optional[int]) -> torch.Tensor:
        if suppress is not None:
            logits[:, suppress] = float("-inf")
        return logits.argmax(dim=1)


class NativeGELU(nn.Module):
    """``nn.GELU(approximate="tanh")`` (GPT-2's activation) on gptforge's native kernel for float32 CPU
    input: ``x / (1 + exp(-2u))``, the same function as ``0.5 x (1 + tanh(u))``, with its own vectorized
    exp (kernels.cpp, ``gelu_tanh``); within a few float32 roundings of ATen's, ~4.5x faster on 16 decode rows
    (ATen's was the largest op left in a decode step). Other input (another device or dtype, or one that
    needs a gradient) takes ``F.gelu``. ``prepare_for_inference`` swaps it in where AVX2 or AVX-512 is there, and
    the one-call decode step runs the same kernel, so both paths keep giving the same bits."""

    native_gelu = True  # what GPT's decode plan looks for

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dtype == torch.float32 and not (torch.is_grad_enabled() and x.requires_grad):
            from . import native

            module = native.load()
            if module is not None:
                return module.gelu_tanh(x)
        return F.gelu(x, approximate="tanh")


def swap_gelu(model: nn.Module) -> int:
    """Replace every ``nn.GELU(approximate="tanh")`` with a :class:`NativeGELU`, in place, where the native
    kernel has vector code here; returns how many."""
    from .native import gelu_available

    if not gelu_available():
        return 0
    targets = [name for name, m in model.named_modules() if type(m) is nn.GELU and m.approximate == "tanh"]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, NativeGELU())
    return len(targets)


def linears_batch_invariant(model: nn.Module) -> bool:
    """Whether every linear layer of ``model`` gives each row the same bits whatever the number of rows.

    True for :class:`PackedLinear` on the panel kernel (by construction) or on oneDNN in the general
    layout (oneDNN reduces over K in a fixed order for any row count; not with ``batch_size=1``, whose
    single rows take a matrix-vector kernel), and for int8 layers on the amx or panel kernel (by
    construction) or on fbgemm (exact integer products; the pinned row fixes the input scale). False as
    soon as one plain ``nn.Linear`` remains: BLAS picks other kernels for other row counts.
    """
    from .peft.lora import LoRALinear
    from .quant import Int8Linear

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

    The model is left in eval mode and is inference-only afterwards (see the module docstring).
    """
    if quantize not in QUANTIZE_CHOICES:
        raise ConfigError(f"quantize must be int8 or None, got {quantize!r}")
    cache_dtype = kv_cache_dtype_of(kv_cache_dtype)
    from .model import GPT

    for module in model.modules():
        if isinstance(module, GPT):
            module.kv_cache_dtype = cache_dtype
    from .peft.lora import LoRALinear, merge_lora

    if any(isinstance(m, LoRALinear) for m in model.modules()):
        # Fold LoRA updates into their weights first: one matrix product a layer instead of three, and
        # int8 / prepacking then apply to the real weights rather than to the low-rank factors.
        merge_lora(model)
    if quantize == "int8":
        from .quant import quantize_int8

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
                from . import native

                isa = " (AVX-512)" if native.panel_isa() >= 2 else " (AVX2)"
            log.info("prepacked %d float32 linear layers for the %s kernel%s", n, kernel, isa)
        if argmax_screen:
            for module in model.modules():
                head = getattr(module, "lm_head", None) if isinstance(module, GPT) else None
                dense = module.wte.weight if module in tied else None
                if isinstance(head, PackedLinear) and not head.screened and head.enable_argmax_screen(dense):
                    log.info("greedy decoding reads the LM head's int8 argmax screen (%s kernel)",
                             head._screen.kernel_name)
    model.eval()  # last: the swapped-in layers are new modules
    return model
