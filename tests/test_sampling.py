"""Sampling, stopping and bad input on the real model (the session's shared LLM)."""
from __future__ import annotations

import pytest

from conftest import assert_no_leak
from engine import SamplingParams

PROMPT = "Once upon a time, in a land far away,"


def texts(llm, prompts, params):
    return [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]


def test_seeded_sampling_reproduces_across_batches(smol_llm):
    params = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=24, seed=7, ignore_eos=True)
    alone = texts(smol_llm, [PROMPT], params)[0].token_ids
    other = SamplingParams(temperature=1.2, max_tokens=30, ignore_eos=True)
    mixed = smol_llm.generate([PROMPT, "The weather today", PROMPT], [other, other, params],
                              use_tqdm=False)
    assert mixed[2].outputs[0].token_ids == alone
    different_seed = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=24, seed=8, ignore_eos=True)
    assert texts(smol_llm, [PROMPT], different_seed)[0].token_ids != alone


def test_top_k_one_equals_greedy(smol_llm):
    greedy = texts(smol_llm, [PROMPT], SamplingParams(temperature=0.0, max_tokens=16))[0]
    top1 = texts(smol_llm, [PROMPT], SamplingParams(temperature=1.5, top_k=1, max_tokens=16))[0]
    assert top1.token_ids == greedy.token_ids


def test_n_completions_share_prompt_blocks(smol_llm):
    engine = smol_llm.engine
    prompt = "Tell me a story about a dragon who " * 4  # > 2 full blocks
    hits = engine.kv_cache.pool.num_cache_hits
    params = SamplingParams(n=3, temperature=1.0, max_tokens=12, seed=1, ignore_eos=True)
    out = smol_llm.generate(prompt, params, use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 12 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    n_full = (len(out.prompt_token_ids) - 1) // engine.config.block_size
    assert engine.kv_cache.pool.num_cache_hits - hits >= 2 * n_full
    again = smol_llm.generate(prompt, params, use_tqdm=False)[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]
    assert_no_leak(engine)


def test_penalties_and_min_p_change_output(smol_llm):
    base = texts(smol_llm, ["a a a a a a a a"], SamplingParams(temperature=0.0, max_tokens=16))[0]
    rep = texts(smol_llm, ["a a a a a a a a"],
                SamplingParams(temperature=0.0, max_tokens=16, repetition_penalty=2.0))[0]
    assert rep.token_ids != base.token_ids
    freq = texts(smol_llm, [PROMPT], SamplingParams(temperature=0.0, max_tokens=32,
                                                   frequency_penalty=2.0, ignore_eos=True))[0]
    assert len(set(freq.token_ids)) >= len(set(texts(smol_llm, [PROMPT], SamplingParams(
        temperature=0.0, max_tokens=32, ignore_eos=True))[0].token_ids))
    # min_p=1 keeps only the most likely token: equal to greedy
    minp = texts(smol_llm, [PROMPT], SamplingParams(temperature=1.0, min_p=1.0, max_tokens=16, seed=3))[0]
    greedy = texts(smol_llm, [PROMPT], SamplingParams(temperature=0.0, max_tokens=16))[0]
    assert minp.token_ids == greedy.token_ids


def test_stop_string_across_tokens_is_cut(smol_llm):
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    full = texts(smol_llm, [PROMPT], params)[0]
    # a stop string straddling a token boundary, from the middle of the text
    stop = full.text[10:17]
    cut = texts(smol_llm, [PROMPT], SamplingParams(temperature=0.0, max_tokens=40, stop=[stop]))[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == full.text[: full.text.index(stop)]
    kept = texts(smol_llm, [PROMPT], SamplingParams(temperature=0.0, max_tokens=40, stop=stop,
                                                    include_stop_str_in_output=True))[0]
    assert kept.text == full.text[: full.text.index(stop) + len(stop)]


def test_stop_token_ids_max_tokens_min_tokens(smol_llm):
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    full = texts(smol_llm, [PROMPT], params)[0]
    stop_tok = full.token_ids[5]
    out = texts(smol_llm, [PROMPT], SamplingParams(temperature=0.0, max_tokens=20,
                                                   stop_token_ids=[stop_tok]))[0]
    first = full.token_ids.index(stop_tok)
    assert out.token_ids == full.token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_tok
    assert full.finish_reason == "length" and len(full.token_ids) == 20
    # min_tokens: eos suppressed until 30 tokens exist
    chat = smol_llm.render_chat([{"role": "user", "content": "What is the capital of France?"}])
    short = texts(smol_llm, [chat], SamplingParams(temperature=0.0, max_tokens=60))[0]
    assert short.finish_reason == "stop" and len(short.token_ids) < 30
    longer = texts(smol_llm, [chat], SamplingParams(temperature=0.0, max_tokens=60, min_tokens=30))[0]
    assert len(longer.token_ids) >= 30


@pytest.mark.parametrize("kwargs, field", [
    (dict(temperature=-0.5), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(n=0), "n"), (dict(top_k=-3), "top_k"), (dict(max_tokens=0), "max_tokens"),
    (dict(min_p=2.0), "min_p"), (dict(presence_penalty=3.0), "presence_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(logprobs=-1), "logprobs"),
    (dict(n="2"), "n"), (dict(stop=[""]), "stop"), (dict(min_tokens=5, max_tokens=2), "min_tokens"),
])
def test_invalid_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_bad_prompts_raise_and_cost_nothing(smol_llm):
    engine = smol_llm.engine
    good = SamplingParams(temperature=0.0, max_tokens=8)
    with pytest.raises(ValueError, match="empty"):
        smol_llm.generate([PROMPT, ""], good, use_tqdm=False)
    with pytest.raises(ValueError, match="vocabulary"):
        smol_llm.generate([PROMPT, {"prompt_token_ids": [1, 2, 10**7]}], good, use_tqdm=False)
    with pytest.raises(ValueError, match="max_model_len"):
        smol_llm.generate({"prompt_token_ids": [5] * (engine.max_model_len + 1)}, good, use_tqdm=False)
    assert_no_leak(engine)
    # the engine still serves normally afterwards
    assert texts(smol_llm, [PROMPT], good)[0].token_ids


def test_abort_mid_generation_frees_blocks(smol_llm):
    engine = smol_llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True)
    engine.add_request("keep", PROMPT, params)
    engine.add_request("drop", "Another prompt that will be aborted", params)
    engine.add_request("queued", "x", params)
    for _ in range(3):
        engine.step()
    engine.abort_request(["drop", "queued", "unknown-id"])
    finals = [o for _ in range(200) if engine.has_unfinished_requests() for o in engine.step()]
    done = [o for o in finals if o.finished]
    assert [o.request_id for o in done] == ["keep"] and len(done[0].outputs[0].token_ids) == 50
    assert_no_leak(engine)


def test_draws_follow_the_filtered_distribution():
    """The sampler alone on fixed logits, 20000 rows at once: empirical frequencies match
    softmax(logits / T) renormalized over what top-k / top-p keep; filtered tokens never come."""
    import torch

    from engine.core.request import Request
    from engine.model_executor.sampler import Sampler

    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -30.0])
    cases = [(SamplingParams(temperature=1.0), [0, 1, 2, 3, 4, 5]),
             (SamplingParams(temperature=0.5, top_k=3), [0, 1, 2]),
             (SamplingParams(temperature=1.0, top_p=0.8), [0, 1, 2])]
    torch.manual_seed(0)
    for params, kept in cases:
        rows = 20000
        reqs = [Request(f"r{i}", [1], params) for i in range(rows)]
        out = torch.tensor(Sampler(6)(logits.repeat(rows, 1), reqs, {}).token_ids)
        freq = torch.bincount(out, minlength=6).float() / rows
        expect = torch.zeros(6)
        expect[kept] = torch.softmax(logits[kept] / params.temperature, dim=-1)
        assert set(out.unique().tolist()) <= set(kept)
        assert (freq - expect).abs().max() < 0.015, (params, freq, expect)


@pytest.mark.parametrize("vocab", [1, 15, 16, 33, 49152])
def test_native_argmax_matches_torch(vocab):
    """Greedy's C++ argmax (kvserve::argmax_rows) against torch.argmax: ties go to the first
    index, NaN counts as the largest, an all -inf row gives 0, odd widths use the scalar tail."""
    import torch

    from kernels import cpu_ops

    if not cpu_ops.available():
        pytest.skip("no C++ toolchain")
    x = torch.randn(9, vocab, generator=torch.Generator().manual_seed(vocab))
    x[1, 0] = x[1, vocab // 2] = x[1, -1] = 1e9  # a three-way tie
    x[2, -1] = 1e9  # the max in the tail
    x[3, -1] = float("nan")
    x[4, vocab // 3] = float("nan")
    x[4, -1] = float("nan")
    x[5] = float("-inf")
    x[6, 0] = float("inf")
    ours = torch.ops.kvserve.argmax_rows(x)
    assert torch.equal(ours, x.argmax(dim=-1)), (ours, x.argmax(dim=-1))
    assert torch.equal(torch.ops.kvserve.argmax_rows(x[:, :0].new_empty(0, vocab)),
                       torch.empty(0, dtype=torch.long))
