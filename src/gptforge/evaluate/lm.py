"""Language-model evaluation on a token stream: mean loss, perplexity and bits per byte."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..data.windows import gather_windows


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; logits (B, T, V), targets (B, T). Computed in float32."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))


def loss_to_metrics(loss: float, bytes_per_token: Optional[float]) -> dict[str, Optional[float]]:
    """Perplexity and bits per byte for a mean loss in nats per token."""
    perplexity = math.exp(loss) if loss < 700 else math.inf  # exp overflows a float beyond ~709
    bits_per_byte = loss / math.log(2) / bytes_per_token if bytes_per_token else None
    return {"perplexity": perplexity, "bits_per_byte": bits_per_byte}


@torch.no_grad()
def evaluate_lm(
    model: torch.nn.Module,
    data: np.ndarray,
    *,
    block_size: int,
    batch_size: int,
    num_batches: int,
    bytes_per_token: Optional[float],
    device: str | torch.device,
    autocast_dtype: Optional[torch.dtype] = None,
    seed: int = 0,
) -> dict[str, Optional[float]]:
    """Mean loss of ``model`` over ``num_batches`` random windows of ``data`` drawn with a fixed ``seed``.

    The same seed draws the same windows every call, so successive evaluations during training compare
    like with like. Returns loss (nats/token), perplexity, bits_per_byte (None without a byte count) and
    tokens (the number of predicted tokens).
    """
    device = torch.device(device)
    n_starts = len(data) - block_size
    if n_starts < 1:
        raise ValueError(f"evaluation data holds {len(data)} tokens; a window needs {block_size + 1}")
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        for _ in range(num_batches):
            starts = torch.randint(n_starts, (batch_size,), generator=generator)
            x, y = gather_windows(data, starts, block_size)
            x, y = x.to(device), y.to(device)
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                                enabled=autocast_dtype is not None):
                logits = model(x)
            total += lm_loss(logits, y).item()
    finally:
        model.train(was_training)
    loss = total / num_batches
    return {"loss": loss, **loss_to_metrics(loss, bytes_per_token), "tokens": num_batches * batch_size * block_size}
