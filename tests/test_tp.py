"""Tensor parallelism on CPU (gloo, spawned worker processes): tp=2 against tp=1 on tiny
random Llama (GQA), Qwen2 (biases) and Qwen3 (q/k norms, fewer KV heads than ranks) through
chunked prefill, prefix hits, preemption and aborts; the real SmolLM2 at tp=3; collectives
counted; step traffic bounded; nothing left behind; a killed worker fails the engine fast."""
from __future__ import annotations

import gc
import os
import pickle
import random
import signal
import socket
import time

import pytest
from conftest import TINY_VOCAB
from procs import children_of

from engine import LLM, SamplingParams
from engine.distributed.step import StepInput, TableMirror, TableSender
from engine.distributed.tp import Shards

NEW = 12


def children() -> list[int]:
    return children_of(os.getpid())


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


# ---- plain Python: shards and step traffic ----------------------------------------------
def test_shards_split_heads_columns_and_vocab():
    s = Shards(1, 3, num_heads=9, num_kv_heads=3, intermediate=1536, vocab=49152)
    assert s.heads == (3, 3) and s.kv_heads == (1, 1) and s.columns == (512, 512)
    assert s.vocab_rows == (16384, 16384)
    # more ranks than KV heads: each KV head is replicated on the ranks whose queries use it
    assert [Shards(r, 4, 8, 2, 64, 10).kv_heads for r in range(4)] == [(0, 1), (0, 1),
                                                                       (1, 1), (1, 1)]
    assert Shards(2, 3, 9, 3, 12, 10).vocab_rows == (8, 4)  # the last rank is padded
    for bad, needle in (((0, 2, 9, 3, 8, 10), "9 attention heads"),
                        ((0, 4, 12, 6, 8, 10), "6 KV heads"),
                        ((0, 2, 8, 2, 7, 10), "7 columns")):
        with pytest.raises(ValueError, match=needle):
            Shards(*bad)


def test_tables_travel_as_differences():
    sender, a, b = TableSender(), TableMirror(), TableMirror()
    steps = [
        ([("r1", [1, 2, 3], 0), ("r2", [4], 0)], [[7], [8]]),
        ([("r1", [5], 3), ("r2", [6], 1)], [[7], [8]]),
        ([("r1", [9], 16)], [[7, 9]]),  # a block appended
        ([("r2", [4, 6], 0)], [[3]]),  # r2 preempted, back on another block: whole table
    ]
    for seqs, tables in steps:
        step = sender.encode(seqs, tables, [0])
        assert a.apply(step) == tables
    assert step.new_tables == {"r2": [3]} and not step.appended
    sender.drop("r1")
    step = sender.encode([("r2", [1], 2)], [[3]], [0])
    assert step.dropped == ["r1"] and not step.new_tables and not step.appended
    a.apply(step)
    assert "r1" not in a.tables and b.tables == {}


def test_decode_step_input_stays_small_at_any_context():
    """32 decoding sequences: the bytes sent per step do not grow with their context."""
    for context in (1_000, 100_000):
        sender = TableSender()
        blocks = context // 16
        tables = [list(range(i * blocks, (i + 1) * blocks)) for i in range(32)]
        seqs = [(f"cmpl-{i:08x}-0", [17], context) for i in range(32)]
        sender.encode(seqs, tables, list(range(32)))  # first sight: whole tables, once
        sizes = []
        for step in range(20):
            pos = context + 1 + step
            grown = [t + [10**7 + i] if pos % 16 == 0 else t for i, t in enumerate(tables)]
            seqs = [(rid, [17], pos) for rid, _, _ in seqs]
            sizes.append(len(pickle.dumps(sender.encode(seqs, grown, list(range(32))))))
            tables = grown
        assert max(sizes) < 64 * 1024, (context, max(sizes))
    assert isinstance(StepInput([], []), StepInput)


def test_ray_placement_packs_one_node_when_it_can():
    from engine.distributed.workers import placement_strategy

    nodes = [{"Alive": True, "NodeManagerAddress": "10.0.0.1", "Resources": {"CPU": 4.0}},
             {"Alive": True, "NodeManagerAddress": "10.0.0.2", "Resources": {"CPU": 8.0}},
             {"Alive": False, "NodeManagerAddress": "10.0.0.3", "Resources": {"CPU": 64.0}}]
    assert placement_strategy(nodes, "10.0.0.1", 3) == "STRICT_PACK"
    assert placement_strategy(nodes, "10.0.0.1", 7) == "PACK"  # spills onto 10.0.0.2
    assert placement_strategy(nodes, "10.0.0.3", 7) == "PACK"  # rank 0's node is not in Ray


# ---- tp=2 against tp=1 on tiny models --------------------------------------------------
def prompts(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(TINY_VOCAB) for _ in range(40)]  # a prefix-cache hit
    return [[rng.randrange(TINY_VOCAB) for _ in range(n)] for n in (3, 29, 61)] + \
        [shared + [1, 2], shared + [3]]


def run(llm: LLM, prompt_list, seed=0):
    """Greedy and seeded-sampled outputs with logprobs, and one request aborted mid-way."""
    params = [SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True, logprobs=3,
                             prompt_logprobs=2),
              SamplingParams(temperature=0.9, seed=seed, max_tokens=NEW, ignore_eos=True)]
    engine = llm.engine
    for i, p in enumerate(prompt_list):
        engine.add_request(f"r{i}", {"prompt_token_ids": p}, params[i % 2])
    engine.add_request("doomed", {"prompt_token_ids": prompt_list[0]}, params[0])
    outs, steps = {}, 0
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                outs[o.request_id] = o
        steps += 1
        if steps == 3:
            engine.abort_request("doomed")
    assert "doomed" not in outs
    pool = engine.kv_cache.pool
    assert pool.num_free_blocks == pool.num_blocks  # nothing leaked, on rank 0's books
    return [outs[f"r{i}"] for i in range(len(prompt_list))]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tp2_equals_tp1(tiny_models, arch):
    path, _ = tiny_models(arch)
    # small budgets: chunked prefill (16 tokens a step) and preemption (20 blocks of 4)
    kw = dict(skip_tokenizer_init=True, dtype="float32", num_kv_blocks=20, block_size=4,
              max_num_batched_tokens=16, max_num_seqs=4)
    ref = run(LLM(path, **kw), prompts(1))
    tp = LLM(path, tensor_parallel_size=2, **kw)
    try:
        got = run(tp, prompts(1))
        assert tp.engine.scheduler.num_preemptions > 0
        assert tp.engine.get_stats()["prefix_cache_hits"] > 0
        assert any(o.prompt_logprobs for o in got)  # the prompt-logprob rows ran under TP
        for a, b in zip(ref, got):
            assert a.outputs[0].token_ids == b.outputs[0].token_ids
            assert (a.prompt_logprobs is None) == (b.prompt_logprobs is None)
            for pa, pb in zip(a.prompt_logprobs or [], b.prompt_logprobs or []):
                assert (pa is None) == (pb is None)
                if pa is not None:
                    assert pa.keys() == pb.keys()
                    assert all(abs(pa[t].logprob - pb[t].logprob) < 1e-4 for t in pa)
            for la, lb in zip(a.outputs[0].logprobs or [], b.outputs[0].logprobs or []):
                assert la.keys() == lb.keys()
                assert all(abs(la[t].logprob - lb[t].logprob) < 1e-4 for t in la)
    finally:
        tp.shutdown()
    assert not children()


def prompt_logprobs(llm: LLM, prompt_list) -> list[float]:
    """Teacher-forced logprob of every prompt token after the first (no divergence to
    follow, unlike greedy text)."""
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompt_list], params,
                        use_tqdm=False)
    return [entry[tok].logprob for o, p in zip(outs, prompt_list)
            for entry, tok in zip(o.prompt_logprobs[1:], p[1:])]


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_shards_are_as_close_to_fp32_as_one_process(tiny_models, quant):
    """Quantization per shard cannot be bit-equal to one process (a row-parallel shard's
    weight rows, int4 groups' bf16 outputs and W8A8's per-token activation scales cover only
    its own columns), so the oracle is the fp32 model: tp=2 quantized must be as close to it
    as tp=1 quantized is, on average and at the worst token."""
    path, _ = tiny_models("llama")
    kw = dict(skip_tokenizer_init=True, dtype="float32", num_kv_blocks=64, block_size=4)
    prompt_list = prompts(2)
    exact = prompt_logprobs(LLM(path, **kw), prompt_list)
    kw["quantization"] = quant
    if quant == "int4":
        kw["int4_max_rows"] = 1024  # int4 for the prefill rows too, not only small batches
    one = prompt_logprobs(LLM(path, **kw), prompt_list)
    tp = LLM(path, tensor_parallel_size=2, **kw)
    try:
        two = prompt_logprobs(tp, prompt_list)
    finally:
        tp.shutdown()

    def mean_err(xs):
        return sum(abs(a - b) for a, b in zip(xs, exact)) / len(exact)

    def max_err(xs):
        return max(abs(a - b) for a, b in zip(xs, exact))

    assert mean_err(one) > 1e-3 and mean_err(two) > 0.2 * mean_err(one)  # both quantized
    assert mean_err(two) < 1.5 * mean_err(one) + 1e-3, (mean_err(two), mean_err(one))
    assert max_err(two) < 1.5 * max_err(one) + 1e-3, (max_err(two), max_err(one))
    assert not children()


def test_a_sampling_failure_fails_that_request_alone(tiny_models):
    """A failure after the forward pass (rank 0's sampler) is isolated as in one process:
    halves of the step re-run on every rank, the culprit fails, the rest equal tp=1."""
    from engine.core import faults

    path, _ = tiny_models("llama")
    kw = dict(skip_tokenizer_init=True, dtype="float32", num_kv_blocks=64, block_size=4)
    prompt_list = prompts(3)[:4]
    params = [SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True, seed=s)
              for s in (1, 2, 666, 3)]
    want = LLM(path, **kw).generate([{"prompt_token_ids": p} for p in prompt_list], params,
                                    use_tqdm=False)
    tp = LLM(path, tensor_parallel_size=2, **kw)
    faults.configure("sample:666")
    try:
        got = tp.generate([{"prompt_token_ids": p} for p in prompt_list], params,
                          use_tqdm=False)
        assert got[2].outputs[0].finish_reason == "error"
        for i in (0, 1, 3):
            assert got[i].outputs[0].token_ids == want[i].outputs[0].token_ids
        faults.configure(None)
        again = tp.generate([{"prompt_token_ids": prompt_list[2]}], params[2], use_tqdm=False)
        assert again[0].outputs[0].token_ids == want[2].outputs[0].token_ids  # still serving
        pool = tp.engine.kv_cache.pool
        assert pool.num_free_blocks == pool.num_blocks
    finally:
        faults.configure(None)
        tp.shutdown()
    assert not children()


def test_collectives_per_forward(tiny_models):
    path, _ = tiny_models("llama")
    llm = LLM(path, skip_tokenizer_init=True, dtype="float32", num_kv_blocks=32,
              tensor_parallel_size=2)
    try:
        engine, tp = llm.engine, llm.engine.runner.tp
        engine.add_request("a", {"prompt_token_ids": [1, 2, 3, 4]},
                           SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
        counts = []
        while engine.has_unfinished_requests():
            before = tp.num_collectives
            engine.step()
            counts.append(tp.num_collectives - before)
        layers = engine.model_config.num_hidden_layers
        assert counts == [2 * layers + 2] * 3  # per layer 2, the embedding, the logits
        assert engine.runner.num_blocks == 32
    finally:
        llm.shutdown()


def test_activations_on_their_own_group(tiny_models, monkeypatch):
    """The CUDA layout (NCCL for activations beside gloo for step inputs), wired on CPU with
    a second gloo group: every activation collective goes to the device group, the step
    inputs stay on the CPU one, and the tokens equal tp=1."""
    monkeypatch.setenv("KVSERVE_TP_DEVICE_GROUP", "gloo")  # read by every rank at start
    path, _ = tiny_models("llama")
    kw = dict(skip_tokenizer_init=True, dtype="float32", num_kv_blocks=32)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompt = [{"prompt_token_ids": [5, 6, 7, 8, 9]}]
    want = LLM(path, **kw).generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
    llm = LLM(path, tensor_parallel_size=2, **kw)
    try:
        tp = llm.engine.runner.tp
        assert tp.device_pg is not None and tp.device_pg is not tp.pg
        got = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
        assert got == want
        assert tp.num_device_collectives == tp.num_collectives > 0
    finally:
        llm.shutdown()
    assert not children()


def test_lifecycle_nothing_left_and_two_engines_side_by_side(tiny_models):
    path, _ = tiny_models("llama")
    kw = dict(skip_tokenizer_init=True, dtype="float32", num_kv_blocks=16,
              tensor_parallel_size=2)
    a, b = LLM(path, **kw), LLM(path, **kw)
    ports = [a.engine.workers.store.port, b.engine.workers.store.port]
    assert len(children()) == 2
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    out_a = a.generate([[5, 6, 7]], params, use_tqdm=False)[0].outputs[0].token_ids
    assert b.generate([[5, 6, 7]], params, use_tqdm=False)[0].outputs[0].token_ids == out_a
    a.shutdown()
    del b  # garbage collection alone reaps its workers
    gc.collect()
    deadline = time.monotonic() + 10
    while children() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not children()
    assert not any(port_in_use(p) for p in ports)


def test_a_killed_worker_fails_the_engine_fast(tiny_models):
    from engine.distributed.workers import WorkerDiedError

    path, _ = tiny_models("llama")
    llm = LLM(path, skip_tokenizer_init=True, dtype="float32", num_kv_blocks=16,
              tensor_parallel_size=2)
    try:
        worker = llm.engine.workers.procs[0]
        os.kill(worker.pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(WorkerDiedError, match="kvserve-tp-rank1"):
            llm.generate([[1, 2, 3]], SamplingParams(max_tokens=8), use_tqdm=False)
        assert time.monotonic() - t0 < 30
    finally:
        llm.shutdown()
    assert not children()


def test_smollm2_tp3_equals_tp1(smol_llm):
    prompts_text = ["The capital of France is", "def fibonacci(n):"]
    params = SamplingParams(temperature=0, max_tokens=10)
    want = [o.outputs[0].text for o in smol_llm.generate(prompts_text, params, use_tqdm=False)]
    tp = LLM(dtype="float32", tensor_parallel_size=3, kv_cache_memory_bytes=64 << 20)
    try:
        assert [o.outputs[0].text for o in tp.generate(prompts_text, params,
                                                       use_tqdm=False)] == want
    finally:
        tp.shutdown()
    assert not children()


@pytest.mark.parametrize("size, needle", [(0, "at least 1"), (-2, "at least 1"),
                                          (3, "does not divide the 4 attention heads"),
                                          (1 << 20, "does not divide")])
def test_bad_sizes_fail_before_anything_starts(tiny_models, size, needle):
    path, _ = tiny_models("llama")
    with pytest.raises(ValueError, match=needle):
        LLM(path, skip_tokenizer_init=True, tensor_parallel_size=size)
    assert not children()
    with pytest.raises(ValueError, match="not supported with tensor_parallel_size"):
        LLM(path, skip_tokenizer_init=True, tensor_parallel_size=2, cpu_compile=True)


@pytest.mark.slow
def test_ray_executor_equals_tp1(tiny_models):
    """Ranks 1.. as Ray actors in a placement group, on a local Ray of 2 CPUs."""
    ray = pytest.importorskip("ray")
    path, _ = tiny_models("qwen2")
    kw = dict(skip_tokenizer_init=True, dtype="float32", num_kv_blocks=20, block_size=4,
              max_num_batched_tokens=16, max_num_seqs=4)
    ref = run(LLM(path, **kw), prompts(2))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        tp = LLM(path, tensor_parallel_size=2, distributed_executor_backend="ray", **kw)
        try:
            got = run(tp, prompts(2))
            assert [o.outputs[0].token_ids for o in got] == \
                [o.outputs[0].token_ids for o in ref]
        finally:
            tp.shutdown()
        assert ray.util.placement_group_table() and all(
            g["state"] == "REMOVED" for g in ray.util.placement_group_table().values())
    finally:
        ray.shutdown()
    assert not children()
