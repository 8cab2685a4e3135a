"""Fast paths per device, as module swaps applied to a built model; the model itself knows none of them.

- :func:`prepare_for_inference` (:mod:`.prepare`): what the CLI and the server run after loading a model:
  LoRA merged, int8 if asked, then the CPU backend's layers swapped in.
- :mod:`.quant`: int8 weight-only quantization (:class:`Int8Linear`, :func:`quantize_int8`), on CPUs and GPUs.
- :mod:`.cpu`: the CPU backend: the native op table with its torch references, the swapped layers
  (packed linear, native GELU, decode attention, the fused decode stack, the screened LM head) and the
  build of its C++ extension.
- :func:`decode_session`: the context in which a prepared model's decode steps reuse what they gathered
  (the engine and the server's scheduler decode in one); a no-op for other models.
"""

from .cpu.layers import decode_session
from .prepare import QUANTIZE_CHOICES, kv_cache_dtype_of, linears_batch_invariant, prepare_for_inference
from .quant import Int8Linear, quantize_int8

__all__ = ["prepare_for_inference", "decode_session", "kv_cache_dtype_of", "linears_batch_invariant",
           "QUANTIZE_CHOICES", "Int8Linear", "quantize_int8"]
