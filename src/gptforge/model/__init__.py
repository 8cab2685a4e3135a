"""The GPT model: embeddings, causal self-attention (SDPA), MLP, blocks, KV cache, presets."""

from ..config import MODEL_PRESETS, ModelConfig
from .gpt import GPT, Attention, Block, Blocks, CausalSelfAttention, MLP
from .kv_cache import KVCache

__all__ = ["GPT", "Attention", "Block", "Blocks", "CausalSelfAttention", "MLP", "KVCache", "ModelConfig", "MODEL_PRESETS"]
