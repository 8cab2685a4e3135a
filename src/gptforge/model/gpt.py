"""A decoder-only Transformer (GPT-2 architecture) you can read in one sitting.

Shapes: B batch, T new tokens, S keys attended to (cached + new), C = n_embd, H = n_head, D = head_dim.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig
from ..errors import ConfigError
from .kv_cache import KVCache


class Attention(nn.Module):
    """Scaled dot-product attention of queries over keys and values, without parameters: the one step of
    :class:`CausalSelfAttention` that a backend may run on a kernel of its own, by swapping in a subclass
    (gptforge.backends); the weights and their state-dict keys stay where they are. To read the attention
    probabilities, :func:`gptforge.model.recording.recording_attention` swaps in an eager one for a while."""

    def forward(
        self,
        q: torch.Tensor,  # (B, H, T, D)
        k: torch.Tensor,  # (B, H, S, D), as the KV cache holds them (possibly in another dtype)
        v: torch.Tensor,  # (B, H, S, D)
        mask: Optional[torch.Tensor],  # (B, 1, T, S) bool, True = may attend; None = plain causal
        kv_cache: Optional[KVCache],
        dropout_p: float,
    ) -> torch.Tensor:  # (B, H, T, D)
        # A bfloat16 KV cache under a float32 model: attend in the model's dtype (a no-op otherwise).
        k, v = k.to(q.dtype), v.to(q.dtype)
        T = q.shape[2]
        if kv_cache is not None and kv_cache.row_starts is not None:
            # Ragged decode step (one new token a row): each row attends to its own keys only, with the
            # very call a lone row makes, so batching leaves every row's result unchanged.
            return torch.cat([F.scaled_dot_product_attention(q[i:i + 1], k[i:i + 1, :, s:], v[i:i + 1, :, s:])
                              for i, s in enumerate(kv_cache.row_starts)])
        if mask is None:
            # No cache and no padding: the fused causal kernel. With a cache and one new token, the
            # query may see every cached key, so no mask at all.
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=T > 1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.proj.is_residual_projection = True  # scaled init, see GPT._init_weights
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.attend = Attention()
        # Extra keys and values (prefix-tuning, gptforge.peft.prefix, sets it): a callable ``prefix(batch_size)``
        # returning (k, v), each (B, H, P, D), that every query attends to before its own keys; they take no
        # positions and are not cached. None (the plain model): no extra keys.
        self.prefix = None

    def forward(
        self,
        x: torch.Tensor,  # (B, T, C)
        mask: Optional[torch.Tensor],  # (B, 1, T, S) bool, True = may attend; None = plain causal
        kv_cache: Optional[KVCache],
    ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, H, S, D)
        if self.prefix is not None:
            k, v, mask = self._prepend_prefix(k, v, mask, T)  # (B, H, P + S, D)
        y = self.attend(q, k, v, mask, kv_cache, self.dropout if self.training else 0.0)  # (B, H, T, D)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.proj(y))

    def _prepend_prefix(self, k, v, mask, T):
        """Put the learned prefix before the keys/values. The KV cache holds only real tokens, so this runs
        every step; the prefix takes no positions and every query sees all of it."""
        k_prefix, v_prefix = self.prefix(k.shape[0])  # (B, H, P, D)
        S = k.shape[2]
        if mask is None:  # plain causal: the T queries are the last T of the S keys
            q_pos = torch.arange(S - T, S, device=k.device).unsqueeze(1)  # (T, 1)
            mask = (torch.arange(S, device=k.device) <= q_pos).view(1, 1, T, S)
        visible = mask.new_ones(*mask.shape[:3], k_prefix.shape[2])  # (B or 1, 1, T, P)
        return (torch.cat([k_prefix.to(k.dtype), k], dim=2), torch.cat([v_prefix.to(v.dtype), v], dim=2),
                torch.cat([visible, mask], dim=-1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden = config.mlp_ratio * config.n_embd
        self.fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.act = nn.GELU(approximate="tanh" if config.activation == "gelu_tanh" else "none")
        self.proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.proj.is_residual_projection = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(self.act(self.fc(x))))


class Block(nn.Module):
    """Pre-norm Transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, mask=None, kv_cache=None):
        x = x + self.attn(self.ln_1(x), mask, kv_cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class Blocks(nn.ModuleList):
    """The stack of blocks, run in order. A backend may swap in a subclass that runs a decode step's whole
    stack at once (gptforge.backends); the keys stay ``blocks.N.*``."""

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor], kv_cache: Optional[KVCache]) -> torch.Tensor:
        for block in self:
            x = block(x, mask, kv_cache)
        return x


class GPT(nn.Module):
    """Token + learned position embeddings, ``n_layer`` blocks, final LayerNorm, tied LM head."""

    kv_cache_dtype: Optional[torch.dtype] = None
    """The dtype of the KV caches :meth:`new_kv_cache` makes when not told; None: the weights' dtype.
    ``torch.bfloat16`` under float32 weights halves the cache's memory and the bytes a decode step's
    attention reads, for a rounding of the cached keys and values to 8 significant bits
    (gptforge.backends.prepare_for_inference sets it)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        if config.vocab_size is None:
            raise ConfigError("model.vocab_size is not set (it normally comes from the tokenizer)")
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = Blocks(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        # GPT-2 init: N(0, 0.02), with residual projections scaled by 1/sqrt(2 * n_layer) so the
        # residual stream's variance does not grow with depth.
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "is_residual_projection", False):
                std /= math.sqrt(2 * self.config.n_layer)
            if module.weight.device.type != "meta":
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding) and module.weight.device.type != "meta":
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # ----------------------------------------------------------------------------------------------
    def hidden_states(
        self,
        idx: torch.Tensor,  # (B, T) token ids
        *,
        kv_cache: Optional[KVCache] = None,
        attention_mask: Optional[torch.Tensor] = None,  # (B, S) 1 = real token, 0 = padding
        position_ids: Optional[torch.Tensor] = None,  # (B, T)
    ) -> torch.Tensor:
        """The final-LayerNorm output, (B, T, C). Heads (LM, classifier) read from here."""
        B, T = idx.shape
        start = kv_cache.length if kv_cache is not None else 0
        if start + T > self.config.block_size:
            raise ConfigError(
                f"context of {start + T} tokens is longer than the model's block_size ({self.config.block_size})"
            )
        if kv_cache is not None and kv_cache.row_starts is not None:
            if T != 1 or attention_mask is not None or len(kv_cache.row_starts) != B or position_ids is None:
                raise ValueError("a ragged KV cache (row_starts) decodes one token a row, with position_ids "
                                 "and no attention_mask")
            if any(getattr(block.attn, "prefix", None) is not None for block in self.blocks):
                raise ValueError("a ragged KV cache does not support prefix-tuned models")
        if position_ids is None:
            if attention_mask is not None:
                # Left padding: a row's first real token sits at position 0.
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start:start + T]
            else:
                position_ids = torch.arange(start, start + T, device=idx.device).unsqueeze(0)
        mask = self._attention_mask(B, T, start, attention_mask, kv_cache is not None, idx.device)
        x = self.drop(self.wte(idx) + self.wpe(position_ids))  # (B, T, C)
        x = self.blocks(x, mask, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(T)
        return self.ln_f(x)

    def forward(
        self,
        idx: torch.Tensor,
        *,
        kv_cache: Optional[KVCache] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits (B, T, vocab_size); with ``last_only`` just the last position's, (B, 1, vocab_size)."""
        x = self.hidden_states(idx, kv_cache=kv_cache, attention_mask=attention_mask, position_ids=position_ids)
        if last_only:
            x = x[:, -1:, :]
        return self.logits(x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The LM head's logits (..., vocab_size) from final hidden states ``x`` (..., C)."""
        head = self.lm_head
        rows = x.shape[0] * x.shape[1]
        if type(head) is nn.Linear and x.device.type == "cpu" and rows <= 16 and not torch.is_grad_enabled():
            # Decoding on CPU: for a few rows against the vocabulary matrix, BLAS runs W @ x.T about
            # 1.4x (1 row) to 2.4x (8 rows) faster than x @ W.T (benchmarks/README.md, "Decoding").
            flat = x.reshape(rows, x.shape[-1])
            logits = (head.weight @ flat.T).T
            if head.bias is not None:
                logits = logits + head.bias
            return logits.reshape(*x.shape[:-1], -1)
        return head(x)

    @staticmethod
    def _attention_mask(B, T, start, attention_mask, cached, device) -> Optional[torch.Tensor]:
        if attention_mask is None and (not cached or T == 1 or start == 0):
            return None  # causal kernel (or no mask needed for one new token)
        S = start + T
        q_pos = torch.arange(start, S, device=device).unsqueeze(1)  # (T, 1)
        k_pos = torch.arange(S, device=device).unsqueeze(0)  # (1, S)
        allowed = (k_pos <= q_pos).unsqueeze(0)  # (1, T, S)
        if attention_mask is not None:
            if attention_mask.shape != (B, S):
                raise ValueError(f"attention_mask must have shape ({B}, {S}), got {tuple(attention_mask.shape)}")
            # A padding query would otherwise see no key at all (NaN); let it see itself.
            allowed = (allowed & attention_mask.bool().unsqueeze(1)) | (k_pos == q_pos).unsqueeze(0)
        return allowed.unsqueeze(1)  # (B or 1, 1, T, S)

    # ----------------------------------------------------------------------------------------------
    def new_kv_cache(self, batch_size: int, max_length: Optional[int] = None,
                     dtype: Optional[torch.dtype] = None) -> KVCache:
        """A preallocated cache for ``batch_size`` sequences of up to ``max_length`` tokens, in ``dtype``, else
        in :attr:`kv_cache_dtype` when set, else in the weights' dtype."""
        c = self.config
        weight = self.wte.weight
        return KVCache(
            n_layer=c.n_layer, batch_size=batch_size, n_head=c.n_head, head_dim=c.head_dim,
            max_length=min(max_length or c.block_size, c.block_size),
            dtype=dtype or self.kv_cache_dtype or weight.dtype, device=weight.device,
        )

    def num_parameters(self, exclude_positions: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # tied weights are counted once
        return n - self.wpe.weight.numel() if exclude_positions else n

    def flops_per_token(self, context: Optional[int] = None) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12 L H D T."""
        c = self.config
        T = context or c.block_size
        return 6 * self.num_parameters(exclude_positions=True) + 12 * c.n_layer * c.n_head * c.head_dim * T
