"""Global-batch sampling: the same windows whatever the split into processes and micro-batches."""

import numpy as np
import torch

from gptforge.train.batches import BatchSampler

DATA = np.arange(1000, dtype=np.uint16)


def sampler(**kw) -> BatchSampler:
    return BatchSampler(DATA, block_size=8, seed=3, **{"batch_size": 4, "grad_accum_steps": 1, **kw})


def test_windows_are_inputs_and_shifted_targets():
    (x, y), = sampler().next_step()
    assert x.shape == y.shape == (4, 8) and x.dtype == torch.int64
    assert torch.equal(y, x + 1)  # DATA[i] == i, so the next token is the id plus one
    assert int(x.max()) + 1 <= 999


def test_two_processes_see_what_one_process_with_accumulation_sees():
    one = sampler(grad_accum_steps=2)
    ranks = [sampler(rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        accumulated = one.next_step()
        per_rank = [s.next_step()[0] for s in ranks]
        for (xa, ya), (xr, yr) in zip(accumulated, per_rank):
            assert torch.equal(xa, xr) and torch.equal(ya, yr)


def test_generator_state_is_the_data_position():
    s = sampler()
    s.next_step()
    saved = s.state().clone()
    expected = s.next_step()[0][0]
    fresh = sampler()
    fresh.load_state(saved)
    assert torch.equal(fresh.next_step()[0][0], expected)
    assert not torch.equal(sampler().next_step()[0][0], expected)
