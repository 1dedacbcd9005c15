"""Block tables of sequences over the block pool: allocation, prefix-cache hits, freeing. Pure Python."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from lmserve.engine.block_pool import Block, BlockPool, hash_block, tenant_salt
from lmserve.engine.sequence import Sequence


@dataclass
class PrefixCacheStats:
    """Token counts of prefix-cache lookups made when sequences were admitted."""

    num_queries: int = 0
    num_hits: int = 0

    @property
    def hit_rate(self) -> float:
        return self.num_hits / self.num_queries if self.num_queries else 0.0


class KVCacheManager:
    """Maps each running sequence to the device blocks that hold its KV entries, and each swapped-out
    sequence to the CPU blocks its entries were copied to.

    Invariants: block `i` of a sequence's table holds the KV of its tokens
    `[i * block_size, (i + 1) * block_size)`; blocks shared between sequences are full and cached,
    so no sequence ever writes a block another sequence references; a sequence's table covers at
    least its `num_computed_tokens`. A sequence has a device table or a CPU table, never both.
    Every CPU block is exactly one of: free, in one CPU table, or in `_cpu_releasing` (read by a
    swap-in of the step being scheduled, free again at `release_swapped_in`).
    Unless `share_across_tenants`, a sequence's block hashes are salted with its tenant, so it only
    ever hits blocks cached by sequences of the same tenant.
    """

    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True, num_cpu_blocks: int = 0,
        share_across_tenants: bool = False,
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if num_cpu_blocks < 0:
            raise ValueError(f"num_cpu_blocks must be >= 0, got {num_cpu_blocks}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.share_across_tenants = share_across_tenants
        self.pool = BlockPool(num_blocks, enable_caching=enable_prefix_caching)
        self.prefix_stats = PrefixCacheStats()
        self._tables: dict[int, list[Block]] = {}
        self._num_cached_blocks: dict[int, int] = {}
        self.num_cpu_blocks = num_cpu_blocks
        self._cpu_free: deque[int] = deque(range(num_cpu_blocks))
        self._cpu_tables: dict[int, list[int]] = {}
        self._cpu_releasing: list[int] = []

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks held by sequences (cached but unreferenced blocks count as free)."""
        return 1.0 - self.pool.num_free_blocks / self.pool.num_blocks

    @property
    def num_free_cpu_blocks(self) -> int:
        return len(self._cpu_free)

    @property
    def cpu_usage(self) -> float:
        """Fraction of the CPU swap pool holding swapped-out blocks."""
        return 1.0 - len(self._cpu_free) / self.num_cpu_blocks if self.num_cpu_blocks else 0.0

    def cpu_block_ids(self, seq: Sequence) -> list[int]:
        return list(self._cpu_tables.get(seq.seq_id, ()))

    def block_ids(self, seq: Sequence) -> list[int]:
        return [block.block_id for block in self._tables.get(seq.seq_id, ())]

    def blocks(self, seq: Sequence) -> list[Block]:
        return self._tables.get(seq.seq_id, [])

    def num_blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def get_computed_blocks(self, seq: Sequence) -> list[Block]:
        """Cached blocks that hold a prefix of a sequence that holds no blocks yet.

        At least one token is always left to compute, because its logits are needed.
        """
        if not self.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        hit: list[Block] = []
        for block_hash in self._block_hashes(seq, max_blocks):
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            hit.append(block)
        return hit

    def allocate_slots(
        self, seq: Sequence, num_new_tokens: int, computed_blocks: list[Block] | None = None
    ) -> list[Block] | None:
        """Makes room for `num_new_tokens` more tokens of `seq`; None when the blocks do not fit.

        `computed_blocks` (from `get_computed_blocks`, only when the sequence holds nothing) become
        the start of its table, covering `len(computed_blocks) * block_size` computed tokens.
        Returns the newly allocated blocks. Nothing changes when the answer is None.
        """
        computed_blocks = computed_blocks or []
        table = self._tables.get(seq.seq_id)
        if computed_blocks and table:
            raise ValueError("computed blocks can only start an empty block table")
        num_held = len(table) if table else 0
        num_tokens = seq.num_computed_tokens + len(computed_blocks) * self.block_size + num_new_tokens
        num_required = self.num_blocks_needed(num_tokens) - num_held - len(computed_blocks)
        # Cached blocks nobody holds are counted as free; taking them makes them unavailable.
        num_reclaimed = sum(1 for block in computed_blocks if block.ref_count == 0)
        if num_required > self.pool.num_free_blocks - num_reclaimed:
            return None
        if table is None:
            table = self._tables[seq.seq_id] = []
            self._num_cached_blocks[seq.seq_id] = len(computed_blocks)
            self.prefix_stats.num_queries += seq.num_tokens
            self.prefix_stats.num_hits += len(computed_blocks) * self.block_size
        self.pool.touch(computed_blocks)
        table.extend(computed_blocks)
        new_blocks = self.pool.allocate(max(num_required, 0))
        table.extend(new_blocks)
        return new_blocks

    def cache_blocks(self, seq: Sequence) -> None:
        """Registers the sequence's full, computed blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        table = self._tables.get(seq.seq_id)
        if not table:
            return
        num_full = min(seq.num_computed_tokens // self.block_size, len(table))
        start = self._num_cached_blocks[seq.seq_id]
        if num_full <= start:
            return
        hashes = self._block_hashes(seq, num_full)
        for i in range(start, num_full):
            self.pool.cache(table[i], hashes[i])
        self._num_cached_blocks[seq.seq_id] = num_full

    def free(self, seq: Sequence) -> None:
        """Releases every block of the sequence (device and CPU); full device blocks stay in the prefix cache."""
        table = self._tables.pop(seq.seq_id, None)
        self._num_cached_blocks.pop(seq.seq_id, None)
        if table:
            # Tail blocks are the least likely to be shared: free them first so they are evicted first.
            self.pool.free(reversed(table))
        self._cpu_free.extend(self._cpu_tables.pop(seq.seq_id, ()))

    def swap_out(self, seq: Sequence) -> list[tuple[int, int]] | None:
        """Moves a running sequence's computed blocks to CPU blocks and frees its device blocks.

        Returns the (device block, CPU block) pairs to copy before the device blocks are written
        again; None, changing nothing, when the CPU pool lacks room or nothing is computed.
        """
        table = self._tables.get(seq.seq_id)
        num_needed = self.num_blocks_needed(seq.num_computed_tokens)
        if not table or num_needed == 0 or num_needed > len(self._cpu_free):
            return None
        cpu_ids = [self._cpu_free.popleft() for _ in range(num_needed)]
        mapping = [(block.block_id, cpu_id) for block, cpu_id in zip(table, cpu_ids)]
        self.free(seq)
        self._cpu_tables[seq.seq_id] = cpu_ids
        return mapping

    def swap_in(self, seq: Sequence, num_new_tokens: int) -> list[tuple[int, int]] | None:
        """Gives a swapped-out sequence device blocks for its computed tokens and `num_new_tokens` more.

        Returns the (CPU block, device block) pairs to copy before the step runs; None, changing
        nothing, when the device blocks do not fit. The CPU blocks stay taken until
        `release_swapped_in`, so no swap-out decided in the same step can overwrite them.
        """
        cpu_ids = self._cpu_tables.get(seq.seq_id)
        if cpu_ids is None:
            raise ValueError(f"sequence {seq.seq_id} is not swapped out")
        num_required = self.num_blocks_needed(seq.num_computed_tokens + num_new_tokens)
        if num_required > self.pool.num_free_blocks:
            return None
        blocks = self.pool.allocate(num_required)
        self._tables[seq.seq_id] = blocks
        self._num_cached_blocks[seq.seq_id] = 0
        del self._cpu_tables[seq.seq_id]
        self._cpu_releasing.extend(cpu_ids)
        return [(cpu_id, block.block_id) for cpu_id, block in zip(cpu_ids, blocks)]

    def release_swapped_in(self) -> None:
        """Frees the CPU blocks read by this step's swap-ins (call once the step is fully scheduled)."""
        self._cpu_free.extend(self._cpu_releasing)
        self._cpu_releasing.clear()

    def reset_prefix_cache(self) -> int:
        return self.pool.reset_prefix_cache()

    def _block_hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """The first `num_blocks` chained block hashes of the sequence, computed once each.

        The first block's parent is the tenant's salt: a cache hit (`cached_tokens`, a faster first
        token) would otherwise tell one tenant which prompts another tenant sent.
        """
        hashes = seq.block_hashes
        size = self.block_size
        while len(hashes) < num_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else None if self.share_across_tenants else tenant_salt(seq.tenant)
            hashes.append(hash_block(parent, seq.token_ids[i * size : (i + 1) * size]))
        return hashes
