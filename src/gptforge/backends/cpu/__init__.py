"""The CPU backend: native C++ kernels for the decode step, reached only through module swaps.

- :mod:`.ops`: the one table of native ops, each with its torch reference; the per-layer kernel objects;
  what this CPU can run (``panel_available``, ``amx_available``, ``gelu_available``).
- :mod:`.layouts`: the weight layouts the kernels read (panels, AMX strips) and int8 rounding.
- :mod:`.linear`: :class:`PackedLinear`, a float32 linear on the panel kernel (or oneDNN).
- :mod:`.screen`: :class:`ArgmaxScreen`, the screened LM head's greedy and sampled tokens.
- :mod:`.layers`: :class:`NativeGELU`, :class:`NativeAttention`, :class:`FusedDecodeBlocks`.
- :mod:`.build`: building and loading the extension (``csrc/``), cached per machine.
"""

from .layers import FusedDecodeBlocks, NativeAttention, NativeGELU, decode_session, swap_decode_layers, swap_gelu
from .layouts import PANEL, pack_panels, unpack_panels
from .linear import KERNELS, PackedLinear, onednn_available, prepack_available, prepack_linears
from .ops import OPS, amx_available, gelu_available, native_op, panel_available, panel_isa
from .screen import ArgmaxScreen

__all__ = ["FusedDecodeBlocks", "NativeAttention", "NativeGELU", "decode_session", "swap_decode_layers", "swap_gelu",
           "PANEL", "pack_panels", "unpack_panels", "KERNELS", "PackedLinear", "onednn_available",
           "prepack_available", "prepack_linears", "OPS", "amx_available", "gelu_available", "native_op",
           "panel_available", "panel_isa", "ArgmaxScreen"]
