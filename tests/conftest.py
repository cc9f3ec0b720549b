"""Shared fixtures: models are built or loaded once per session."""
from __future__ import annotations

import os

import pytest
import torch

TINY_VOCAB = 512

# Small random models of each supported family. Large init std keeps logits peaked, so
# fp32 rounding differences between two correct implementations cannot flip a greedy pick.
TINY_CONFIGS = {
    "llama": dict(cls="LlamaConfig", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "qwen2": dict(cls="Qwen2Config", hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen3": dict(cls="Qwen3Config", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                  tie_word_embeddings=False),
    "mistral": dict(cls="MistralConfig", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=8, num_key_value_heads=8, head_dim=8, sliding_window=48,
                    tie_word_embeddings=False),
}


def build_tiny_model(arch: str, path: str):
    import transformers

    spec = dict(TINY_CONFIGS[arch])
    cls = getattr(transformers, spec.pop("cls"))
    config = cls(vocab_size=TINY_VOCAB, max_position_embeddings=512, rms_norm_eps=1e-6,
                 initializer_range=0.2, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                 **spec)
    torch.manual_seed(1234)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # norms away from 1 exercise the weight loading of every norm
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.2)
    model.save_pretrained(path)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """arch -> (model directory, transformers model), built on first use."""
    cache = {}

    def get(arch: str):
        if arch not in cache:
            path = str(tmp_path_factory.mktemp(f"tiny-{arch}"))
            cache[arch] = (path, build_tiny_model(arch, path))
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def smol_path():
    from engine.core.config import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def smol_llm():
    from engine import LLM

    return LLM(dtype="float32")


@pytest.fixture(scope="session")
def hf_smol(smol_path):
    """transformers' own load of the same GGUF file: the oracle for the real model."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        os.path.dirname(smol_path), gguf_file=os.path.basename(smol_path), dtype=torch.float32).eval()


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers greedy continuation of one unpadded prompt, eos disabled."""
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             min_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def assert_no_leak(engine) -> None:
    pool = engine.kv_cache.pool
    assert not engine.has_unfinished_requests()
    assert pool.num_free_blocks == pool.num_blocks
    assert all(b.ref_cnt == 0 for b in pool.blocks)
    assert not engine.kv_cache.req_blocks
