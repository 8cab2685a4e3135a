"""KVCache.view: a window of rows and columns of a cache that shares its storage."""

import torch

from gptforge.config import ModelConfig
from gptforge.model import GPT, KVCache


def cache(batch: int = 3, length: int = 10) -> KVCache:
    return KVCache(n_layer=2, batch_size=batch, n_head=2, head_dim=4, max_length=length, dtype=torch.float32,
                   device="cpu")


def test_a_view_shares_the_storage_and_keeps_its_own_length():
    big = cache()
    big.length = 6
    view = big.view(slice(1, 3), 2)
    assert view.batch_size == 2 and view.max_length == 8 and view.length == 4 and view.row_starts is None
    k, v = torch.ones(2, 2, 1, 4), torch.full((2, 2, 1, 4), 2.0)
    keys, values = view.update(0, k, v)
    view.advance(1)
    assert keys.shape == (2, 2, 5, 4) and view.length == 5 and big.length == 6
    assert bool((big.k[0, 1:3, :, 6] == 1).all()) and bool((big.v[0, 1:3, :, 6] == 2).all())
    assert not bool(big.k[0, 0].any())  # other rows untouched
    ragged = big.view(slice(0, 3), 0, 6, row_starts=[0, 2, 5])
    assert ragged.length == 6 and ragged.row_starts == [0, 2, 5] and big.row_starts is None


def test_decoding_through_a_view_equals_decoding_alone():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=16)).eval()
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        alone = model.new_kv_cache(1, 12)
        model(prompt, kv_cache=alone)
        want = model(torch.tensor([[9]]), kv_cache=alone)
        big = model.new_kv_cache(4, 16)
        big.k[:, 2, :, 3:8] = alone.k[:, 0, :, :5]
        big.v[:, 2, :, 3:8] = alone.v[:, 0, :, :5]
        got = model(torch.tensor([[9]]), kv_cache=big.view(slice(2, 3), 3, 5),
                    position_ids=torch.tensor([[5]]))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
