"""quantization="int4": GGUF codes recovered exactly; accuracy against fp32 on the real model."""
from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.loader import load_model
from engine.quant import Int4Linear, quantize_int4
from test_bf16 import TEXT, teacher_forced_logits


def test_int4_recovers_gguf_q4_1_codes(smol_llm):
    engine = smol_llm.engine
    model = load_model(engine.model_dir, engine.model_config, torch.float32, torch.device("cpu"))
    w = model.model.layers[3].mlp.gate_up_proj.weight.detach()  # Q4_1 in the file
    codes, sz = quantize_int4(w)
    n, k = w.shape
    deq = (codes.float().view(n, k // 32, 32) - 8) * sz[..., 0].t()[..., None] + sz[..., 1].t()[..., None]
    assert torch.equal(deq.view(n, k), w)  # lossless: the file's own 4-bit weights
    lin = Int4Linear(w, None, max_rows=4, batch_hint=8)
    x = torch.randn(3, k)
    ref = x.to(torch.bfloat16).float() @ w.t()
    assert (lin(x) - ref).abs().max() < 0.02 * ref.abs().max()  # int4 path (bf16 activations)
    x_big = torch.randn(16, k)
    assert torch.allclose(lin(x_big), x_big @ w.t(), atol=1e-4)  # dense fp32 path


def test_int4_accuracy_against_fp32(smol_llm):
    """Teacher-forced over 320 positions with every step on the int4 path."""
    ref_llm = LLM(dtype="float32", enable_prefix_caching=False, max_num_batched_tokens=1024)
    ids = ref_llm.tokenizer.encode(TEXT * 7)[:320]
    ref = teacher_forced_logits(ref_llm, ids)
    q = LLM(dtype="float32", enable_prefix_caching=False, max_num_batched_tokens=1024,
            quantization="int4", int4_max_rows=1024)
    ours = teacher_forced_logits(q, ids)
    agree = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    kl = torch.nn.functional.kl_div(ours.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1).mean().item()
    assert agree >= 0.98 and kl < 0.01, (agree, kl)
    out = q.chat([{"role": "user", "content": "What is the capital of France?"}],
                 SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)[0]
    assert "Paris" in out.outputs[0].text


def test_int4_rejected_off_cpu():
    from engine import EngineConfig

    with pytest.raises(ValueError, match="quantization"):
        EngineConfig(quantization="int3")
