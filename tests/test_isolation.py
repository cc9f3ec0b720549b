"""A request that fails inside a step fails alone; bad requests leave no trace; the
waiting queue and the request streams stay bounded. Engine-level, on a tiny model."""
from __future__ import annotations

import asyncio

import pytest
from conftest import assert_no_leak

from engine import EngineConfig, LLMEngine, SamplingParams, faults
from engine.async_engine import AsyncLLMEngine, RequestStream
from engine.core.request import Request
from engine.core.scheduler import WaitingQueue
from engine.outputs import RequestOutput

FAULTY_SEED = 777001
FATAL_SEED = 777002


@pytest.fixture(scope="module")
def engine(tiny_models):
    return LLMEngine(EngineConfig(model=tiny_models("llama")[0], skip_tokenizer_init=True,
                                  num_kv_blocks=64, max_num_seqs=8))


@pytest.fixture
def inject():
    yield faults.configure
    faults.configure(None)


# Greedy, seeded-random (its generator must be rewound when the step is re-run) and
# n=2 seeded, all in the same steps as the faulty request.
GOOD = {
    "greedy": ([1, 2, 3, 4, 5, 6], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)),
    "seeded": ([7, 8, 9], SamplingParams(temperature=1.0, top_p=0.9, seed=5, max_tokens=12,
                                         ignore_eos=True)),
    "pair": ([3, 1, 4, 1, 5, 9, 2, 6, 5], SamplingParams(temperature=0.8, seed=11, n=2,
                                                          max_tokens=12, ignore_eos=True)),
}


def run(engine, requests: dict) -> dict:
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return done


def tokens(out: RequestOutput):
    return [(c.token_ids, c.finish_reason) for c in out.outputs]


@pytest.mark.parametrize("faulty_n", [1, 3])
def test_sampling_fault_fails_that_request_alone(engine, inject, faulty_n):
    reference = {rid: tokens(o) for rid, o in run(engine, GOOD).items()}
    inject(f"sample:{FAULTY_SEED}")
    bad = SamplingParams(temperature=0, seed=FAULTY_SEED, n=faulty_n, max_tokens=12)
    done = run(engine, {**GOOD, "bad": ([2, 7, 1, 8, 2, 8], bad)})
    assert done["bad"].error and "injected sampling fault" in done["bad"].error
    assert [c.finish_reason for c in done["bad"].outputs] == ["error"] * faulty_n
    assert {rid: tokens(done[rid]) for rid in GOOD} == reference
    assert_no_leak(engine)
    # and the engine goes on serving exactly
    assert {rid: tokens(o) for rid, o in run(engine, GOOD).items()} == reference


def test_fault_mid_generation_keeps_partial_output_and_frees(engine, inject):
    # the faulty request is fine at first: the fault is switched on after a few steps
    engine.add_request("late", [5, 6, 7], SamplingParams(temperature=0, seed=FAULTY_SEED,
                                                         max_tokens=30, ignore_eos=True))
    for _ in range(4):
        engine.step()
    inject(f"sample:{FAULTY_SEED}")
    outs = [o for o in engine.step() if o.request_id == "late"]
    assert outs and outs[0].finished and outs[0].outputs[0].finish_reason == "error"
    assert 1 <= len(outs[0].outputs[0].token_ids) < 30
    assert_no_leak(engine)


def test_fatal_fault_escapes_step(engine, inject):
    inject(f"fatal:{FATAL_SEED}")
    engine.add_request("fatal", [1, 2, 3], SamplingParams(temperature=0, seed=FATAL_SEED))
    with pytest.raises(faults.EngineFatalError):
        engine.step()
    engine.abort_request("fatal")
    assert_no_leak(engine)


def test_failed_add_leaves_no_orphan(engine, monkeypatch):
    def boom(req):
        raise RuntimeError("generator trouble")
    monkeypatch.setattr(engine.runner, "add_generator", boom)
    with pytest.raises(RuntimeError):
        engine.add_request("orphan", [1, 2, 3], SamplingParams(seed=1, n=4))
    assert not engine.has_unfinished_requests() and not engine.detokenizers
    assert not engine.scheduler.requests
    assert_no_leak(engine)


@pytest.mark.parametrize("kwargs", [
    {"top_k": 2**63}, {"temperature": 10**400}, {"temperature": float("nan")},
    {"repetition_penalty": float("inf")}, {"repetition_penalty": float("nan")},
    {"seed": 2**64}, {"seed": 2**64 - 1, "n": 2}, {"n": 129}, {"stop": ["x"] * 65},
    {"stop": ["x" * 1025]}, {"stop_token_ids": [1] * 1025}, {"logprobs": 21},
    {"min_p": float("nan")}, {"top_p": float("nan")}, {"presence_penalty": float("nan")},
])
def test_sampling_params_refuse(kwargs):
    with pytest.raises(ValueError) as err:
        SamplingParams(**kwargs)
    assert next(iter(kwargs)) in str(err.value)


def test_tiny_temperature_is_greedy_and_top_k_is_checked_against_the_vocab(engine):
    assert SamplingParams(temperature=1e-50).greedy
    assert not SamplingParams(temperature=1e-4).greedy
    with pytest.raises(ValueError, match="top_k"):
        engine.add_request("k", [1, 2], SamplingParams(top_k=engine.model_config.vocab_size + 1))
    out = run(engine, {"tiny-t": ([1, 2, 3, 4, 5, 6], SamplingParams(
        temperature=1e-50, max_tokens=12, ignore_eos=True))})["tiny-t"]
    assert tokens(out) == tokens(run(engine, {"greedy": GOOD["greedy"]})["greedy"])
    assert_no_leak(engine)


def test_aborting_a_large_n_request_is_linear(engine):
    engine.add_request("wide", [1, 2, 3], SamplingParams(n=128, max_tokens=4))
    waiting = engine.scheduler.waiting
    assert len(waiting) == 128
    engine.abort_request("wide")  # 128 O(1) removals, not 128 list scans
    assert len(waiting) == 0 and list(waiting) == [] and not waiting
    assert_no_leak(engine)


def test_waiting_queue_order_and_lazy_removal():
    reqs = [Request(f"r{i}", [1], SamplingParams()) for i in range(200)]
    q = WaitingQueue()
    for r in reqs[:100]:
        q.append(r)
    q.appendleft(reqs[100])
    for r in reqs[10:90]:  # enough dead entries to trigger a compaction
        q.remove(r)
    assert list(q) == [reqs[100], *reqs[:10], *reqs[90:100]]
    assert len(q) == 21 and reqs[50] not in q and reqs[95] in q
    q.remove(reqs[100])
    assert q.peek() is reqs[0] and q.popleft() is reqs[0] and len(q) == 19
    q.append(reqs[50])  # a removed request may come back (e.g. after preemption)
    assert list(q)[-1] is reqs[50] and len(q) == 20
    with pytest.raises(ValueError):
        q.append(reqs[50])


def test_stream_keeps_only_the_newest_output():
    class Owner:
        def _forget(self, *a):
            pass

    async def main():
        stream = RequestStream(Owner(), "r")
        for i in range(10000):  # a reader that never reads holds one output, not 10000
            stream.put(RequestOutput("r", None, [1], finished=False, num_cached_tokens=i))
        first = await stream.__anext__()
        assert first.num_cached_tokens == 9999 and stream._latest is None
        stream.put(RequestOutput("r", None, [1], finished=True))
        stream.put(RuntimeError("after the last output"))
        assert (await stream.__anext__()).finished
        with pytest.raises(RuntimeError):
            await stream.__anext__()

    asyncio.run(main())


def test_admission_counts_sequences(engine):
    ae = AsyncLLMEngine(engine, max_waiting_requests=10)
    ae.check_capacity(10)
    with pytest.raises(ValueError, match="sequences"):
        ae.check_capacity(11)
    ae._adds.append(("x", {}, SamplingParams(n=8), None))
    from engine.async_engine import QueueFullError
    with pytest.raises(QueueFullError):
        ae.check_capacity(3)
    ae._adds.clear()
    ae._executor.shutdown()
