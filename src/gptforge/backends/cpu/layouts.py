"""The weight layouts the native kernels read, and the int8 rounding of a weight.

Pure torch, shared by the float32 packed layers (:mod:`.linear`), the argmax screen (:mod:`.screen`) and
int8 quantization (:mod:`gptforge.backends.quant`). The constants equal the extension's (``PANEL``,
``AMX_STRIP``, ``AMX_DEPTH``; tests/backends/cpu/test_native.py checks).
"""

from __future__ import annotations

import torch

PANEL = 64  # outputs per panel; kPanel in csrc/kernels.h
AMX_STRIP = 16  # outputs per strip of the amx kernel's weight layout (kAmxOut in csrc/kernels.h)
AMX_DEPTH = 64  # inputs per amx tile step, K padded to a multiple (kAmxDepth in csrc/kernels.h)
AMX_MAX_INPUTS = 131072  # beyond it the amx kernel's int32 sums could overflow (K x 127 x 127 >= 2^31)
_QMAX = 127  # symmetric int8; -128 is never used, so fbgemm's 16-bit pair sums cannot saturate


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (N, K) float → int8 (N, K) and float32 scales (N,)."""
    w = weight.detach().float()
    absmax = w.abs().amax(dim=1)
    scales = torch.where(absmax > 0, absmax / _QMAX, torch.ones_like(absmax))
    q = torch.round(w / scales.unsqueeze(1)).clamp_(-_QMAX, _QMAX).to(torch.int8)
    return q, scales


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


def pack_amx(weight: torch.Tensor) -> torch.Tensor:
    """An int8 (N, K) weight in the amx kernel's layout: (ceil(N / 16), Kp / 4, 64) int8, Kp = K rounded up
    to 64, zero-padded; strip s, k-group g holds ``weight[16 s + j, 4 g + b]`` at ``[s, g, 4 j + b]`` (the
    B-tile layout of Intel AMX, so one strip's 64 inputs are 1 KB of contiguous bytes)."""
    n, k = weight.shape
    np_, kp = -(-n // AMX_STRIP) * AMX_STRIP, -(-k // AMX_DEPTH) * AMX_DEPTH
    w = torch.zeros(np_, kp, dtype=torch.int8)
    w[:n, :k] = weight.detach().cpu()
    return w.view(np_ // AMX_STRIP, AMX_STRIP, kp // 4, 4).permute(0, 2, 1, 3).reshape(
        np_ // AMX_STRIP, kp // 4, 4 * AMX_STRIP).contiguous()


def unpack_amx(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The (N, K) int8 weight that :func:`pack_amx` packed."""
    strips, groups, _ = packed.shape
    w = packed.view(strips, groups, AMX_STRIP, 4).permute(0, 2, 1, 3).reshape(strips * AMX_STRIP, groups * 4)
    return w[:out_features, :in_features]
