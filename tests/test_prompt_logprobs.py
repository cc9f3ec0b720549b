"""prompt_logprobs (vLLM) against transformers: log_softmax of its logits at every prompt
position, within 1e-4 in fp32, through chunked prefill, a warm prefix cache and n > 1."""
from __future__ import annotations

import pytest
import torch

from conftest import assert_no_leak
from engine import LLM, SamplingParams

PROMPT = "The capital of France is Paris, and the capital of Italy is Rome. Berlin is"


@pytest.fixture(scope="module")
def chunked_llm():
    return LLM(dtype="float32", max_num_batched_tokens=8)  # prompts prefill 8 tokens a step


def oracle(hf_smol, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(hf_smol(torch.tensor([ids])).logits[0].float(), dim=-1)


def check(out, lp: torch.Tensor, top_n: int) -> None:
    ids = out.prompt_token_ids
    assert len(out.prompt_logprobs) == len(ids) and out.prompt_logprobs[0] is None
    for k in range(1, len(ids)):
        entry = out.prompt_logprobs[k]
        assert abs(entry[ids[k]].logprob - lp[k - 1, ids[k]].item()) < 1e-4
        assert entry[ids[k]].rank == int((lp[k - 1] > lp[k - 1, ids[k]]).sum()) + 1
        top = lp[k - 1].topk(top_n).indices.tolist()
        assert set(top) <= set(entry) and len(entry) <= top_n + 1


def test_prompt_logprobs_match_transformers(chunked_llm, hf_smol):
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3)
    first = chunked_llm.generate(PROMPT, params, use_tqdm=False)[0]
    lp = oracle(hf_smol, first.prompt_token_ids)
    check(first, lp, 3)
    again = chunked_llm.generate(PROMPT, params, use_tqdm=False)[0]  # prefix cache warm
    check(again, lp, 3)
    both = chunked_llm.generate(PROMPT, SamplingParams(temperature=0.8, seed=1, n=2, max_tokens=2,
                                                       prompt_logprobs=0), use_tqdm=False)[0]
    check(both, lp, 0)
    plain = chunked_llm.generate(PROMPT, SamplingParams(max_tokens=1), use_tqdm=False)[0]
    assert plain.prompt_logprobs is None
    assert_no_leak(chunked_llm.engine)


def test_preempted_request_reports_each_position_once(hf_smol):
    """A pool too small for three long requests at once: the one preempted mid-prompt
    recomputes its prompt, and still reports every position exactly once."""
    llm = LLM(dtype="float32", num_kv_blocks=8, block_size=16, max_num_batched_tokens=32)
    prompts = [PROMPT * 2, PROMPT + " Madrid is", "Water boils at " * 6]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, prompt_logprobs=1)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0
    for out in outs:
        check(out, oracle(hf_smol, out.prompt_token_ids), 1)
    assert_no_leak(llm.engine)
