"""PEFT LoRA adapters from disk: ``adapter_config.json`` + ``adapter_model.safetensors``.

Each ``lora_A`` / ``lora_B`` pair is mapped onto our projections (q/k/v into the fused
qkv_proj, gate/up into gate_up_proj) with its scale folded into B: ``alpha / r``, or
``alpha / sqrt(r)`` with ``use_rslora``; ``rank_pattern`` / ``alpha_pattern`` override r
and alpha per module, as PEFT matches them. Anything kvserve would not apply exactly as
PEFT does is refused, naming the adapter and the reason: a silently partial (or no-op)
adapter is worse than an error.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass

import torch

# checkpoint projection -> (our module, its sub-projection)
TARGETS = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
           "o_proj": ("o_proj", 0), "gate_proj": ("gate_up_proj", 0),
           "up_proj": ("gate_up_proj", 1), "down_proj": ("down_proj", 0)}
SUBS = {"qkv_proj": 3, "o_proj": 1, "gate_up_proj": 2, "down_proj": 1}
_KEY = re.compile(r"^(?:base_model\.model\.)?(model\.layers\.(\d+)\.(?:self_attn|mlp)\."
                  r"(\w+))\.lora_([AB])\.weight$")
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


@dataclass
class LoRAWeights:
    """One sub-projection's A [r, in] and B [out, r], B already scaled."""
    a: torch.Tensor
    b: torch.Tensor

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass
class LoRAAdapter:
    name: str
    key: str  # sha256 of the config and weight files
    # (layer, our module, sub-projection) -> weights
    weights: dict[tuple[int, str, int], LoRAWeights]

    @property
    def rank(self) -> int:
        return max(w.rank for w in self.weights.values())


class AdapterError(ValueError):
    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"LoRA adapter {name!r}: {reason}")


def adapter_key(path: str) -> str:
    """The adapter's identity: a hash of what is in its files."""
    digest = hashlib.sha256()
    for name in (CONFIG, WEIGHTS):
        with open(os.path.join(path, name), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def load_adapter(name: str, path: str, num_layers: int, shapes: dict[str, tuple[list, int]],
                 max_rank: int) -> LoRAAdapter:
    """``shapes``: our module -> ([out rows of each sub-projection], in features)."""
    config = _read_config(name, path)
    from safetensors.torch import load_file

    key = adapter_key(path)
    tensors = load_file(os.path.join(path, WEIGHTS), device="cpu")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for tensor_name, tensor in tensors.items():
        m = _KEY.match(tensor_name)
        if m is None or m.group(3) not in TARGETS:
            raise AdapterError(name, f"weight {tensor_name!r} matches no projection kvserve "
                                     f"adapts (q/k/v/o/gate/up/down_proj of the decoder layers).")
        if int(m.group(2)) >= num_layers:
            raise AdapterError(name, f"weight {tensor_name!r} is for a layer the model lacks.")
        pairs.setdefault(m.group(1), {})[m.group(4)] = tensor
    if not pairs:
        raise AdapterError(name, "it holds no LoRA weights: it would change nothing.")
    weights = {}
    for module_name, ab in sorted(pairs.items()):
        weights[_slot_key(module_name)] = _weights(name, module_name, ab, config, shapes,
                                                   max_rank)
    return LoRAAdapter(name, key, weights)


def _read_config(name: str, path: str) -> dict:
    if not os.path.isdir(path):
        raise AdapterError(name, f"no adapter directory at {path!r}.")
    if not os.path.exists(os.path.join(path, CONFIG)):
        raise AdapterError(name, f"{CONFIG} is missing in {path!r}.")
    if not os.path.exists(os.path.join(path, WEIGHTS)):
        if os.path.exists(os.path.join(path, "adapter_model.bin")):
            raise AdapterError(name, "adapter_model.bin (a pickle) is not loaded; save the "
                                     "adapter with safetensors (PEFT's default).")
        raise AdapterError(name, f"{WEIGHTS} is missing in {path!r}.")
    try:
        with open(os.path.join(path, CONFIG)) as f:
            config = json.load(f)
    except ValueError as e:
        raise AdapterError(name, f"{CONFIG} is not valid JSON: {e}") from e
    kind = config.get("peft_type", "LORA")
    if kind != "LORA":
        raise AdapterError(name, f"peft_type {kind!r} is not LoRA.")
    if config.get("use_dora"):
        raise AdapterError(name, "DoRA (use_dora) is not supported.")
    if config.get("modules_to_save"):
        raise AdapterError(name, f"modules_to_save ({config['modules_to_save']}) would replace "
                                 f"whole modules; not supported.")
    if config.get("bias", "none") != "none":
        raise AdapterError(name, f"bias={config['bias']!r} trains biases; only 'none' is "
                                 f"supported.")
    if config.get("fan_in_fan_out"):
        raise AdapterError(name, "fan_in_fan_out (Conv1D weights) is not supported.")
    targets = config.get("target_modules") or []
    if isinstance(targets, list):
        unknown = sorted(set(targets) - set(TARGETS))
        if unknown:
            raise AdapterError(name, f"target_modules {unknown} are not projections kvserve "
                                     f"adapts ({', '.join(TARGETS)}).")
    return config


def _slot_key(module_name: str) -> tuple[int, str, int]:
    m = _KEY.match(module_name + ".lora_A.weight")
    module, sub = TARGETS[m.group(3)]
    return int(m.group(2)), module, sub


def _weights(name: str, module_name: str, ab: dict, config: dict, shapes: dict,
             max_rank: int) -> LoRAWeights:
    if set(ab) != {"A", "B"}:
        raise AdapterError(name, f"{module_name} has lora_{next(iter(ab))} without its pair.")
    a, b = ab["A"].float(), ab["B"].float()
    rank = a.shape[0]
    _, module, sub = _slot_key(module_name)
    outs, in_features = shapes[module]
    if a.shape != (rank, in_features) or b.shape != (outs[sub], rank):
        raise AdapterError(name, f"{module_name}: lora_A {tuple(a.shape)} / lora_B "
                                 f"{tuple(b.shape)} do not fit the model's "
                                 f"({in_features} -> {outs[sub]}).")
    if rank > max_rank:
        raise AdapterError(name, f"{module_name} has rank {rank} > max_lora_rank={max_rank}.")
    pattern_rank = _pattern(config.get("rank_pattern"), module_name)
    if pattern_rank is not None and pattern_rank != rank:
        raise AdapterError(name, f"{module_name}: rank_pattern says r={pattern_rank}, the "
                                 f"weights have rank {rank}.")
    alpha = _pattern(config.get("alpha_pattern"), module_name)
    alpha = config.get("lora_alpha", 8) if alpha is None else alpha
    scale = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
    return LoRAWeights(a.contiguous(), (b * scale).contiguous())


def _pattern(patterns: dict | None, module_name: str):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module name that is, or
    ends with ``.`` + the key (keys may be regexes)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return None
