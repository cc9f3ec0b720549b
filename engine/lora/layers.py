"""LoRA on the model: each adapted projection wrapped, adapter weights in device slots.

``LoRAModel`` wraps qkv_proj, o_proj, gate_up_proj and down_proj of every layer in a
``LoRALinear`` over whatever the base layer is (dense, prepacked, int4, int8), so the base
model's fast paths stay as they are and the delta is added on top. Per projection the
slots' weights are stacked as kernels/lora.py describes; loading an adapter into a slot
writes its columns of A and rows of B (zero-padded to ``max_lora_rank`` per sub-projection).

Each step the runner groups the batch by adapter and sets the step's runs of one slot once
(``set_step``); every wrapper reads the same runs (the C++ op on CPU), per-token slots
(Triton on CUDA) or one-hot mask (the torch fallback). A step without adapter tokens adds
nothing: base-only steps are bitwise what they are without LoRA, and keep their CUDA
graphs / compiled decode.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict

import torch
from torch import nn

from kernels.lora import can_bgmv, lora_delta_bgmv, lora_delta_torch, slot_mask, token_slots

from .peft import CONFIG, SUBS, WEIGHTS, LoRAAdapter, adapter_key, load_adapter


class StepSlots:
    """The current step's token -> slot mapping, shared by every LoRALinear."""

    def __init__(self) -> None:
        self.onehot = None
        self.lo = self.hi = 0
        self.token_slot = None  # int32 tensor on the device (Triton path)
        self.triton = False
        self.runs = None  # int64 [R, 3] (start, end, slot) on the CPU (the C++ op)
        self.bgmv = False

    @property
    def active(self) -> bool:
        return self.hi > self.lo


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, a: torch.Tensor, b: torch.Tensor, width: int,
                 step: StepSlots) -> None:
        super().__init__()
        self.base, self.a, self.b, self.width, self.step = base, a, b, width, step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        step = self.step
        if not step.active:
            return out
        if step.triton:
            from kernels.lora_triton import lora_delta_triton

            return out + lora_delta_triton(x, self.a, self.b, step.token_slot, self.width)
        if step.bgmv:
            return lora_delta_bgmv(x, out, self.a, self.b, step.runs, self.width)
        return lora_delta_torch(x, self.a, self.b, step.onehot, step.lo, step.hi, self.width,
                                out=out)


class LoRAModel:
    def __init__(self, model: nn.Module, max_loras: int, max_rank: int, max_cpu_loras: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.max_loras, self.max_rank = max_loras, max_rank
        self.dtype, self.device = dtype, device
        self.step = StepSlots()
        self.step.triton = device.type == "cuda"
        self.step.bgmv = can_bgmv(dtype, device, max(SUBS.values()) * max_rank)
        self.layers: dict[tuple[int, str], LoRALinear] = {}
        self.shapes = _shapes(model.cfg)  # the whole model's: adapters are checked on these
        # under tensor parallelism, the part of each projection this rank holds
        self.cuts = _cuts(model.cfg, getattr(model, "shards", None))
        rank = getattr(getattr(model, "shards", None), "rank", None)
        # rank 0 of a TP group: slot writes to send the other ranks with the next step
        self.pending: list[tuple[int, LoRAAdapter]] | None = [] if rank == 0 else None
        self.num_layers = len(model.model.layers)
        for i, layer in enumerate(model.model.layers):
            for parent, name in ((layer.self_attn, "qkv_proj"), (layer.self_attn, "o_proj"),
                                 (layer.mlp, "gate_up_proj"), (layer.mlp, "down_proj")):
                self._wrap(model, i, parent, name)
        self.cache: OrderedDict[str, LoRAAdapter] = OrderedDict()  # CPU copies, LRU
        self.max_cpu_loras = max_cpu_loras
        self.paths: dict[str, tuple[str, str]] = {}  # key -> (name, path): reload if evicted
        self._resolved: dict[str, tuple[tuple, str]] = {}  # path -> (file stats, key)
        # resolve() runs on a server's prompt-preparation thread, set_slot() on the engine's
        self._lock = threading.Lock()

    def _wrap(self, model, i: int, parent: nn.Module, name: str) -> None:
        outs, (_, in_features) = self.cuts[name]
        width = SUBS[name] * self.max_rank
        a = torch.zeros(in_features, self.max_loras * width, dtype=self.dtype, device=self.device)
        b = torch.zeros(self.max_loras * width, sum(n for _, n in outs), dtype=self.dtype,
                        device=self.device)
        layer = LoRALinear(getattr(parent, name), a, b, width, self.step)
        setattr(parent, name, layer)
        self.layers[(i, name)] = layer

    # ---- adapters ----------------------------------------------------------------------
    def resolve(self, name: str, path: str) -> str:
        """The key of the adapter at ``path``, loaded and checked (ValueError naming it if
        it cannot be served). Files are hashed again only when their size or mtime moved."""
        files = [os.path.join(path, CONFIG), os.path.join(path, WEIGHTS)]
        try:
            signature = tuple((st.st_mtime_ns, st.st_size) for st in map(os.stat, files))
        except OSError:
            signature = None  # load_adapter says what is missing
        with self._lock:
            hit = self._resolved.get(path)
            if signature is not None and hit is not None and hit[0] == signature \
                    and hit[1] in self.cache:
                self.paths[hit[1]] = (name, path)
                self.cache.move_to_end(hit[1])
                return hit[1]
        key = adapter_key(path) if signature is not None else ""
        self.load(name, path, key)
        with self._lock:
            self._resolved[path] = (signature, key)
        return key

    def load(self, name: str, path: str, key: str) -> LoRAAdapter:
        """The adapter's CPU copy (read from disk unless cached), checked against the model."""
        with self._lock:
            adapter = self.cache.get(key)
        if adapter is None:  # read and checked outside the lock: it takes a while
            adapter = load_adapter(name, path, self.num_layers, self.shapes, self.max_rank)
            if adapter.key != key:  # the files changed under us between hashing and reading
                raise ValueError(f"LoRA adapter {name!r}: its files changed while loading.")
        with self._lock:
            self.cache[key] = adapter
            self.cache.move_to_end(key)
            while len(self.cache) > self.max_cpu_loras:
                self.cache.popitem(last=False)
            self.paths[key] = (name, path)
        return adapter

    def set_slot(self, slot: int, key: str) -> None:
        """Write an adapter's weights into a slot (between steps)."""
        with self._lock:
            name, path = self.paths[key]
        adapter = self.load(name, path, key)
        self.write_slot(slot, adapter)
        if self.pending is not None:
            self.pending.append((slot, adapter))

    def take_pending(self) -> list[tuple[int, LoRAAdapter]]:
        """Rank 0: the slot writes since the last step, for the other ranks."""
        if not self.pending:
            return []
        pending, self.pending = self.pending, []
        return pending

    @torch.inference_mode()
    def write_slot(self, slot: int, adapter: LoRAAdapter) -> None:
        """This rank's part of each projection's A and B into the slot's columns / rows."""
        for (i, name), layer in self.layers.items():
            width, R = layer.width, self.max_rank
            cols = slice(slot * width, (slot + 1) * width)
            layer.a[:, cols].zero_()
            layer.b[cols].zero_()
            outs, (in_start, in_count) = self.cuts[name]
            row = 0
            for sub, (out_start, out_count) in enumerate(outs):
                w = adapter.weights.get((i, name, sub))
                if w is not None:
                    r, start = w.rank, slot * width + sub * R
                    layer.a[:, start:start + r].copy_(w.a[:, in_start:in_start + in_count].T)
                    layer.b[start:start + r, row:row + out_count].copy_(
                        w.b[out_start:out_start + out_count].T)
                row += out_count

    def set_step(self, runs: list[tuple[int, int, int]] | None, num_tokens: int = 0) -> None:
        """The step's runs of one adapter, (start row, end row, slot) over its
        ``num_tokens`` rows; None or empty: no LoRA this step."""
        step = self.step
        if not runs:
            step.lo = step.hi = 0
            return
        if step.bgmv:
            step.runs = torch.tensor(runs, dtype=torch.long)
            step.lo, step.hi = 0, 1  # active
            return
        token_slot = token_slots(runs, num_tokens)
        step.onehot, step.lo, step.hi = slot_mask(token_slot, self.dtype, self.device)
        if step.triton:
            step.token_slot = torch.tensor(token_slot, dtype=torch.int32).to(self.device)


def _cuts(cfg, shards) -> dict[str, tuple[list[tuple[int, int]], tuple[int, int]]]:
    """Our module -> ([(first, count) of each sub-projection's out rows], (first, count) of
    its in features) that this rank holds: everything without tensor parallelism; under it
    (engine/distributed/tp.py) this rank's heads and MLP columns, B's rows of the
    column-parallel qkv / gate_up and A's columns of the row-parallel o / down, whose
    partial deltas the all-reduce after them sums like the base's partial outputs."""
    if shards is None:
        return {name: ([(0, n) for n in outs], (0, fan_in))
                for name, (outs, fan_in) in _shapes(cfg).items()}
    hd, hidden = cfg.head_dim, cfg.hidden_size
    q = (shards.heads[0] * hd, shards.heads[1] * hd)
    kv = (shards.kv_heads[0] * hd, shards.kv_heads[1] * hd)
    cols = shards.columns
    return {"qkv_proj": ([q, kv, kv], (0, hidden)), "o_proj": ([(0, hidden)], q),
            "gate_up_proj": ([cols, cols], (0, hidden)), "down_proj": ([(0, hidden)], cols)}


def _shapes(cfg) -> dict[str, tuple[list[int], int]]:
    """Our module -> ([out rows of each sub-projection], in features), from the config (the
    base layer may be prepacked or quantized, with no weight to read them from)."""
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    hidden, inter = cfg.hidden_size, cfg.intermediate_size
    return {"qkv_proj": ([q, kv, kv], hidden), "o_proj": ([hidden], q),
            "gate_up_proj": ([inter, inter], hidden), "down_proj": ([hidden], inter)}
