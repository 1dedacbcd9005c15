from lmserve.engine.kv_cache import KVCacheManager

from .helpers import make_seq


def test_allocate_grows_table_block_by_block():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    seq = make_seq(6)
    assert [b.block_id for b in kv.allocate_slots(seq, 6)] == [0, 1]
    seq.num_computed_tokens = 6
    seq.token_ids.append(99)
    assert kv.allocate_slots(seq, 1) == []  # token 7 fits in block 1
    seq.num_computed_tokens = 7
    seq.token_ids.append(100)
    assert kv.allocate_slots(seq, 1) == []  # token 8 still fits
    seq.num_computed_tokens = 8
    seq.token_ids.append(101)
    assert [b.block_id for b in kv.allocate_slots(seq, 1)] == [2]
    assert kv.block_ids(seq) == [0, 1, 2]


def test_allocate_returns_none_and_changes_nothing_when_full():
    kv = KVCacheManager(num_blocks=2, block_size=4)
    a, b = make_seq(4), make_seq(5)
    assert kv.allocate_slots(a, 4) is not None
    assert kv.allocate_slots(b, 5) is None
    assert kv.block_ids(b) == [] and kv.num_free_blocks == 1


def test_prefix_hit_shares_full_blocks_and_leaves_one_token_to_compute():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    first = make_seq(10)
    kv.allocate_slots(first, 10)
    first.num_computed_tokens = 10
    kv.cache_blocks(first)  # blocks 0 and 1 are full; block 2 holds 2 tokens and is not cached
    second = make_seq(9)  # same first 9 tokens
    hit = kv.get_computed_blocks(second)
    assert [b.block_id for b in hit] == [0, 1]
    new = kv.allocate_slots(second, 1, hit)
    assert [b.block_id for b in new] == [3]
    assert kv.block_ids(second) == [0, 1, 3]
    assert [b.ref_count for b in kv.blocks(first)] == [2, 2, 1]
    assert kv.prefix_stats.num_queries == 10 + 9 and kv.prefix_stats.num_hits == 8

    # A prompt that is exactly two cached blocks still computes its last token: one block is reused.
    third = make_seq(8)
    assert [b.block_id for b in kv.get_computed_blocks(third)] == [0]


def test_freed_blocks_stay_cached_until_evicted():
    kv = KVCacheManager(num_blocks=3, block_size=2)
    seq = make_seq(4)
    kv.allocate_slots(seq, 4)
    seq.num_computed_tokens = 4
    kv.cache_blocks(seq)
    kv.free(seq)
    assert kv.num_free_blocks == 3 and kv.usage == 0.0
    again = make_seq(5)
    assert [b.block_id for b in kv.get_computed_blocks(again)] == [0, 1]
    # Taking all three blocks for an unrelated sequence evicts both cached ones (tail first).
    other = make_seq(6, first_token=50)
    assert [b.block_id for b in kv.allocate_slots(other, 6)] == [2, 1, 0]
    assert kv.get_computed_blocks(again) == []


def test_cached_blocks_nobody_holds_are_not_counted_twice():
    kv = KVCacheManager(num_blocks=3, block_size=2)
    seq = make_seq(4)
    kv.allocate_slots(seq, 4)
    seq.num_computed_tokens = 4
    kv.cache_blocks(seq)
    kv.free(seq)
    # 3 free blocks, two of them are the hit; the sequence needs 2 more -> only 1 really left.
    longer = make_seq(8)
    hit = kv.get_computed_blocks(longer)
    assert len(hit) == 2
    assert kv.allocate_slots(longer, 4, hit) is None
    assert kv.num_free_blocks == 3 and all(b.ref_count == 0 for b in hit)


def test_prefix_caching_off_never_hits():
    kv = KVCacheManager(num_blocks=4, block_size=2, enable_prefix_caching=False)
    seq = make_seq(4)
    kv.allocate_slots(seq, 4)
    seq.num_computed_tokens = 4
    kv.cache_blocks(seq)
    assert kv.get_computed_blocks(make_seq(4)) == []
