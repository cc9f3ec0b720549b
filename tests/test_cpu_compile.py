"""cpu_compile=True: decode steps through torch.compile (engine/model_executor/cpu_compile.py), against
transformers (fp32: token for token) and against the eager engine (int4), across every
batch-size range that has its own graph, with arrivals mid-decode and preemption."""
from __future__ import annotations

import pytest

from conftest import assert_no_leak, hf_greedy
from engine import SamplingParams
from kernels import cpu_attention
from test_parity_tiny import make_prompts, run, tiny_llm

pytestmark = pytest.mark.skipif(not cpu_attention.available(), reason="no C++ toolchain")
NEW_TOKENS = 20


def count_compiled_steps(llm) -> list[int]:
    """Wraps the compiled step; the list gets each compiled call's batch size."""
    compiled = llm.engine.runner._compiled
    assert compiled is not None
    sizes, step = [], compiled._step

    def counting(*args):
        sizes.append(args[0].shape[0])
        return step(*args)

    compiled._step = counting
    return sizes


def run_with_arrivals(llm, prompts, arrivals):
    """Prompts 0..k start at once; prompt i > k is added before step arrivals[i]."""
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    results, step = {}, 0
    for i, p in enumerate(prompts):
        if arrivals.get(i, 0) == 0:
            engine.add_request(f"r{i}", p, params)
    while engine.has_unfinished_requests():
        for i, at in arrivals.items():
            if at == step and at > 0:
                engine.add_request(f"r{i}", prompts[i], params)
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out.outputs[0].token_ids
        step += 1
    return [results[f"r{i}"] for i in range(len(prompts))]


@pytest.mark.parametrize("arch", ["llama", "mistral"])  # mistral: sliding window in the op
def test_compiled_decode_matches_transformers(tiny_models, arch):
    llm = tiny_llm(tiny_models, arch, cpu_compile=True)
    sizes = count_compiled_steps(llm)
    prompts = make_prompts([1, 70, 16, 33, 5, 121], seed=11)
    # batch 1 first (its own graph), then 2, then arrivals push it to 6
    got = run_with_arrivals(llm, prompts, {1: 3, 2: 5, 3: 5, 4: 8, 5: 9})
    hf = tiny_models(arch)[1]
    assert got == [hf_greedy(hf, p, NEW_TOKENS) for p in prompts]
    assert {1, 2, 6} <= set(sizes)
    assert_no_leak(llm.engine)


@pytest.mark.parametrize("quantization", ["int4", "int4+int8"])
def test_compiled_int4_matches_eager_across_kernel_switch(tiny_models, quantization):
    """int4 layers switch kernels above int4_max_rows (to fp32, or to int8 x int8): graphs
    for 1, 2..3 and 4+ rows."""
    prompts = make_prompts([3, 40, 9, 64, 20, 12], seed=12)
    arrivals = {1: 2, 2: 4, 3: 6, 4: 6, 5: 7}
    outs = {}
    for compiled in (False, True):
        llm = tiny_llm(tiny_models, "llama", quantization=quantization, int4_max_rows=3,
                       cpu_compile=compiled)
        sizes = count_compiled_steps(llm) if compiled else None
        outs[compiled] = run_with_arrivals(llm, prompts, arrivals)
        assert_no_leak(llm.engine)
    assert outs[True] == outs[False]
    assert {1, 2, 3} <= set(sizes) and max(sizes) >= 4


def test_compiled_int8_matches_eager(tiny_models):
    """The int8 op runs inside the compiled graph (a registered fake gives its shapes)."""
    prompts = make_prompts([3, 40, 9, 64], seed=14)
    arrivals = {1: 2, 2: 4, 3: 4}
    outs = {}
    for compiled in (False, True):
        llm = tiny_llm(tiny_models, "qwen2", quantization="int8", cpu_compile=compiled)
        sizes = count_compiled_steps(llm) if compiled else None
        outs[compiled] = run_with_arrivals(llm, prompts, arrivals)
        assert_no_leak(llm.engine)
    assert outs[True] == outs[False]
    assert {1, 2, 4} <= set(sizes)


def test_cpu_compile_max_batch_runs_larger_steps_eagerly(tiny_models):
    """int4 for single-sequence steps, compiled; every larger decode step eager (int8), with
    the same tokens as an all-eager engine, and only the batch-1 graph compiled."""
    prompts = make_prompts([3, 40, 9, 64], seed=15)
    arrivals = {1: 2, 2: 4, 3: 4}
    outs = {}
    for compiled in (False, True):
        llm = tiny_llm(tiny_models, "llama", quantization="int4+int8", int4_max_rows=1,
                       cpu_compile=compiled, cpu_compile_max_batch=1)
        sizes = count_compiled_steps(llm) if compiled else None
        if compiled:
            assert llm.engine.runner._compiled.batch_sizes == [1]
        outs[compiled] = run_with_arrivals(llm, prompts, arrivals)
        assert_no_leak(llm.engine)
    assert outs[True] == outs[False]
    assert sizes and set(sizes) == {1}


def test_cpu_compile_max_batch_is_validated():
    from engine.core.config import EngineConfig

    with pytest.raises(ValueError, match="cpu_compile_max_batch must be >= 1"):
        EngineConfig(cpu_compile=True, cpu_compile_max_batch=0)


def test_compiled_decode_under_preemption(tiny_models):
    """A pool too small for the batch: requests are preempted and recomputed, and the
    compiled steps see batch sizes go down and up again."""
    llm = tiny_llm(tiny_models, "llama", cpu_compile=True, num_kv_blocks=8)
    count_compiled_steps(llm)
    prompts = make_prompts([60, 50, 45, 55, 48, 52], seed=13)
    got = run(llm, prompts)
    assert llm.engine.scheduler.num_preemptions > 0
    hf = tiny_models("llama")[1]
    assert got == [hf_greedy(hf, p, NEW_TOKENS) for p in prompts]
    assert_no_leak(llm.engine)


def test_cpu_compile_rejected_on_cuda():
    from engine import EngineConfig

    with pytest.raises(ValueError, match="cpu_compile applies to CPU only"):
        EngineConfig(device="cuda", cpu_compile=True)
