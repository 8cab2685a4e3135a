"""Windows of a token stream as (inputs, next-token targets): the batches of pretraining and of
language-model evaluation alike."""

from __future__ import annotations

import numpy as np
import torch


def gather_windows(data: np.ndarray, starts: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets, both (B, block_size) int64, for windows starting at ``starts``."""
    rows = np.stack([np.asarray(data[s:s + block_size + 1]) for s in starts.tolist()])
    rows = torch.from_numpy(rows.astype(np.int64))  # uint16/uint32 → int64 for embedding lookups
    return rows[:, :-1], rows[:, 1:]
