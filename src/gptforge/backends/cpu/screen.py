"""The argmax screen of a prepacked float32 LM head: greedy tokens and plain samples from an int8 copy.

:class:`ArgmaxScreen` is what makes the head of a prepared model *screened* (``lm_head.screened``): its
``argmax`` and ``sample`` give the tokens the full head would, reading about a quarter of its bytes.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from ...errors import ConfigError
from ...model.sampling import draw_from_logits
from .layouts import AMX_MAX_INPUTS, AMX_STRIP, PANEL, pack_amx, pack_panels, quantize_weight, unpack_panels
from .ops import amx_available, amx_int8_linear_kernel, native_op, panel_int8_linear_kernel

log = logging.getLogger(__name__)

_SCREEN_CHUNK = 4096  # rows per chunk when measuring the int8 copy's error (float64 temporaries)


class ArgmaxScreen:
    """The index of each row's largest output of a panel-packed float32 layer (``PackedLinear``, kernel
    ``"panel"``), exactly ``layer(x).argmax(-1)`` but reading about a quarter of the weight's bytes.

    What greedy decoding needs from the LM head is the argmax, not the 50k logits. The screen keeps an
    int8 copy of the weight (per-output scales, the ``amx`` or ``panel`` int8 kernel of
    :mod:`gptforge.backends.quant`) and, per output, the norms of the weight, of its int8 copy and of the
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
        amx = amx_available() and k <= AMX_MAX_INPUTS
        if kernel == "amx" and not amx:
            raise ConfigError("the amx kernel needs an x86 CPU with AMX-INT8 and gptforge's native kernels")
        self.kernel_name = "amx" if amx and kernel != "panel" else "panel"
        packed = pack_amx(q) if self.kernel_name == "amx" else pack_panels(q)
        width = AMX_STRIP if self.kernel_name == "amx" else PANEL
        padded = torch.zeros(packed.shape[0] * width, dtype=torch.float32)
        padded[:n] = scales
        self._int8 = (amx_int8_linear_kernel(packed, padded, n, k) if self.kernel_name == "amx"
                      else panel_int8_linear_kernel(packed, padded, n))
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
        x = x.contiguous()
        s = self._int8(x, None)  # (M, N)
        # The bound's per-row factors (from |x| and max|x|), the candidates and their float32 outputs: one
        # native call (the op screen_argmax).
        tokens, self.last_candidates = native_op("screen_argmax")(
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
        T = 1 on the demo model; more where the bounds are wide against T (csrc/screen.cpp, screen_sample).
        The uniforms come from a stream seeded by ``seeds[r]``, so a row's token depends on its own input,
        temperature, ``suppress[r]`` (an output it must not draw; -1: none) and seed alone. A row the screen
        cannot settle (a non-finite value, or ``max_tries`` rejections) is drawn from ``softmax(full(x) /
        T)`` with a generator seeded by ``seeds[r]``.
        """
        x = x.contiguous()
        s = self._int8(x, None)  # (M, N)
        tokens, self.last_proposals = native_op("screen_sample")(
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
