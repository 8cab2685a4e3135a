"""A preallocated (static) key/value cache for incremental decoding.

All layers' keys and values live in two tensors allocated once, (L, B, H, max_length, D). A decode step
writes its new keys in place and attends to a view of the filled prefix, so no step allocates or copies
the cache. ``length`` is the number of filled positions, shared by every row of the batch (rows of
different prompt lengths are left-padded and masked).
"""

from __future__ import annotations

from typing import Optional

import torch


class KVCache:
    row_starts: Optional[list[int]] = None
    """Ragged decoding (the server's continuous batching): row i's keys are the columns from
    ``row_starts[i]`` on, and each row attends to just those, exactly as it would alone. None: every row
    attends to all ``length`` columns (left padding is then masked by the caller)."""

    def __init__(self, *, n_layer: int, batch_size: int, n_head: int, head_dim: int, max_length: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (n_layer, batch_size, n_head, max_length, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_length = max_length
        self.length = 0

    def view(self, rows: slice, start: int = 0, length: Optional[int] = None,
             row_starts: Optional[list[int]] = None) -> "KVCache":
        """A cache over batch ``rows`` of this one and its columns from ``start`` on, holding ``length``
        filled positions (default: all filled from ``start``), with ``row_starts`` for ragged decoding. It
        shares the storage, so the model's writes through it land here (a server keeps one big cache and
        decodes each step through a view of the rows and columns in use); this cache's own length is left
        as it is."""
        view = object.__new__(KVCache)
        view.k, view.v = self.k[:, rows, :, start:], self.v[:, rows, :, start:]
        view.max_length = self.max_length - start
        view.length = self.length - start if length is None else length
        view.row_starts = row_starts
        return view

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's (B, H, T, D) keys/values after the filled prefix; return the (B, H, S, D) views."""
        end = self.room_for(k.shape[2])
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def room_for(self, n: int) -> int:
        """The end position after writing ``n`` more; ValueError when the cache cannot hold them."""
        end = self.length + n
        if end > self.max_length:
            raise ValueError(f"KV cache holds {self.max_length} positions; {end} were asked for")
        return end

    def advance(self, n: int) -> None:
        """Called by the model once every layer has written its ``n`` new positions."""
        self.length += n

    def truncate(self, length: int) -> None:
        """Forget positions from ``length`` on (speculative decoding rolls back rejected tokens)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of length {self.length} to {length}")
        self.length = length

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` (beam search): row i becomes old row index[i]."""
        self.k = self.k.index_select(1, index)
        self.v = self.v.index_select(1, index)

    def reset(self) -> None:
        self.length = 0
