"""bf16 on the real model: teacher-forced top-1 agreement with transformers run in bf16."""
from __future__ import annotations

import torch

from engine import LLM, SamplingParams
from engine.request import Request, RequestStatus

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
