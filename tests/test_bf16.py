"""bf16 on the real model: teacher-forced top-1 agreement with transformers run in bf16."""
from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.core.request import Request, RequestStatus

TEXT = ("The paged KV cache splits every sequence into fixed-size blocks. A block table maps "
        "each sequence's logical blocks to physical blocks in one preallocated pool, so memory "
        "is never fragmented and sequences that share a prefix can share its blocks. ")


def teacher_forced_logits(llm: LLM, ids: list[int]) -> torch.Tensor:
    """Our logits at every position of ids, from one prefill through the real runner."""
    engine = llm.engine
    req = Request("teacher-forced", ids, SamplingParams(max_tokens=1))
    engine.scheduler.add_request(req)
    try:
        sched = engine.scheduler.schedule()
        assert sched.scheduled[0].num_tokens == len(ids)
        input_ids, positions, meta, _, _ = engine.runner._prepare(sched, engine.kv_cache)
        runner = engine.runner
        with torch.inference_mode():
            hidden = runner.model(input_ids, positions, runner.kv_caches, meta, runner.backend)
            return runner.model.compute_logits(hidden).float()
    finally:
        engine.scheduler.finish_request(req.request_id, RequestStatus.FINISHED_ABORTED)


def test_bf16_top1_agrees_with_transformers_bf16():
    from transformers import AutoModelForCausalLM

    llm = LLM(dtype="bfloat16", enable_prefix_caching=False, max_num_batched_tokens=1024)
    ids = llm.tokenizer.encode(TEXT * 7)[:320]
    ours = teacher_forced_logits(llm, ids)
    hf = AutoModelForCausalLM.from_pretrained(llm.engine.model_dir, dtype=torch.bfloat16).eval()
    with torch.inference_mode():
        ref = hf(torch.tensor([ids])).logits[0].float()
    agree = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert len(ids) == 320 and agree >= 0.99, agree


def test_bfloat16_kv_cache_under_float32_activations(smol_llm, hf_smol):
    """kv_cache_dtype="bfloat16": K/V rounded once when stored, attention in fp32. The pool
    holds twice the tokens per byte; teacher-forced top-1 stays >= 99% of transformers' fp32
    (measured 99.7%, KL 3e-5 against our fp32), and greedy decoding (the paged decode kernel
    over the bf16 pool) gives fp32's answer."""
    llm = LLM(dtype="float32", kv_cache_dtype="bfloat16", enable_prefix_caching=False,
              max_num_batched_tokens=1024)
    runner = llm.engine.runner
    assert {c.dtype for c in runner.kv_caches} == {torch.bfloat16}
    assert runner.bytes_per_block * 2 == smol_llm.engine.runner.bytes_per_block
    ids = llm.tokenizer.encode(TEXT * 7)[:320]
    ours = teacher_forced_logits(llm, ids)
    with torch.inference_mode():
        ref = hf_smol(torch.tensor([ids])).logits[0].float()
    agree = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    kl = torch.nn.functional.kl_div(ours.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1).mean().item()
    assert agree >= 0.99 and kl < 2e-4, (agree, kl)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    params = SamplingParams(temperature=0.0, max_tokens=12)
    got = llm.chat(chat, params, use_tqdm=False)[0].outputs[0]
    want = smol_llm.chat(chat, params, use_tqdm=False)[0].outputs[0]
    assert "Paris" in got.text and got.token_ids[:8] == want.token_ids[:8], (got.text, want.text)


def test_kv_cache_dtype_checks():
    from engine import EngineConfig

    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        EngineConfig(kv_cache_dtype="fp8")
    with pytest.raises(ValueError, match="CPU only"):
        EngineConfig(device="cuda", dtype="bfloat16", kv_cache_dtype="float32")
    assert EngineConfig(device="cuda", dtype="bfloat16", kv_cache_dtype="bfloat16")
    assert EngineConfig(dtype="float32").kv_torch_dtype == torch.float32
    assert EngineConfig(dtype="float32", kv_cache_dtype="float16").kv_torch_dtype == torch.float16
