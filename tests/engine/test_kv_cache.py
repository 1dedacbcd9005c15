from lmserve.engine.block_pool import hash_block, tenant_salt
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


def cached_prompt(kv, num_tokens, tenant):
    """A sequence of `tenant` whose full blocks went into the prefix cache, then freed."""
    seq = make_seq(num_tokens, tenant=tenant)
    kv.allocate_slots(seq, num_tokens)
    seq.num_computed_tokens = num_tokens
    kv.cache_blocks(seq)
    kv.free(seq)
    return seq


def test_block_hashes_are_salted_by_tenant_so_tenants_never_hit_each_others_prefixes():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = cached_prompt(kv, 9, "tenant-a")
    first, second = [1, 2, 3, 4], [5, 6, 7, 8]
    salted = hash_block(tenant_salt("tenant-a"), first)
    assert a.block_hashes == [salted, hash_block(salted, second)]
    assert salted != hash_block(None, first) and tenant_salt("") is None

    assert kv.get_computed_blocks(make_seq(9, tenant="tenant-b")) == []
    assert kv.get_computed_blocks(make_seq(9)) == []  # no tenant: no salt, so no hit either
    assert [b.block_id for b in kv.get_computed_blocks(make_seq(9, tenant="tenant-a"))] == [0, 1]


def test_sharing_across_tenants_hits_any_tenants_prefix():
    kv = KVCacheManager(num_blocks=8, block_size=4, share_across_tenants=True)
    a = cached_prompt(kv, 9, "tenant-a")
    assert a.block_hashes[0] == hash_block(None, [1, 2, 3, 4])
    assert [b.block_id for b in kv.get_computed_blocks(make_seq(9, tenant="tenant-b"))] == [0, 1]


def computed(seq, num_tokens):
    seq.num_computed_tokens = num_tokens
    return seq


def test_swap_out_copies_computed_blocks_only_and_frees_the_device_blocks():
    kv = KVCacheManager(num_blocks=4, block_size=4, num_cpu_blocks=4)
    seq = make_seq(9)
    kv.allocate_slots(seq, 9)
    computed(seq, 6)  # 9 slots allocated, 6 tokens written: blocks 0 and 1 hold KV
    assert kv.swap_out(seq) == [(0, 0), (1, 1)]
    assert kv.block_ids(seq) == [] and kv.cpu_block_ids(seq) == [0, 1]
    assert kv.num_free_blocks == 4 and kv.num_free_cpu_blocks == 2 and kv.cpu_usage == 0.5


def test_swap_out_changes_nothing_when_the_cpu_pool_is_short():
    kv = KVCacheManager(num_blocks=4, block_size=4, num_cpu_blocks=1)
    seq = make_seq(8)
    kv.allocate_slots(seq, 8)
    computed(seq, 8)
    assert kv.swap_out(seq) is None
    assert kv.block_ids(seq) == [0, 1] and kv.num_free_cpu_blocks == 1


def test_swap_in_restores_into_new_device_blocks_and_holds_cpu_blocks_until_released():
    kv = KVCacheManager(num_blocks=4, block_size=4, num_cpu_blocks=4)
    first, second = make_seq(5), make_seq(5, first_token=50)
    for seq in (first, second):
        kv.allocate_slots(seq, 5)
        computed(seq, 5)
    assert kv.swap_out(first) == [(0, 0), (1, 1)]
    assert kv.swap_in(first, 1) == [(0, 0), (1, 1)]  # the uncached blocks it left are reused first
    assert kv.block_ids(first) == [0, 1] and kv.cpu_block_ids(first) == []
    # Within the same step a swap-out must not write the CPU blocks a swap-in is reading.
    assert kv.swap_out(second) == [(2, 2), (3, 3)]
    assert kv.num_free_cpu_blocks == 0
    kv.release_swapped_in()
    assert kv.num_free_cpu_blocks == 2


def test_swap_in_changes_nothing_when_device_blocks_do_not_fit():
    kv = KVCacheManager(num_blocks=2, block_size=4, num_cpu_blocks=2)
    seq = make_seq(5)
    kv.allocate_slots(seq, 5)
    computed(seq, 5)
    kv.swap_out(seq)
    kv.allocate_slots(make_seq(2, first_token=80), 2)  # takes one of the two device blocks
    assert kv.swap_in(seq, 1) is None
    assert kv.cpu_block_ids(seq) == [0, 1] and kv.num_free_blocks == 1


def test_free_releases_a_swapped_out_sequences_cpu_blocks():
    kv = KVCacheManager(num_blocks=2, block_size=4, num_cpu_blocks=2)
    seq = make_seq(5)
    kv.allocate_slots(seq, 5)
    computed(seq, 5)
    kv.swap_out(seq)
    kv.free(seq)
    assert kv.cpu_block_ids(seq) == [] and kv.num_free_cpu_blocks == 2 and kv.num_free_blocks == 2
