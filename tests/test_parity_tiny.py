"""Greedy output of tiny random Llama / Qwen2 / Qwen3 / Mistral models, token for token
against transformers, under every scheduling condition that moves the index math."""
from __future__ import annotations

import random

import pytest

from conftest import TINY_VOCAB, assert_no_leak, hf_greedy
from engine import LLM, SamplingParams

ARCHS = ["llama", "qwen2", "qwen3", "mistral"]
PROMPT_LENS = [1, 7, 16, 17, 33, 64, 121]
NEW_TOKENS = 20


def make_prompts(lens, seed=0, prefix=()):
    rng = random.Random(seed)
    return [list(prefix) + [rng.randrange(TINY_VOCAB) for _ in range(n)] for n in lens]


@pytest.fixture(scope="module")
def reference(tiny_models):
    """(arch, prompt) -> transformers' greedy tokens, computed once."""
    cache = {}

    def get(arch, prompt):
        key = (arch, tuple(prompt))
        if key not in cache:
            cache[key] = hf_greedy(tiny_models(arch)[1], prompt, NEW_TOKENS)
        return cache[key]

    return get


def run(llm, prompts):
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def tiny_llm(tiny_models, arch, **kw):
    kw.setdefault("num_kv_blocks", 256)
    kw.setdefault("dtype", "float32")  # exact parity needs fp32 (auto may pick bf16)
    return LLM(tiny_models(arch)[0], skip_tokenizer_init=True, **kw)


@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_lengths_in_one_batch(tiny_models, reference, arch):
    llm = tiny_llm(tiny_models, arch)
    prompts = make_prompts(PROMPT_LENS, seed=1)
    assert run(llm, prompts) == [reference(arch, p) for p in prompts]
    assert_no_leak(llm.engine)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_requests_added_while_others_decode(tiny_models, reference, arch):
    llm = tiny_llm(tiny_models, arch)
    engine = llm.engine
    prompts = make_prompts([5, 90, 1, 40, 17], seed=2)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    results = {}
    engine.add_request("r0", prompts[0], params)
    engine.add_request("r1", prompts[1], params)
    step = 0
    while engine.has_unfinished_requests():
        if step in (3, 4, 9):  # arrivals mid-decode
            i = {3: 2, 4: 3, 9: 4}[step]
            engine.add_request(f"r{i}", prompts[i], params)
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out.outputs[0].token_ids
        step += 1
    assert [results[f"r{i}"] for i in range(5)] == [reference(arch, p) for p in prompts]
    assert_no_leak(engine)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_prefix_cache_hits(tiny_models, reference, arch):
    llm = tiny_llm(tiny_models, arch)
    system = make_prompts([40], seed=3)[0]
    prompts = make_prompts([3, 9, 30, 1], seed=4, prefix=system)
    first = run(llm, prompts[:1])  # fills the cache with the shared prefix
    hits_before = llm.engine.kv_cache.pool.num_cache_hits
    rest = run(llm, prompts[1:])
    assert first + rest == [reference(arch, p) for p in prompts]
    # 40 shared tokens = 2 full blocks of 16, for each of the 3 later prompts
    assert llm.engine.kv_cache.pool.num_cache_hits - hits_before >= 6
    # the same prompt again: all full blocks but the one holding the last token hit
    again = run(llm, prompts[2:3])
    assert again == [reference(arch, prompts[2])]
    assert_no_leak(llm.engine)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_preemption_keeps_outputs(tiny_models, reference, arch):
    # 8 blocks x 16 = 128 token slots for 6 requests of 45-60 tokens each: must preempt.
    llm = tiny_llm(tiny_models, arch, num_kv_blocks=8, max_model_len=128)
    prompts = make_prompts([30, 25, 40, 33, 28, 35], seed=5)
    assert run(llm, prompts) == [reference(arch, p) for p in prompts]
    assert llm.engine.scheduler.num_preemptions > 0
    assert_no_leak(llm.engine)


@pytest.mark.parametrize("budget", [1, 7, 16])
def test_chunked_prefill_small_token_budget(tiny_models, reference, budget):
    llm = tiny_llm(tiny_models, "qwen2", max_num_batched_tokens=budget)
    prompts = make_prompts([1, 33, 70], seed=6)
    assert run(llm, prompts) == [reference("qwen2", p) for p in prompts]
    assert_no_leak(llm.engine)


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_block_sizes(tiny_models, reference, arch, block_size):
    llm = tiny_llm(tiny_models, arch, block_size=block_size, enable_prefix_caching=True)
    prompts = make_prompts([2, 31, 32, 33, 100], seed=7)
    assert run(llm, prompts) == [reference(arch, p) for p in prompts]
    assert_no_leak(llm.engine)


def test_greedy_independent_of_batch_composition(tiny_models):
    llm = tiny_llm(tiny_models, "llama", enable_prefix_caching=False)
    prompts = make_prompts([12, 50, 3, 77], seed=8)
    alone = [run(llm, [p])[0] for p in prompts]
    assert run(llm, prompts) == alone
    assert run(llm, prompts[::-1]) == alone[::-1]
