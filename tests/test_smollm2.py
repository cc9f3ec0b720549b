"""The real default model (SmolLM2-135M-Instruct, GGUF Q4_1) against transformers' load of
the same file: weights, greedy tokens and logprobs."""
from __future__ import annotations

import torch

from conftest import assert_no_leak, hf_greedy
from engine import SamplingParams

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a short poem about the sea."}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": [{"type": "text", "text": "List three prime numbers "},
                                  {"type": "text", "text": "and explain why each is prime."}]}],
    [{"role": "user", "content": "hi"}],
]


def test_gguf_weights_match_transformers(smol_llm, hf_smol):
    from engine.model_executor.loader import load_model

    engine = smol_llm.engine  # the loader's own output, before CPU weight packing
    ours = load_model(engine.model_dir, engine.model_config, torch.float32, torch.device("cpu"))
    ref = dict(hf_smol.named_parameters())
    layer = ours.model.layers[7]
    qkv = torch.cat([ref[f"model.layers.7.self_attn.{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(layer.self_attn.qkv_proj.weight, qkv)
    gate_up = torch.cat([ref[f"model.layers.7.mlp.{p}_proj.weight"] for p in ("gate", "up")])
    assert torch.equal(layer.mlp.gate_up_proj.weight, gate_up)
    assert torch.equal(ours.model.embed_tokens.weight, ref["model.embed_tokens.weight"])
    assert torch.equal(ours.model.norm.weight, ref["model.norm.weight"])


def test_greedy_chat_matches_transformers(smol_llm, hf_smol):
    prompts = [smol_llm.render_chat(c) for c in CHATS]
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    outs = smol_llm.generate(prompts, params, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        ref = hf_greedy(hf_smol, prompt["prompt_token_ids"], 40)
        assert out.outputs[0].token_ids == ref
        assert out.outputs[0].text == smol_llm.tokenizer.decode(ref, skip_special_tokens=True)
    assert_no_leak(smol_llm.engine)


def test_chat_stops_at_eos(smol_llm):
    out = smol_llm.chat(CHATS[0], SamplingParams(temperature=0.0, max_tokens=64), use_tqdm=False)[0]
    assert out.outputs[0].finish_reason == "stop"
    assert out.outputs[0].token_ids[-1] in smol_llm.engine.eos_token_ids
    assert "Paris" in out.outputs[0].text and "<|im_end|>" not in out.outputs[0].text


def test_logprobs_match_transformers_log_softmax(smol_llm, hf_smol):
    prompt = smol_llm.render_chat(CHATS[1])
    params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=5, ignore_eos=True)
    out = smol_llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    ids = prompt["prompt_token_ids"] + out.token_ids
    with torch.no_grad():
        logits = hf_smol(torch.tensor([ids])).logits[0].float()
    ref = torch.log_softmax(logits, dim=-1)
    n = len(prompt["prompt_token_ids"])
    assert len(out.logprobs) == len(out.token_ids)
    for step, (token, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        row = ref[n - 1 + step]
        assert abs(entry[token].logprob - row[token].item()) < 1e-4
        assert entry[token].rank == 1  # greedy picks the top token
        top_vals, top_ids = row.topk(5)
        for tid, val in zip(top_ids.tolist(), top_vals.tolist()):
            assert abs(entry[tid].logprob - val) < 1e-4
        assert len(entry) == 5


def test_prefix_hits_and_preemption_on_real_model(smol_llm, hf_smol):
    from engine import LLM

    small = LLM(dtype="float32", num_kv_blocks=12, max_num_batched_tokens=64)
    system = {"role": "system", "content": "You are a helpful assistant who answers briefly."}
    chats = [[system, {"role": "user", "content": q}] for q in
             ("Name a color.", "Name a fruit.", "Name an animal.", "Name a planet.")]
    prompts = [small.render_chat(c) for c in chats]
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    outs = small.generate(prompts, params, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf_smol, prompt["prompt_token_ids"], 32)
    stats = small.engine.get_stats()
    assert stats["num_preemptions"] > 0 and stats["prefix_cache_hits"] > 0
    assert_no_leak(small.engine)
