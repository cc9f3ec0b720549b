"""The paged KV memory pool's bookkeeping: plain Python, no torch.

Rules (each one is tested in tests/test_block_pool.py):
- A block is handed out with ref_cnt 1; sharing it (prefix hit) increments ref_cnt.
- A block whose ref_cnt drops to 0 joins the free queue at its tail but keeps its hash,
  so a later request with the same prefix can take it back ("touch") until it is evicted.
- New blocks come from the free queue's head (least recently freed first); taking a block
  that still carries a hash evicts it from the prefix cache.
- A block's hash is a sha256 chaining its parent's hash with its own token ids, so equal
  hashes mean equal whole prefixes; a hit also compares the block's own token ids.
  (A weak hash such as Python's ``hash`` can be collided on purpose, letting one request
  read K/V computed for another prompt.)
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(slots=True)
class Block:
    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None
    token_ids: tuple[int, ...] | None = None  # set while the block is in the prefix cache


def hash_block(parent_hash: bytes | None, token_ids: Sequence[int]) -> bytes:
    """Chained sha256 of one full block: equal hashes mean equal whole prefixes."""
    return hashlib.sha256((parent_hash or b"") + array("q", token_ids).tobytes()).digest()


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be at least 1, got {num_blocks}.")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Block ids with ref_cnt == 0, in eviction order (head = evict first).
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[bytes, Block] = {}  # block hash -> block
        self.num_cache_queries = 0  # full blocks looked up
        self.num_cache_hits = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now (free, or cached but unreferenced)."""
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def get_new_blocks(self, n: int) -> list[Block]:
        if n > len(self.free_queue):
            raise RuntimeError(f"asked for {n} blocks, {len(self.free_queue)} free")
        out = []
        for _ in range(n):
            block_id, _ = self.free_queue.popitem(last=False)
            block = self.blocks[block_id]
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: Iterable[Block]) -> None:
        """Take a reference on blocks found in the prefix cache."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self.free_queue[block.block_id]
            block.ref_cnt += 1

    def free_blocks(self, blocks: Iterable[Block]) -> None:
        """Drop one reference each; pass them in eviction order (the tail of a sequence first)."""
        for block in blocks:
            if block.ref_cnt <= 0:
                raise RuntimeError(f"block {block.block_id} freed with ref_cnt {block.ref_cnt}")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_queue[block.block_id] = None

    def lookup(self, block_hash: bytes, token_ids: Sequence[int]) -> Block | None:
        self.num_cache_queries += 1
        block = self.cached.get(block_hash)
        if block is None or block.token_ids != tuple(token_ids):
            return None
        self.num_cache_hits += 1
        return block

    def cache_block(self, block: Block, block_hash: bytes, token_ids: Sequence[int]) -> None:
        """Publish a full block under its chained hash (first writer wins on duplicates)."""
        if not self.enable_caching or block.block_hash is not None or block_hash in self.cached:
            return
        block.block_hash = block_hash
        block.token_ids = tuple(token_ids)
        self.cached[block_hash] = block

    def uncache_unreferenced(self, blocks: Iterable[Block]) -> None:
        """Take blocks that nobody references out of the prefix cache (their K/V is suspect)."""
        for block in blocks:
            if block.ref_cnt == 0:
                self._evict(block)

    def _evict(self, block: Block) -> None:
        if block.block_hash is not None:
            if self.cached.get(block.block_hash) is block:
                del self.cached[block.block_hash]
            block.block_hash = None
            block.token_ids = None

    def reset_prefix_cache(self) -> None:
        for block in self.cached.values():
            block.block_hash = None
            block.token_ids = None
        self.cached.clear()
