import pytest

from lmserve.engine.block_pool import BlockPool, hash_block


def test_allocate_takes_blocks_in_id_order_and_free_returns_them():
    pool = BlockPool(4)
    blocks = pool.allocate(3)
    assert [b.block_id for b in blocks] == [0, 1, 2]
    assert [b.ref_count for b in blocks] == [1, 1, 1]
    assert pool.num_free_blocks == 1
    pool.free(blocks)
    assert pool.num_free_blocks == 4


def test_uncached_free_blocks_are_reused_before_cached_ones():
    pool = BlockPool(4)
    a, b, c = pool.allocate(3)
    pool.cache(a, hash_block(None, [1, 2]))
    pool.free([a, b])
    # b (uncached) goes to the front, a (cached) to the back; block 3 was never used.
    assert list(pool.free_queue) == [1, 3, 0]
    taken = pool.allocate(2)
    assert [blk.block_id for blk in taken] == [1, 3]
    assert pool.lookup(hash_block(None, [1, 2])) is a  # still cached
    (evicted,) = pool.allocate(1)
    assert evicted is a and a.block_hash is None
    assert pool.lookup(hash_block(None, [1, 2])) is None
    assert pool.num_evictions == 1


def test_touch_pulls_a_cached_free_block_out_of_the_free_queue():
    pool = BlockPool(2)
    (a,) = pool.allocate(1)
    h = hash_block(None, [7])
    pool.cache(a, h)
    pool.free([a])
    assert pool.num_free_blocks == 2
    pool.touch([a])
    assert a.ref_count == 1 and pool.num_free_blocks == 1
    pool.touch([a])
    assert a.ref_count == 2
    pool.free([a, a])
    assert a.ref_count == 0 and pool.num_free_blocks == 2


def test_double_free_is_an_error():
    pool = BlockPool(1)
    (a,) = pool.allocate(1)
    pool.free([a])
    with pytest.raises(RuntimeError):
        pool.free([a])


def test_duplicate_hash_keeps_first_block():
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    h = hash_block(None, [1])
    pool.cache(a, h)
    pool.cache(b, h)
    assert pool.lookup(h) is a and b.block_hash is None


def test_hash_is_chained():
    h1 = hash_block(None, [1, 2])
    assert hash_block(h1, [3, 4]) != hash_block(None, [3, 4])
    assert hash_block(h1, [3, 4]) == hash_block(hash_block(None, [1, 2]), [3, 4])


def test_reset_prefix_cache_forgets_only_unheld_blocks():
    pool = BlockPool(3)
    a, b = pool.allocate(2)
    pool.cache(a, hash_block(None, [1]))
    pool.cache(b, hash_block(None, [2]))
    pool.free([a])
    assert pool.reset_prefix_cache() == 1
    assert pool.lookup(hash_block(None, [1])) is None
    assert pool.lookup(hash_block(None, [2])) is b


def test_pool_needs_a_block():
    with pytest.raises(ValueError, match="at least one block"):
        BlockPool(0)
