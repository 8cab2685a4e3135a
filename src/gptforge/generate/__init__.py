"""Text generation: pure logits processors and sampling functions, and a KV-cache decoding engine.

    generate(model, tokenizer, prompts, config)        -> list[list[Completion]]  (per prompt, per sequence)
    generate_ids(model, prompts_ids, config, eos_id)   -> the same from token ids
    stream(model, tokenizer, prompt, config)           -> Stream: text pieces as they are decided
"""

from .batch import Completion
from .beam import beam_search
from .engine import Stream, encode_prompt, generate, generate_ids, generate_tokens, stream, stream_ids
from .processors import (
    TokenHistory,
    apply_presence_frequency_penalty,
    apply_repetition_penalty,
    apply_temperature,
    ban_tokens,
    min_p_filter,
    process_logits,
    top_k_filter,
    top_p_filter,
    warp_logits,
)
from .sampling import choose_tokens, filter_logits, logits_to_probs, sample, sample_next, token_logprobs

__all__ = [
    "Completion", "Stream", "beam_search", "encode_prompt", "generate", "generate_ids", "generate_tokens", "stream",
    "stream_ids",
    "TokenHistory", "apply_presence_frequency_penalty", "apply_repetition_penalty", "apply_temperature",
    "ban_tokens", "min_p_filter", "process_logits", "top_k_filter", "top_p_filter", "warp_logits",
    "choose_tokens", "filter_logits", "logits_to_probs", "sample", "sample_next", "token_logprobs",
]
