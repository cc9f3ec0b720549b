"""Per-request KV block lists on top of the BlockPool: allocation, prefix lookup, freeing.

Block tables are append-only: a request's blocks only grow until it is freed
(finished, aborted or preempted), so the model runner may cache them by length.
"""
from __future__ import annotations

from .block_pool import Block, BlockPool, hash_block
from .request import Request


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching)
        self.req_blocks: dict[str, list[Block]] = {}
        self.num_cached_blocks: dict[str, int] = {}  # leading blocks already published

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    def blocks(self, request_id: str) -> list[Block]:
        return list(self.req_blocks.get(request_id, ()))

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(request_id, ())]

    def get_computed_blocks(self, req: Request) -> tuple[list[Block], int]:
        """Longest cached prefix of full blocks, never covering the last token.

        The last token is always recomputed: its logits are what the request samples from.
        """
        if not self.enable_caching:
            return [], 0
        self._update_hashes(req)
        bs = self.block_size
        hits: list[Block] = []
        for i in range((req.num_tokens - 1) // bs):
            block = self.pool.lookup(req.block_hashes[i], req.token_ids[i * bs:(i + 1) * bs])
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * bs

    def allocate_slots(self, req: Request, num_new_tokens: int,
                       computed_blocks: list[Block] = ()) -> bool:
        """Make room for ``num_new_tokens`` more tokens after the computed ones; False if the
        pool cannot, in which case nothing changed."""
        blocks = self.req_blocks.setdefault(req.request_id, [])
        num_computed = req.num_computed_tokens + len(computed_blocks) * self.block_size
        num_total = num_computed + num_new_tokens
        num_required = -(-num_total // self.block_size) - len(blocks) - len(computed_blocks)
        # Cached blocks nobody references sit in the free queue: touching them uses it up too.
        num_reclaimed = sum(1 for b in computed_blocks if b.ref_cnt == 0)
        if max(num_required, 0) + num_reclaimed > self.pool.num_free_blocks:
            if not blocks:
                del self.req_blocks[req.request_id]
            return False
        self.pool.touch(computed_blocks)
        blocks.extend(computed_blocks)
        if num_required > 0:
            blocks.extend(self.pool.get_new_blocks(num_required))
        if computed_blocks:  # hits are published already
            self.num_cached_blocks[req.request_id] = len(computed_blocks)
        self._cache_full_blocks(req, blocks, num_total)
        return True

    def _cache_full_blocks(self, req: Request, blocks: list[Block], num_total: int) -> None:
        """Publish the blocks that will be full once this step has run.

        They are published at schedule time: a request admitted later in the same step may hit
        them, which is safe because every layer stores the whole batch's K/V before attending.
        """
        if not self.enable_caching:
            return
        self._update_hashes(req)
        bs = self.block_size
        num_full = num_total // bs
        start = self.num_cached_blocks.get(req.request_id, 0)
        for i in range(start, num_full):
            self.pool.cache_block(blocks[i], req.block_hashes[i], req.token_ids[i * bs:(i + 1) * bs])
        self.num_cached_blocks[req.request_id] = max(start, num_full)

    def _update_hashes(self, req: Request) -> None:
        bs = self.block_size
        hashes = req.block_hashes
        for i in range(len(hashes), req.num_tokens // bs):
            parent = hashes[-1] if hashes else req.cache_salt
            hashes.append(hash_block(parent, req.token_ids[i * bs:(i + 1) * bs]))

    def free(self, req: Request) -> None:
        blocks = self.req_blocks.pop(req.request_id, [])
        self.num_cached_blocks.pop(req.request_id, None)
        # Tail first: the free queue evicts its head first, so a sequence's shared
        # prefix blocks outlive its private tail blocks.
        self.pool.free_blocks(reversed(blocks))

    def reset_prefix_cache(self) -> None:
        self.pool.reset_prefix_cache()
