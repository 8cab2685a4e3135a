"""Text generation: pure sampling functions and a KV-cache decoding engine."""

from .engine import encode_prompt, generate_text, generate_tokens, iter_tokens, stream_text
from .sampling import filter_logits, sample_next, top_k_filter, top_p_filter

__all__ = ["encode_prompt", "generate_text", "generate_tokens", "iter_tokens", "stream_text",
           "filter_logits", "sample_next", "top_k_filter", "top_p_filter"]
