"""The fixed pool of KV-cache blocks, with prefix caching. Pure Python: it never touches tensors."""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


def hash_block(parent_hash: bytes | None, token_ids: Sequence[int]) -> bytes:
    """Chained hash of one full block: it identifies the block's tokens *and* everything before them.

    A cryptographic hash, so a crafted prompt cannot collide with another tenant's prefix.
    """
    digest = hashlib.blake2b(parent_hash or b"", digest_size=16)
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


def tenant_salt(tenant: str) -> bytes | None:
    """The parent hash of a tenant's first block, so that its cached prefixes match only its own
    requests (like vLLM's `cache_salt`); None (no salt) for the empty tenant.

    Its own personalization keeps it out of the space of block hashes: a tenant name can never make
    its first block equal another chain's later block.
    """
    if not tenant:
        return None
    return hashlib.blake2b(tenant.encode(), digest_size=16, person=b"lmserve-tenant").digest()


@dataclass(slots=True, eq=False)
class Block:
    """One block of `block_size` token slots in every layer's KV cache."""

    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None
    """Set while the block is in the prefix cache (its KV is written and its tokens are known)."""


class BlockPool:
    """Owns every KV block and the prefix cache.

    Invariants: a block is in `free_queue` exactly when its `ref_count == 0`; a block has a
    `block_hash` exactly when it is in `cached_blocks` under that hash. Free blocks without a hash sit
    at the front of `free_queue`, so they are reused before cached ones, and cached free blocks are
    evicted least-recently-freed first.
    """

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [Block(block_id=i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, Block] = OrderedDict((b.block_id, b) for b in self.blocks)
        self.cached_blocks: dict[bytes, Block] = {}
        self.num_evictions = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now, evicting cached ones if needed."""
        return len(self.free_queue)

    def allocate(self, num_blocks: int) -> list[Block]:
        """Takes `num_blocks` free blocks (evicting cached ones last) with ref_count 1."""
        if num_blocks > len(self.free_queue):
            raise ValueError(f"asked for {num_blocks} blocks, only {len(self.free_queue)} are free")
        allocated = []
        for _ in range(num_blocks):
            _, block = self.free_queue.popitem(last=False)
            if block.block_hash is not None:
                del self.cached_blocks[block.block_hash]
                block.block_hash = None
                self.num_evictions += 1
            block.ref_count = 1
            allocated.append(block)
        return allocated

    def free(self, blocks: Iterable[Block]) -> None:
        """Drops one reference from each block; unreferenced blocks become free (cached ones stay cached)."""
        for block in blocks:
            if block.ref_count <= 0:
                raise RuntimeError(f"block {block.block_id} freed more often than it was taken")
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[block.block_id] = block
                if block.block_hash is None:
                    self.free_queue.move_to_end(block.block_id, last=False)

    def touch(self, blocks: Iterable[Block]) -> None:
        """Takes one more reference on each (cached) block, pulling it out of the free queue."""
        for block in blocks:
            if block.ref_count == 0:
                del self.free_queue[block.block_id]
            block.ref_count += 1

    def lookup(self, block_hash: bytes) -> Block | None:
        return self.cached_blocks.get(block_hash)

    def cache(self, block: Block, block_hash: bytes) -> None:
        """Registers a full, written block under its hash; a block already holding it is left alone."""
        if not self.enable_caching or block.block_hash is not None or block_hash in self.cached_blocks:
            return
        block.block_hash = block_hash
        self.cached_blocks[block_hash] = block

    def reset_prefix_cache(self) -> int:
        """Forgets every cached block that no sequence holds; returns how many."""
        forgotten = 0
        for block in self.free_queue.values():
            if block.block_hash is not None:
                del self.cached_blocks[block.block_hash]
                block.block_hash = None
                forgotten += 1
        # Uncached free blocks go first; the queue keeps that order only if we rebuild it.
        self.free_queue = OrderedDict(sorted(self.free_queue.items(), key=lambda item: item[0]))
        return forgotten
