"""The CPU kernels against the PyTorch backend on random caches: same attention, any layout."""

import pytest
import torch

from lmserve.engine.attention import Attention, ForwardContext, SequenceSlice
from lmserve.engine.attention.cpu_backend import CPUAttentionBackend
from lmserve.engine.attention.torch_backend import TorchAttentionBackend

# (query heads, KV heads, head size): the kernels' head sizes with 1 to 8 query heads per KV head
# (decode has no fixed-shape version for 32).
HEADS = [(8, 2, 32), (4, 4, 64), (8, 2, 64), (16, 2, 128)]


@pytest.mark.parametrize("block_size", [16, 5])
@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", HEADS, ids=[f"h{h}-kv{kv}-d{d}" for h, kv, d in HEADS])
def test_cpu_backend_matches_torch_backend(block_size, window, dtype, heads):
    compare_backends(block_size, window, dtype, heads)


@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("heads", [(4, 4, 64), (8, 2, 64)], ids=["h4-kv4-d64", "h8-kv2-d64"])
def test_cpu_backend_matches_when_later_keys_score_far_higher(window, heads):
    # Keys that grow along the sequence: a row's largest score keeps rising by more than the
    # prefill kernel lets its running peak lag behind, so it rescales its sums block after block.
    compare_backends(16, window, torch.float32, heads, key_growth=0.5)


def compare_backends(block_size, window, dtype, heads, key_growth=0.0):
    gen = torch.Generator().manual_seed(block_size * 10 + (window or 0))
    h, hkv, d = heads
    layer = Attention(0, h, hkv, d, d**-0.5, window)
    # Decodes first (one query token each), then prefill chunks with and without cached context:
    # prompts and chunks of several blocks, and tiles that end inside a block.
    shapes = [(1, 1), (1, 17), (1, 40), (9, 9), (6, 30), (37, 37), (21, 70)]
    num_blocks, slices, offset, next_block = 64, [], 0, 0
    for query_len, context_len in shapes:
        blocks = -(-context_len // block_size)
        ids = list(range(next_block, next_block + blocks))[::-1]  # descending: tables are not ranges
        next_block += blocks
        slices.append(SequenceSlice(offset, query_len, context_len, ids))
        offset += query_len
    total = offset
    q = torch.randn(total, h * d, generator=gen).to(dtype)
    k = torch.randn(total, hkv * d, generator=gen)
    v = torch.randn(total, hkv * d, generator=gen).to(dtype)
    positions = torch.cat([torch.arange(s.context_len - s.query_len, s.context_len) for s in slices])
    k = (k * (1 + key_growth * positions[:, None])).to(dtype)

    # Earlier context of each sequence is written first, as earlier steps would have done.
    history = [SequenceSlice(0, s.context_len - s.query_len, s.context_len - s.query_len, s.block_ids)
               for s in slices if s.context_len > s.query_len]
    results = []
    for backend in (TorchAttentionBackend(block_size), CPUAttentionBackend(block_size)):
        cache = backend.allocate_cache(1, num_blocks, block_size, hkv, d, dtype, torch.device("cpu"))
        hist_gen = torch.Generator().manual_seed(99)
        for s in history:
            n = s.query_len
            hk = (torch.randn(n, hkv * d, generator=hist_gen) * (1 + key_growth * torch.arange(n)[:, None])).to(dtype)
            hv = torch.randn(n, hkv * d, generator=hist_gen).to(dtype)
            hq = torch.randn(n, h * d, generator=hist_gen).to(dtype)
            slots = torch.tensor([s.block_ids[p // block_size] * block_size + p % block_size for p in range(n)])
            meta = backend.build_metadata([SequenceSlice(0, n, n, s.block_ids)] if n > 1 else
                                          [SequenceSlice(0, 1, 1, s.block_ids)], slots, torch.device("cpu"))
            layer(hq, hk, hv, ForwardContext(backend, meta, cache))
        slots = torch.tensor([s.block_ids[p // block_size] * block_size + p % block_size
                              for s in slices for p in range(s.context_len - s.query_len, s.context_len)])
        meta = backend.build_metadata(slices, slots, torch.device("cpu"))
        results.append(layer(q, k, v, ForwardContext(backend, meta, cache)).float())
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(results[1], results[0], rtol=tolerance, atol=tolerance)
