"""GGUF files (llama.cpp) -> a cached HF-style directory (config.json, safetensors, tokenizer).

Dequantizing and building the tokenizer take seconds, so it is done once per file and
cached under ~/.cache/kvserve (or $KVSERVE_CACHE), keyed by the file's path, size and mtime;
later starts mmap the safetensors.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile

import numpy as np

CONVERTER_VERSION = 1

# GGUF tensor name pieces -> HF names (per layer "blk.{i}.").
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                 "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
_ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def cache_root() -> str:
    return os.environ.get("KVSERVE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "kvserve"))


def converted_dir(gguf_path: str) -> str:
    """The HF-style directory for this GGUF file, converting it on first use."""
    st = os.stat(gguf_path)
    key = f"{os.path.abspath(gguf_path)}:{st.st_size}:{st.st_mtime_ns}:{CONVERTER_VERSION}"
    out = os.path.join(cache_root(), "gguf-" + hashlib.sha256(key.encode()).hexdigest()[:16])
    if not os.path.exists(os.path.join(out, "DONE")):
        _convert(gguf_path, out)
    return out


def _convert(gguf_path: str, out: str) -> None:
    import gguf
    from safetensors.numpy import save_file

    reader = gguf.GGUFReader(gguf_path)
    big = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
           "tokenizer.ggml.scores")
    meta = {k: _field_value(f) for k, f in reader.fields.items() if k not in big}
    arch = meta["general.architecture"]
    if arch not in _ARCHS:
        raise ValueError(f"GGUF architecture {arch!r} is not supported; supported: {', '.join(_ARCHS)}")
    config = _hf_config(meta, arch, reader)
    tensors = {}
    for t in reader.tensors:
        name = _hf_name(t.name)
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        data = data.reshape([int(d) for d in reversed(t.shape)])
        if arch == "llama" and t.name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = config["num_attention_heads"] if "attn_q" in t.name else config["num_key_value_heads"]
            data = _unpermute(data, heads)
        tensors[name] = np.ascontiguousarray(data)
    tmp = tempfile.mkdtemp(prefix=".convert-", dir=_ensure(os.path.dirname(out)))
    try:
        save_file(tensors, os.path.join(tmp, "model.safetensors"))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        gen = {k: config[k] for k in ("bos_token_id", "eos_token_id") if config.get(k) is not None}
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump(gen, f, indent=2)
        _save_tokenizer(gguf_path, tmp)
        open(os.path.join(tmp, "DONE"), "w").close()
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's rotary row permutation: rows [heads, 2, D/2] <- [heads, D/2, 2]."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _hf_name(name: str) -> str:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    _, layer, rest = name.split(".", 2)
    piece, suffix = rest.rsplit(".", 1)
    if piece not in _LAYER_NAMES:
        raise ValueError(f"unknown GGUF tensor {name!r}")
    return f"model.layers.{layer}.{_LAYER_NAMES[piece]}.{suffix}"


def _hf_config(meta: dict, arch: str, reader) -> dict:
    p = arch + "."
    heads = meta[p + "attention.head_count"]
    hidden = meta[p + "embedding_length"]
    names = {t.name for t in reader.tensors}
    emb = next(t for t in reader.tensors if t.name == "token_embd.weight")
    config = {
        "architectures": [_ARCHS[arch]],
        "model_type": arch,
        "vocab_size": int(emb.shape[1]),
        "hidden_size": hidden,
        "intermediate_size": meta[p + "feed_forward_length"],
        "num_hidden_layers": meta[p + "block_count"],
        "num_attention_heads": heads,
        "num_key_value_heads": meta.get(p + "attention.head_count_kv", heads),
        "head_dim": meta.get(p + "attention.key_length", hidden // heads),
        "rms_norm_eps": meta[p + "attention.layer_norm_rms_epsilon"],
        "max_position_embeddings": meta.get(p + "context_length", 4096),
        "rope_theta": meta.get(p + "rope.freq_base", 10000.0),
        "tie_word_embeddings": "output.weight" not in names,
        "hidden_act": "silu",
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
    }
    return config


def _save_tokenizer(gguf_path: str, out: str) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.path.dirname(gguf_path),
                                        gguf_file=os.path.basename(gguf_path))
    tok.save_pretrained(out)


def _field_value(field):
    try:
        value = field.contents()
    except Exception:  # noqa: BLE001 - exotic field types carry nothing we use
        return None
    return value


def _ensure(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return path
