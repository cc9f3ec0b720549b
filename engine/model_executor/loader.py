"""Weights from a HF directory (safetensors, single or sharded) into our fused modules.

This is the one place checkpoint names meet module names, so sharding or adapters
can hook in here later without touching the rest of the engine.
"""
from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Iterator

import torch
from safetensors import safe_open

from .model_config import ModelConfig
from .models import DecoderForCausalLM

_SKIP = re.compile(r"rotary_emb\.inv_freq|\.rotary_emb\.")


def safetensors_files(model_dir: str) -> list[str]:
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(model_dir, n) for n in names]
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {model_dir!r}")
    return files


def iter_weights(model_dir: str) -> Iterator[tuple[str, object]]:
    """(name, a lazy safetensors slice): indexing it reads only those rows / columns, so a
    tensor-parallel rank reads its shard and nothing else."""
    for path in safetensors_files(model_dir):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_slice(name)


def load_model(model_dir: str, cfg: ModelConfig, dtype: torch.dtype,
               device: torch.device, tp=None) -> DecoderForCausalLM:
    with torch.device("meta"):
        model = DecoderForCausalLM(cfg, dtype, tp)
    model = model.to_empty(device=device)
    load_weights(model, iter_weights(model_dir))
    return model.eval().requires_grad_(False)


def load_weights(model: DecoderForCausalLM, weights) -> None:
    """``weights``: (checkpoint name, tensor or lazy slice) pairs."""
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    shards_seen: dict[str, int] = {}
    for name, lazy in weights:
        if _SKIP.search(name):
            continue
        if name == "lm_head.weight" and model.lm_head is None:
            continue  # tied: the embedding serves as lm_head
        target, rows = _target(model, name)
        if target not in params and model.shards is not None and \
                name.endswith(("o_proj.bias", "down_proj.bias")):
            continue  # row-parallel biases live on rank 0 only
        if target not in params:
            raise ValueError(f"checkpoint tensor {name!r} has no place in {model.cfg.architecture}")
        tensor = _read(model, name, lazy)
        param = params[target]
        dest = param.data if rows is None else param.data.narrow(0, *rows)
        if model.shards is not None and name.endswith(("embed_tokens.weight", "lm_head.weight")) \
                and tensor.shape[0] < dest.shape[0]:  # the last rank's padding rows
            dest[tensor.shape[0]:].zero_()
            dest = dest[:tensor.shape[0]]
        if dest.shape != tensor.shape:
            raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} "
                             f"!= expected {tuple(dest.shape)}")
        dest.copy_(tensor.to(dest.dtype))
        if rows is None:
            loaded.add(target)
        else:
            shards_seen[target] = shards_seen.get(target, 0) + 1
    for target, count in shards_seen.items():
        expected = 3 if target.endswith("qkv_proj.weight") or target.endswith("qkv_proj.bias") else 2
        if count == expected:
            loaded.add(target)
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"checkpoint is missing weights: {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}")


def _read(model: DecoderForCausalLM, name: str, lazy) -> torch.Tensor:
    """The part of a checkpoint tensor this rank holds (all of it without TP)."""
    sh = model.shards
    if sh is None:
        return lazy if isinstance(lazy, torch.Tensor) else lazy[:]
    d = model.cfg.head_dim
    (h0, nh), (k0, nk), (c0, nc) = sh.heads, sh.kv_heads, sh.columns
    rows = cols = None
    if ".q_proj." in name:
        rows = (h0 * d, nh * d)
    elif ".k_proj." in name or ".v_proj." in name:
        rows = (k0 * d, nk * d)
    elif ".gate_proj." in name or ".up_proj." in name:
        rows = (c0, nc)
    elif name.endswith("o_proj.weight"):
        cols = (h0 * d, nh * d)
    elif name.endswith("down_proj.weight"):
        cols = (c0, nc)
    elif name.endswith(("embed_tokens.weight", "lm_head.weight")):
        v0, per = sh.vocab_rows
        rows = (v0, max(0, min(per, model.cfg.vocab_size - v0)))
    if rows is not None:
        return lazy[rows[0]:rows[0] + rows[1]]
    if cols is not None:
        return lazy[:, cols[0]:cols[0] + cols[1]]
    return lazy if isinstance(lazy, torch.Tensor) else lazy[:]


def _target(model: DecoderForCausalLM, name: str) -> tuple[str, tuple[int, int] | None]:
    """Our parameter name for a checkpoint tensor, and its row range in a fused parameter."""
    for piece, (fused, shard) in model.STACKED.items():
        if f".{piece}." in name:
            return name.replace(piece, fused), model.shard_slice(fused, shard)
    return name, None
