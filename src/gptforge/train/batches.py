"""Random training windows drawn from a token memmap, reproducible across resumes and process counts:
the :class:`~gptforge.train.trainer.BatchSource` of pretraining.

Each optimizer step draws the start offsets of the *global* batch (world_size × grad_accum_steps ×
batch_size windows) from one seeded generator, and every process reads only its own slice. So two
processes with one micro-batch each see exactly the windows one process with two accumulated
micro-batches sees, and the generator's state is the whole "data position" a checkpoint needs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..data.windows import gather_windows
from .rng import decode_tensor, encode_tensor


class BatchSampler:
    """Draws the global batch of each step and hands out this process's micro-batches."""

    def __init__(self, data: np.ndarray, *, block_size: int, batch_size: int, grad_accum_steps: int,
                 seed: int, rank: int = 0, world_size: int = 1):
        if len(data) < block_size + 1:
            raise ValueError(f"training data holds {len(data)} tokens; a window needs {block_size + 1}")
        self.data = data
        self.block_size = block_size
        self.batch_size = batch_size
        self.grad_accum_steps = grad_accum_steps
        self.rank = rank
        self.world_size = world_size
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def global_batch_size(self) -> int:
        return self.world_size * self.grad_accum_steps * self.batch_size

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.block_size

    def next_step(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This process's ``grad_accum_steps`` micro-batches (x, y) for the next optimizer step."""
        starts = torch.randint(len(self.data) - self.block_size, (self.global_batch_size,),
                               generator=self.generator)
        # Global layout: micro-step-major, then rank, then row. Rank r's m-th micro-batch is the
        # (m * world_size + r)-th chunk, so with world_size=1 chunk k is simply micro-step k.
        chunks = starts.view(self.grad_accum_steps, self.world_size, self.batch_size)
        return [gather_windows(self.data, chunks[m, self.rank], self.block_size)
                for m in range(self.grad_accum_steps)]

    def count_tokens(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
        """Every step counts the global batch's tokens, whatever this process's share."""
        return self.tokens_per_step

    def state(self) -> torch.Tensor:
        return self.generator.get_state()

    def load_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)

    def state_dict(self) -> dict[str, Any]:
        """The data position as trainer-state entries (the global batch size is kept for the record)."""
        return {"global_batch_size": self.global_batch_size, "batch_generator": encode_tensor(self.state())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.load_state(decode_tensor(state["batch_generator"]))
