"""Exact bookkeeping of engine/core/block_pool.py and engine/core/kv_cache_manager.py (no torch)."""
from __future__ import annotations

import pytest

import engine.core.kv_cache_manager as kvm
from engine.core.block_pool import BlockPool
from engine.core.kv_cache_manager import KVCacheManager
from engine.core.request import Request
from engine.core.sampling_params import SamplingParams

BS = 16


def make_req(rid: str, tokens) -> Request:
    return Request(rid, list(tokens), SamplingParams(max_tokens=16, temperature=0),
                   eos_token_ids=frozenset(), max_model_len=None)


def admit(kv: KVCacheManager, req: Request) -> int:
    """Allocate the whole prompt the way the scheduler does; returns the cached tokens."""
    hits, num_hit = kv.get_computed_blocks(req)
    assert kv.allocate_slots(req, req.num_tokens - num_hit, hits)
    req.num_computed_tokens = req.num_tokens
    return num_hit


def decode(kv: KVCacheManager, req: Request, token: int = 7) -> bool:
    req.append_token(token)
    ok = kv.allocate_slots(req, 1)
    if ok:
        req.num_computed_tokens += 1
    return ok


def free_ids(pool: BlockPool) -> list[int]:
    return list(pool.free_queue)


def refs(kv: KVCacheManager, rid: str) -> list[int]:
    return [kv.pool.blocks[i].ref_cnt for i in kv.block_ids(rid)]


def assert_all_free(kv: KVCacheManager) -> None:
    assert kv.num_free_blocks == kv.pool.num_blocks
    assert all(b.ref_cnt == 0 for b in kv.pool.blocks)
    assert not kv.req_blocks and not kv.num_cached_blocks


# ---- BlockPool ------------------------------------------------------------------------

def test_pool_needs_a_block():
    with pytest.raises(ValueError):
        BlockPool(0)


def test_new_blocks_come_from_head_with_one_ref():
    pool = BlockPool(4)
    blocks = pool.get_new_blocks(3)
    assert [b.block_id for b in blocks] == [0, 1, 2]
    assert [b.ref_cnt for b in blocks] == [1, 1, 1]
    assert pool.num_free_blocks == 1 and free_ids(pool) == [3]
    assert pool.usage == 0.75


def test_asking_for_too_many_blocks_raises_and_takes_nothing():
    pool = BlockPool(4)
    pool.get_new_blocks(3)
    with pytest.raises(RuntimeError):
        pool.get_new_blocks(2)
    assert free_ids(pool) == [3]


def test_ref_counts_and_double_free():
    pool = BlockPool(2)
    (b,) = pool.get_new_blocks(1)
    pool.touch([b])  # a second sharer
    assert b.ref_cnt == 2
    pool.free_blocks([b])
    assert b.ref_cnt == 1 and pool.num_free_blocks == 1  # still referenced: not free
    pool.free_blocks([b])
    assert b.ref_cnt == 0 and free_ids(pool) == [1, 0]
    with pytest.raises(RuntimeError):
        pool.free_blocks([b])
    assert b.ref_cnt == 0 and free_ids(pool) == [1, 0]


def test_blocks_freed_earlier_are_reused_first():
    pool = BlockPool(5)
    a = pool.get_new_blocks(3)
    b = pool.get_new_blocks(2)
    pool.free_blocks(reversed(a))  # a sequence is freed tail first
    pool.free_blocks(reversed(b))
    assert free_ids(pool) == [2, 1, 0, 4, 3]
    assert [blk.block_id for blk in pool.get_new_blocks(5)] == [2, 1, 0, 4, 3]


def test_touch_takes_a_free_block_out_of_the_queue():
    pool = BlockPool(3)
    (b,) = pool.get_new_blocks(1)
    pool.free_blocks([b])
    assert free_ids(pool) == [1, 2, 0]
    pool.touch([b])
    assert b.ref_cnt == 1 and free_ids(pool) == [1, 2]


def test_lookup_compares_token_ids_and_first_writer_wins():
    pool = BlockPool(3)
    b0, b1 = pool.get_new_blocks(2)
    pool.cache_block(b0, 123, [1, 2])
    pool.cache_block(b1, 123, [9, 9])  # same hash, other tokens: not published
    assert b1.block_hash is None and pool.cached == {123: b0}
    assert pool.lookup(123, [9, 9]) is None
    assert pool.lookup(123, [1, 2]) is b0
    assert pool.lookup(456, [1, 2]) is None
    assert (pool.num_cache_queries, pool.num_cache_hits) == (3, 1)


def test_reusing_a_cached_block_evicts_its_hash():
    pool = BlockPool(1)
    (b,) = pool.get_new_blocks(1)
    pool.cache_block(b, 5, [1])
    pool.free_blocks([b])
    assert pool.lookup(5, [1]) is b  # free but still cached
    (again,) = pool.get_new_blocks(1)
    assert again is b and b.block_hash is None and b.token_ids is None
    assert pool.cached == {} and pool.lookup(5, [1]) is None


def test_caching_disabled_pool_publishes_nothing():
    pool = BlockPool(2, enable_caching=False)
    (b,) = pool.get_new_blocks(1)
    pool.cache_block(b, 5, [1])
    assert b.block_hash is None and pool.cached == {}


# ---- KVCacheManager: allocation ---------------------------------------------------------

def test_blocks_grow_one_per_block_size_tokens():
    kv = KVCacheManager(8, BS)
    req = make_req("a", range(20))
    admit(kv, req)
    assert len(kv.block_ids("a")) == 2 and kv.num_free_blocks == 6
    for _ in range(12):  # up to 32 tokens: still 2 blocks
        assert decode(kv, req)
    assert req.num_tokens == 32 and len(kv.block_ids("a")) == 2
    assert kv.pool.blocks[kv.block_ids("a")[1]].block_hash is not None  # full: published
    assert decode(kv, req)
    assert len(kv.block_ids("a")) == 3 and kv.num_free_blocks == 5


def test_free_returns_every_block_tail_first():
    kv = KVCacheManager(4, BS)
    admit(kv, make_req("a", range(40)))
    assert kv.block_ids("a") == [0, 1, 2]
    kv.free(make_req("a", range(40)))
    assert free_ids(kv.pool) == [3, 2, 1, 0]
    assert_all_free(kv)
    kv.free(make_req("a", range(40)))  # freeing an unknown request is a no-op
    assert_all_free(kv)


def test_allocate_slots_fails_without_changes_when_pool_too_small():
    kv = KVCacheManager(3, BS)
    a = make_req("a", range(20))
    admit(kv, a)
    before = [(b.ref_cnt, b.block_hash) for b in kv.pool.blocks]
    big = make_req("big", range(100, 140))  # needs 3 blocks, 1 free
    assert not kv.allocate_slots(big, 40)
    assert "big" not in kv.req_blocks and kv.block_ids("big") == []
    assert not kv.allocate_slots(a, 29)  # a grows to 49 tokens: 2 more blocks, 1 free
    assert kv.block_ids("a") == [0, 1]
    assert kv.num_free_blocks == 1
    assert [(b.ref_cnt, b.block_hash) for b in kv.pool.blocks] == before


def test_reclaiming_free_cached_hits_counts_against_the_pool():
    kv = KVCacheManager(3, BS)
    a = make_req("a", range(33))
    admit(kv, a)
    kv.free(a)  # free queue: [2, 1, 0], blocks 0 and 1 still cached
    admit(kv, make_req("c", range(500, 510)))  # takes block 2
    b = make_req("b", list(range(32)) + [99])
    hits, num_hit = kv.get_computed_blocks(b)
    assert [h.block_id for h in hits] == [0, 1] and num_hit == 32
    # 2 free blocks: reclaiming both hits leaves none for the third block.
    assert not kv.allocate_slots(b, 1, hits)
    assert free_ids(kv.pool) == [1, 0] and [h.ref_cnt for h in hits] == [0, 0]
    assert "b" not in kv.req_blocks


# ---- KVCacheManager: prefix caching ------------------------------------------------------

def test_shared_40_token_prefix_shares_two_blocks():
    kv = KVCacheManager(10, BS)
    prefix = list(range(40))
    a = make_req("a", prefix + list(range(100, 108)))
    b = make_req("b", prefix + list(range(200, 208)))
    assert admit(kv, a) == 0
    assert admit(kv, b) == 32
    assert kv.block_ids("a")[:2] == kv.block_ids("b")[:2]
    assert kv.block_ids("a")[2] != kv.block_ids("b")[2]
    assert refs(kv, "a") == [2, 2, 1] and refs(kv, "b") == [2, 2, 1]
    assert kv.num_free_blocks == 10 - 4
    # a: first lookup misses and stops; b: 2 lookups, 2 hits.
    assert (kv.pool.num_cache_queries, kv.pool.num_cache_hits) == (3, 2)
    kv.free(a)
    kv.free(b)
    assert_all_free(kv)


def test_hit_never_covers_the_last_prompt_token():
    kv = KVCacheManager(8, BS)
    admit(kv, make_req("a", range(32)))
    b = make_req("b", range(32))
    hits, num_hit = kv.get_computed_blocks(b)
    assert num_hit == 16 and [h.block_id for h in hits] == [0]
    assert kv.allocate_slots(b, 16, hits)
    assert kv.block_ids("b") == [0, 2] and refs(kv, "b") == [2, 1]
    # b's second block duplicates a's published one: the first writer stays the cached one.
    assert kv.pool.blocks[2].block_hash is None
    assert kv.pool.cached[b.block_hashes[1]].block_id == 1


def test_freed_cached_blocks_are_touched_back_on_a_hit():
    kv = KVCacheManager(4, BS)
    a = make_req("a", range(33))
    admit(kv, a)
    kv.free(a)
    assert free_ids(kv.pool) == [3, 2, 1, 0] and kv.num_free_blocks == 4
    b = make_req("b", list(range(32)) + [99])
    assert admit(kv, b) == 32
    assert kv.block_ids("b") == [0, 1, 3]  # hits 0 and 1, a fresh block from the head
    assert refs(kv, "b") == [1, 1, 1]
    assert free_ids(kv.pool) == [2] and kv.num_free_blocks == 1


def test_eviction_takes_the_tail_first_and_drops_its_hash():
    kv = KVCacheManager(3, BS)
    a = make_req("a", range(33))
    admit(kv, a)
    hashes = list(a.block_hashes)
    kv.free(a)  # queue [2, 1, 0]: a's tail goes first
    admit(kv, make_req("c", range(500, 520)))  # 2 blocks: 2 and 1
    assert kv.block_ids("c") == [2, 1]
    assert hashes[1] not in kv.pool.cached and kv.pool.cached[hashes[0]].block_id == 0
    hits, num_hit = kv.get_computed_blocks(make_req("b", list(range(32)) + [99]))
    assert [h.block_id for h in hits] == [0] and num_hit == 16  # only the head survived


def test_hash_collision_with_other_tokens_is_no_hit(monkeypatch):
    monkeypatch.setattr(kvm, "hash_block", lambda parent, tokens: 42)
    kv = KVCacheManager(8, BS)
    admit(kv, make_req("a", range(33)))
    assert list(kv.pool.cached) == [42] and kv.pool.cached[42].block_id == 0
    b = make_req("b", range(1000, 1033))
    assert kv.get_computed_blocks(b) == ([], 0)
    assert b.block_hashes == [42, 42]
    assert (kv.pool.num_cache_queries, kv.pool.num_cache_hits) == (2, 0)


def test_hash_collision_with_same_tokens_after_other_prefix_is_no_hit():
    # Python's hash of an int is taken modulo 2**61 - 1, so these two first blocks collided
    # under the old tuple hash; sha256 tells them apart.
    head_x = list(range(100, 116))
    head_p = [head_x[0] + 2**61 - 1] + head_x[1:]
    tail = list(range(200, 216))
    kv = KVCacheManager(8, BS)
    admit(kv, make_req("c", head_x + [2]))  # caches X
    admit(kv, make_req("a", head_p + tail + [1]))  # P is not published, T (after P) is
    _, num_hit = kv.get_computed_blocks(make_req("b", head_x + tail + [3]))
    assert num_hit == 16  # only X is b's prefix; a's T block holds the K/V of P + T


def test_caching_disabled_never_hits():
    kv = KVCacheManager(8, BS, enable_caching=False)
    a = make_req("a", range(48))
    admit(kv, a)
    assert admit(kv, make_req("b", range(48))) == 0
    assert kv.pool.cached == {} and all(b.block_hash is None for b in kv.pool.blocks)
    kv.free(a)
    assert kv.get_computed_blocks(make_req("c", range(48))) == ([], 0)
    assert kv.pool.num_cache_queries == 0


def test_reset_prefix_cache_forgets_every_hash():
    kv = KVCacheManager(8, BS)
    a = make_req("a", range(48))
    admit(kv, a)
    kv.free(a)
    kv.reset_prefix_cache()
    assert kv.pool.cached == {} and all(b.block_hash is None for b in kv.pool.blocks)
    assert admit(kv, make_req("b", range(48))) == 0
