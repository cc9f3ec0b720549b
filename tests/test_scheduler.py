"""Exact step-by-step behaviour of engine/core/scheduler.py and engine/core/request.py (no torch)."""
from __future__ import annotations

import random

import pytest

from engine.core.kv_cache_manager import KVCacheManager
from engine.core.request import Request, RequestStatus
from engine.core.sampling_params import SamplingParams
from engine.core.scheduler import Scheduler

TOKEN = 7  # every sampled token, unless a test says otherwise


def make_req(rid: str, num_prompt: int, max_tokens: int = 16, start: int = 1000,
             eos: frozenset[int] = frozenset(), max_model_len: int | None = None,
             **params) -> Request:
    # Distinct `start`s keep prompts apart, so no test gets an accidental prefix hit.
    params = SamplingParams(max_tokens=max_tokens, temperature=0, **params)
    return Request(rid, list(range(start, start + num_prompt)), params,
                   eos_token_ids=eos, max_model_len=max_model_len)


def make_sched(num_blocks: int = 64, block_size: int = 16, max_num_seqs: int = 8,
               budget: int = 256, caching: bool = True, **kw) -> Scheduler:
    return Scheduler(KVCacheManager(num_blocks, block_size, caching), max_num_seqs, budget, **kw)


def step(sched: Scheduler):
    """One engine step; returns [(rid, num_tokens)], the rids that sampled, the preempted rids."""
    out = sched.schedule()
    scheduled = [(s.request.request_id, s.num_tokens) for s in out.scheduled]
    sampling = [s.request.request_id for s in out.scheduled if s.samples]  # before the update
    sched.update_from_output(out, {rid: TOKEN for rid in sampling})
    return scheduled, sampling, [r.request_id for r in out.preempted]


def run_to_end(sched: Scheduler, max_steps: int = 100) -> None:
    for _ in range(max_steps):
        if not sched.has_unfinished:
            return
        step(sched)
    assert not sched.has_unfinished


def assert_no_leak(sched: Scheduler) -> None:
    pool = sched.kv_cache.pool
    assert not sched.has_unfinished and not sched.requests
    assert pool.num_free_blocks == pool.num_blocks
    assert all(b.ref_cnt == 0 for b in pool.blocks)
    assert not sched.kv_cache.req_blocks


def num_blocks_of(sched: Scheduler, rid: str) -> int:
    return len(sched.kv_cache.block_ids(rid))


# ---- token budget and batching ------------------------------------------------------------

def test_token_budget_chunks_prefill_running_first():
    sched = make_sched(budget=32)
    a, b = make_req("a", 50, max_tokens=3), make_req("b", 10, max_tokens=3, start=2000)
    sched.add_request(a)
    sched.add_request(b)

    assert step(sched) == ([("a", 32)], [], [])
    assert a.num_computed_tokens == 32 and a.num_tokens == 50
    assert b.status is RequestStatus.WAITING and num_blocks_of(sched, "b") == 0

    assert step(sched) == ([("a", 18), ("b", 10)], ["a", "b"], [])
    assert (a.num_computed_tokens, a.num_tokens) == (50, 51)
    assert (b.num_computed_tokens, b.num_tokens) == (10, 11)

    assert step(sched) == ([("a", 1), ("b", 1)], ["a", "b"], [])
    assert (a.num_computed_tokens, b.num_computed_tokens) == (51, 11)
    assert step(sched) == ([("a", 1), ("b", 1)], ["a", "b"], [])
    assert a.output_token_ids == b.output_token_ids == [TOKEN] * 3
    assert a.status is b.status is RequestStatus.FINISHED_LENGTH
    assert_no_leak(sched)


def test_max_num_seqs_caps_running_requests():
    sched = make_sched(max_num_seqs=2)
    for i, rid in enumerate("abc"):
        sched.add_request(make_req(rid, 5, max_tokens=2, start=1000 * (i + 1)))
    assert step(sched)[0] == [("a", 5), ("b", 5)]
    assert [r.request_id for r in sched.waiting] == ["c"]
    assert step(sched)[0] == [("a", 1), ("b", 1)]  # budget left, but 2 are running
    assert step(sched)[0] == [("c", 5)]
    assert step(sched)[0] == [("c", 1)]
    assert_no_leak(sched)


def test_decodes_and_prefill_chunks_share_a_step():
    sched = make_sched(budget=16)
    a = make_req("a", 4, max_tokens=5)
    sched.add_request(a)
    assert step(sched) == ([("a", 4)], ["a"], [])
    b = make_req("b", 40, max_tokens=2, start=2000)
    sched.add_request(b)
    assert step(sched) == ([("a", 1), ("b", 15)], ["a"], [])
    assert step(sched) == ([("a", 1), ("b", 15)], ["a"], [])
    assert step(sched) == ([("a", 1), ("b", 10)], ["a", "b"], [])
    assert b.num_computed_tokens == 40 and b.num_output_tokens == 1
    assert step(sched) == ([("a", 1), ("b", 1)], ["a", "b"], [])
    assert a.status is b.status is RequestStatus.FINISHED_LENGTH
    assert_no_leak(sched)


def add_60_and_40_blocks(sched: Scheduler) -> None:
    sched.add_request(make_req("a", 16 * 60, max_tokens=2))
    sched.add_request(make_req("b", 16 * 40, max_tokens=1, start=5000))


def test_watermark_keeps_spare_blocks_while_others_run():
    sched = make_sched(num_blocks=100, budget=2000)  # watermark 1% of 100 = 1 block
    assert sched.watermark_blocks == 1
    add_60_and_40_blocks(sched)  # b needs exactly the 40 blocks a leaves
    assert step(sched)[0] == [("a", 960)]
    assert step(sched)[0] == [("a", 1)]  # a finishes here
    assert step(sched)[0] == [("b", 640)]  # alone it may use every block
    assert_no_leak(sched)

    sched = make_sched(num_blocks=100, budget=2000, watermark=0.0)
    add_60_and_40_blocks(sched)
    assert step(sched)[0] == [("a", 960), ("b", 640)]


def test_watermark_does_not_count_shared_hit_blocks():
    sched = make_sched(num_blocks=4)  # watermark 0 blocks
    sched.add_request(make_req("a", 40, max_tokens=5))
    sched.add_request(make_req("b", 40, max_tokens=5))  # an n=2 sibling: same prompt
    # a: 3 blocks. b: hits a's 2 full blocks and needs only 1 more, which is free.
    assert step(sched)[0] == [("a", 40), ("b", 8)]


# ---- prefix hits through the scheduler ------------------------------------------------------

def test_admission_counts_cached_prompt_tokens():
    sched = make_sched()
    sched.add_request(make_req("a", 40, max_tokens=1))
    run_to_end(sched)
    b = make_req("b", 45, max_tokens=1)  # same first 40 tokens as a
    sched.add_request(b)
    out = sched.schedule()
    assert [(s.request.request_id, s.num_tokens, s.samples) for s in out.scheduled] == [
        ("b", 13, True)]
    assert b.num_computed_tokens == b.num_cached_tokens == 32


def test_requests_admitted_together_hit_each_others_blocks():
    sched = make_sched()
    a, b = make_req("a", 40, max_tokens=1), make_req("b", 40, max_tokens=1)  # n=2 siblings
    sched.add_request(a)
    sched.add_request(b)
    assert step(sched)[0] == [("a", 40), ("b", 8)]
    assert b.num_cached_tokens == 32
    assert_no_leak(sched)


# ---- preemption -------------------------------------------------------------------------------

def test_preemption_frees_the_newest_and_the_oldest_keeps_going():
    # 4 blocks of 4 slots: two 6-token prompts fill them at 8 tokens each.
    sched = make_sched(num_blocks=4, block_size=4, caching=False)
    a, b = make_req("a", 6, max_tokens=5), make_req("b", 6, max_tokens=5, start=2000)
    sched.add_request(a)
    sched.add_request(b)
    assert step(sched) == ([("a", 6), ("b", 6)], ["a", "b"], [])
    assert step(sched) == ([("a", 1), ("b", 1)], ["a", "b"], [])
    assert step(sched) == ([("a", 1), ("b", 1)], ["a", "b"], [])
    assert sched.kv_cache.num_free_blocks == 0

    assert step(sched) == ([("a", 1)], ["a"], ["b"])  # a's 9th token needs a fifth block
    assert b.status is RequestStatus.PREEMPTED and b.num_preemptions == 1
    assert b.num_computed_tokens == 0 and b.num_tokens == 9
    assert list(sched.waiting) == [b] and sched.running == [a]
    assert num_blocks_of(sched, "b") == 0 and num_blocks_of(sched, "a") == 3
    assert sched.num_preemptions == 1

    assert step(sched) == ([("a", 1)], ["a"], [])  # b needs 3 blocks, 1 is free
    assert a.status is RequestStatus.FINISHED_LENGTH
    assert step(sched) == ([("b", 9)], ["b"], [])  # prompt + 3 outputs recomputed
    assert step(sched) == ([("b", 1)], ["b"], [])
    assert a.num_output_tokens == b.num_output_tokens == 5
    assert b.status is RequestStatus.FINISHED_LENGTH and b.num_cached_tokens == 0
    assert_no_leak(sched)


def test_no_admission_in_a_step_that_preempted():
    # b's second prefill chunk does not fit, but its first chunk again would.
    sched = make_sched(num_blocks=4, block_size=4, budget=8, caching=False)
    a, b = make_req("a", 4, max_tokens=3), make_req("b", 12, max_tokens=2, start=2000)
    sched.add_request(a)
    sched.add_request(b)
    assert step(sched) == ([("a", 4), ("b", 4)], ["a"], [])
    assert step(sched) == ([("a", 1)], ["a"], ["b"])  # b (7 tokens) needs 2 blocks, 1 free
    assert b.num_computed_tokens == 0 and list(sched.waiting) == [b]
    assert sched.kv_cache.num_free_blocks == 2
    assert step(sched) == ([("a", 1), ("b", 7)], ["a"], [])
    assert step(sched) == ([("b", 5)], ["b"], [])
    assert step(sched) == ([("b", 1)], ["b"], [])
    assert b.status is RequestStatus.FINISHED_LENGTH and b.num_preemptions == 1
    assert_no_leak(sched)


def test_preempted_request_shares_its_prefix_again():
    # a and b share every block but their last.
    sched = make_sched(num_blocks=4, block_size=4)
    a, b = make_req("a", 6, max_tokens=5), make_req("b", 6, max_tokens=5)
    sched.add_request(a)
    sched.add_request(b)
    assert step(sched)[0] == [("a", 6), ("b", 2)]  # b hits a's first block
    assert step(sched)[0] == [("a", 1), ("b", 1)]
    assert step(sched)[0] == [("a", 1), ("b", 1)]
    c = make_req("c", 1, max_tokens=1, start=3000)
    sched.add_request(c)
    assert step(sched) == ([("a", 1)], ["a"], ["b"])  # b itself ran out of blocks
    assert [r.request_id for r in sched.waiting] == ["b", "c"]
    assert sched.kv_cache.num_free_blocks == 1
    run_to_end(sched)
    assert a.token_ids == b.token_ids and b.num_output_tokens == 5
    assert b.num_preemptions == 1 and c.num_output_tokens == 1
    assert b.num_cached_tokens == 4  # counted at first admission, not at readmission
    assert_no_leak(sched)


def test_big_head_of_queue_blocks_smaller_ones_behind_it():
    sched = make_sched(num_blocks=4)
    sched.add_request(make_req("a", 40, max_tokens=2))
    sched.add_request(make_req("big", 40, max_tokens=1, start=2000))
    sched.add_request(make_req("small", 5, max_tokens=1, start=3000))
    assert step(sched)[0] == [("a", 40)]  # 1 block free: small would fit, big does not
    assert [r.request_id for r in sched.waiting] == ["big", "small"]
    assert step(sched)[0] == [("a", 1)]
    assert step(sched)[0] == [("big", 40), ("small", 5)]
    assert_no_leak(sched)


# ---- finishing -------------------------------------------------------------------------------

def test_max_tokens_finishes_with_length_and_frees_blocks():
    sched = make_sched(num_blocks=8)
    a = make_req("a", 20, max_tokens=2)
    sched.add_request(a)
    step(sched)
    assert a.status is RequestStatus.RUNNING and sched.kv_cache.num_free_blocks == 6
    step(sched)
    assert a.status is RequestStatus.FINISHED_LENGTH and a.status.finish_reason == "length"
    assert a.output_token_ids == [TOKEN, TOKEN]
    assert_no_leak(sched)


def test_eos_finishes_with_stop():
    sched = make_sched()
    a = make_req("a", 5, max_tokens=10, eos=frozenset({TOKEN}))
    sched.add_request(a)
    step(sched)
    assert a.status is RequestStatus.FINISHED_STOPPED and a.stop_reason is None
    assert a.output_token_ids == [TOKEN]
    assert_no_leak(sched)


def test_stop_token_id_finishes_with_its_reason():
    sched = make_sched()
    a = make_req("a", 5, max_tokens=10, stop_token_ids=[TOKEN])
    sched.add_request(a)
    step(sched)
    assert a.status is RequestStatus.FINISHED_STOPPED and a.stop_reason == TOKEN
    assert_no_leak(sched)


def test_ignore_eos_drops_the_eos_set():
    a = make_req("a", 5, max_tokens=2, eos=frozenset({TOKEN}), ignore_eos=True)
    assert a.eos_token_ids == frozenset()


def test_min_tokens_delays_eos():
    sched = make_sched()
    a = make_req("a", 5, max_tokens=10, min_tokens=3, eos=frozenset({TOKEN}))
    sched.add_request(a)
    assert [step(sched)[1] for _ in range(2)] == [["a"], ["a"]]
    assert a.status is RequestStatus.RUNNING and a.num_output_tokens == 2
    step(sched)
    assert a.status is RequestStatus.FINISHED_STOPPED and a.num_output_tokens == 3
    assert_no_leak(sched)


def test_max_model_len_caps_max_tokens():
    assert make_req("a", 15, max_tokens=100, max_model_len=20).max_tokens == 5
    assert make_req("b", 25, max_tokens=100, max_model_len=20).max_tokens == 1
    assert make_req("c", 15, max_tokens=None, max_model_len=20).max_tokens == 5
    assert make_req("d", 15, max_tokens=3, max_model_len=20).max_tokens == 3


def test_abort_waiting_and_running_requests():
    sched = make_sched(budget=20)
    a, b = make_req("a", 30, max_tokens=5), make_req("b", 10, max_tokens=5, start=2000)
    sched.add_request(a)
    sched.add_request(b)
    assert step(sched)[0] == [("a", 20)]
    assert sched.finish_request("b", RequestStatus.FINISHED_ABORTED) is b
    assert b.status.finish_reason == "abort" and not sched.waiting
    assert sched.finish_request("a", RequestStatus.FINISHED_ABORTED) is a
    assert a.is_finished and not sched.running
    assert sched.finish_request("a", RequestStatus.FINISHED_ABORTED) is None
    assert sched.finish_request("nope", RequestStatus.FINISHED_ABORTED) is None
    assert sched.schedule().is_empty
    assert_no_leak(sched)


def test_abort_a_preempted_request():
    sched = make_sched(num_blocks=4, block_size=4, caching=False)
    sched.add_request(make_req("a", 6, max_tokens=5))
    sched.add_request(make_req("b", 6, max_tokens=5, start=2000))
    for _ in range(3):
        step(sched)
    assert step(sched)[2] == ["b"]
    assert sched.finish_request("b", RequestStatus.FINISHED_ABORTED) is not None
    run_to_end(sched)
    assert_no_leak(sched)


def test_duplicate_request_id_is_refused():
    sched = make_sched()
    sched.add_request(make_req("a", 3))
    with pytest.raises(ValueError):
        sched.add_request(make_req("a", 3))


# ---- random workload --------------------------------------------------------------------------

def check_invariants(sched: Scheduler, scheduled: list[tuple[str, int]]) -> None:
    kv, pool = sched.kv_cache, sched.kv_cache.pool
    assert sum(n for _, n in scheduled) <= sched.max_num_batched_tokens
    assert all(n >= 1 for _, n in scheduled) and len(set(r for r, _ in scheduled)) == len(scheduled)
    assert len(sched.running) <= sched.max_num_seqs
    holders = [0] * pool.num_blocks
    for rid, blocks in kv.req_blocks.items():
        for b in blocks:
            holders[b.block_id] += 1
    assert [b.ref_cnt for b in pool.blocks] == holders
    assert set(pool.free_queue) == {i for i, n in enumerate(holders) if n == 0}
    assert set(kv.req_blocks) == {r.request_id for r in sched.running}
    for req in sched.running:
        assert req.status is RequestStatus.RUNNING
        assert len(kv.req_blocks[req.request_id]) == -(-req.num_computed_tokens // kv.block_size)
        assert req.num_computed_tokens < req.num_tokens
    for req in sched.waiting:
        assert req.num_computed_tokens == 0 and req.status in (
            RequestStatus.WAITING, RequestStatus.PREEMPTED)
    for h, b in pool.cached.items():
        assert b.block_hash == h


@pytest.mark.parametrize("seed", range(8))
def test_random_workload_keeps_invariants(seed):
    rng = random.Random(seed)
    block_size = 4
    # 12 blocks hold any one request (<= 30 prompt + 10 output tokens), not many at once.
    sched = make_sched(num_blocks=12, block_size=block_size, max_num_seqs=3,
                       budget=rng.choice([8, 16, 33]), caching=seed % 2 == 0)
    prefixes = [[rng.randrange(50) for _ in range(12)] for _ in range(3)]
    reqs, aborted = [], set()
    for _ in range(400):
        if len(reqs) < 25 and rng.random() < 0.3:
            prompt = (rng.choice(prefixes) + [rng.randrange(50) for _ in range(18)])
            prompt = prompt[:rng.randint(1, 30)]
            params = SamplingParams(max_tokens=rng.randint(1, 10), temperature=0)
            req = Request(f"r{len(reqs)}", prompt, params, eos_token_ids=frozenset({0}))
            reqs.append(req)
            sched.add_request(req)
        if sched.requests and rng.random() < 0.03:
            rid = rng.choice(sorted(sched.requests))
            sched.finish_request(rid, RequestStatus.FINISHED_ABORTED)
            aborted.add(rid)
        was_running = {r.request_id for r in sched.running}
        out = sched.schedule()
        scheduled = [(s.request.request_id, s.num_tokens) for s in out.scheduled]
        sampled = {s.request.request_id: rng.randrange(40) for s in out.scheduled if s.samples}
        preempted = {r.request_id for r in out.preempted}
        assert preempted <= was_running and not preempted & {r for r, _ in scheduled}
        if preempted:  # nobody admitted in a step that preempted
            assert {r for r, _ in scheduled} <= was_running
        sched.update_from_output(out, sampled)
        check_invariants(sched, scheduled)
        if len(reqs) == 25 and not sched.has_unfinished:
            break
    assert len(reqs) == 25 and not sched.has_unfinished
    for req in reqs:
        if req.request_id in aborted:
            assert req.status is RequestStatus.FINISHED_ABORTED
        elif req.status is RequestStatus.FINISHED_LENGTH:
            assert req.num_output_tokens == req.max_tokens
        else:
            assert req.status is RequestStatus.FINISHED_STOPPED and req.output_token_ids[-1] == 0
    assert_no_leak(sched)
