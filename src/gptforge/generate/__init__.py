"""Text generation: one sampler (logits, or a screened LM head, → tokens) and one KV-cache decoding engine.

    generate(model, tokenizer, prompts, config)        -> list[list[Completion]]  (per prompt, per sequence)
    generate_ids(model, prompts_ids, config, eos_id)   -> the same from token ids
    stream(model, tokenizer, prompt, config)           -> Stream: text pieces as they are decided
    score(model, tokenizer, context, candidates)       -> list[CandidateScore]  (log-probabilities, ranks)
    score_ids(model, context_ids, candidates_ids)      -> list[TokenScores]; prompt_logprobs: a text's own
    greedy_tokens(model, hidden) / sample_tokens(model, hidden, temperature)  -> the next token of each row

GenerateConfig's logit_bias and bad_words (banned phrases, :mod:`.bans`) apply in the one sampler, so every
decoding path has them.

:mod:`.sampler` turns logits into tokens; :mod:`.engine` holds the per-sequence state and the decode step that
the CLI, chat, speculative decoding and the server's scheduler share; :mod:`.score` scores given texts through
the same KV-cache forward.
"""

from .batch import Completion, FinishReason
from .beam import beam_search
from .engine import (Decoder, SequenceState, Stream, TokenChoice, encode_prompt, generate, generate_ids,
                     generate_tokens, stream, stream_ids)
from .processors import (
    TokenHistory,
    apply_logit_bias,
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
from .score import (CandidateScore, TokenScores, encode_pair, prompt_logprobs, rank_scores, score,
                    score_ids)
from .sampler import (choose_tokens, filter_logits, greedy_tokens, logits_to_probs, sample, sample_tokens,
                      token_logprobs)

__all__ = [
    "Completion", "Decoder", "FinishReason", "SequenceState", "Stream", "TokenChoice", "beam_search",
    "encode_prompt", "generate", "generate_ids", "generate_tokens", "stream", "stream_ids",
    "TokenHistory", "apply_logit_bias", "apply_presence_frequency_penalty", "apply_repetition_penalty", "apply_temperature",
    "ban_tokens", "min_p_filter", "process_logits", "top_k_filter", "top_p_filter", "warp_logits",
    "choose_tokens", "filter_logits", "greedy_tokens", "logits_to_probs", "sample", "sample_tokens",
    "token_logprobs",
    "CandidateScore", "TokenScores", "encode_pair", "prompt_logprobs", "rank_scores", "score", "score_ids",
]
