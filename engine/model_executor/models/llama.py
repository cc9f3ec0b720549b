"""Llama-family decoder (Llama 2/3, Mistral, SmolLM2, TinyLlama, Qwen2, Qwen3).

Works on a flattened batch: every tensor is [num_tokens, ...], sequences are told
apart only by the attention metadata. Numerics follow transformers op for op in fp32
(RMSNorm in fp32, rotary tables in fp32) so greedy output matches token for token.

With tensor parallelism (``tp``, engine/distributed/tp.py) each rank builds the same
modules at its shard's sizes: its heads and MLP columns, its vocabulary rows; o_proj and
down_proj produce partial sums that one all-reduce each completes.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import AttentionBackend, AttentionMetadata
from ..model_config import ModelConfig


class FusedOps(NamedTuple):
    """One set of fused elementwise kernels: the C++ CPU ops (kernels/csrc/fused_elementwise.cpp)
    or the Triton ones (kernels/fused.py), same contracts. ``rms_norm`` may be None (the C++
    set fuses only the residual form)."""
    add_rms_norm: Callable   # (x, residual, weight, eps) -> out; residual += x in place
    rms_norm: Callable | None  # (x, weight, eps) -> out
    rotary_: Callable        # (q, k, cos, sin) -> None, in place
    silu_mul: Callable       # (gate_up) -> SiLU(gate) * up
    norm_rotary_: Callable | None = None  # (q, k, cos, sin, q_w, k_w, eps): Qwen3's q/k norms too


def cpu_fused_ops() -> FusedOps:
    """Residual add + RMSNorm, rotary and SiLU * up as one C++ pass each (float32 CPU). Not
    bitwise equal to aten, so only for models that are not fp32-exact anyway (quantized)."""
    ops = torch.ops.kvserve
    return FusedOps(ops.add_rms_norm, None, ops.rotary_, ops.silu_mul)


def triton_fused_ops() -> FusedOps:
    """The CUDA path's: one launch each where aten takes several (fewer launches per decode
    step, which is what bounds a small model's decode on a GPU)."""
    from kernels import fused

    return FusedOps(fused.add_rms_norm, fused.rms_norm, fused.rotary_, fused.silu_mul,
                    fused.norm_rotary_)


def use_fused_ops(model: nn.Module, ops: FusedOps) -> None:
    for m in model.modules():
        if isinstance(m, (RMSNorm, Attention, MLP)):
            m.fused = ops


def _fused(module: nn.Module) -> FusedOps | None:
    """The module's fused kernels in eager steps; compiled steps fuse the aten forms."""
    return None if torch.compiler.is_compiling() else module.fused


class RMSNorm(nn.Module):
    fused: FusedOps | None = None

    def __init__(self, dim: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        ops = _fused(self)
        if ops is not None and residual is not None:  # residual += x in place
            return ops.add_rms_norm(x, residual, self.weight, self.eps), residual
        if ops is not None and ops.rms_norm is not None:
            return ops.rms_norm(x, self.weight, self.eps)
        if residual is not None:
            x = residual + x
            residual = x
        if x.dtype == torch.float32:  # one fused kernel, bitwise equal to the form below
            out = F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        else:  # transformers' order: normalize in fp32, round, then scale (bf16-exact)
            h = x.float()
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
            out = self.weight * h.to(x.dtype)
        return out if residual is None else (out, residual)


class RotaryEmbedding:
    """cos/sin tables for every position, built once; looked up by position per token."""

    def __init__(self, cfg: ModelConfig, max_positions: int, device: torch.device) -> None:
        dim = cfg.head_dim
        inv_freq = 1.0 / (cfg.rope_theta ** (
            torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
        inv_freq = _scale_inv_freq(inv_freq, cfg.rope_scaling)
        pos = torch.arange(max_positions, device=device).float()
        freqs = torch.outer(pos, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = emb.cos()
        self.sin = emb.sin()

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype):
        """(cos, sin) [T, 1, D] for this step's positions: once per step, shared by all layers."""
        return (self.cos[positions].unsqueeze(1).to(dtype),
                self.sin[positions].unsqueeze(1).to(dtype))


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos_sin) -> tuple[torch.Tensor, torch.Tensor]:
    # q: [T, H, D], k: [T, KVH, D]
    cos, sin = cos_sin
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _scale_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type != "llama3":
        return inv_freq
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * torch.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class Attention(nn.Module):
    fused: FusedOps | None = None

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, tp=None) -> None:
        super().__init__()
        self.tp = tp
        shards = cfg.shards(tp)
        self.num_heads = shards.heads[1] if shards else cfg.num_attention_heads
        self.num_kv_heads = shards.kv_heads[1] if shards else cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        # q, k and v in one matmul; the loader fills the three row ranges.
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size,
                                  bias=cfg.attention_bias, dtype=dtype)
        # row-parallel: a bias is added once, by rank 0, before the all-reduce
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, dtype=dtype,
                                bias=cfg.o_proj_bias and (tp is None or tp.rank == 0))
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, dtype)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, cos_sin, kv_cache, meta: AttentionMetadata,
                backend: AttentionBackend) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(T, self.num_heads, self.head_dim)
        k = k.view(T, self.num_kv_heads, self.head_dim)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        ops = _fused(self)
        if ops is not None and ops.norm_rotary_ is not None and self.q_norm is not None:
            ops.norm_rotary_(q, k, *cos_sin, self.q_norm.weight, self.k_norm.weight,
                             self.q_norm.eps)  # Qwen3: q/k norms and rotation in one launch
        else:
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            if ops is not None:
                ops.rotary_(q, k, *cos_sin)
            else:
                q, k = apply_rotary(q, k, cos_sin)
        out = backend.forward(q, k, v, kv_cache, meta)
        out = self.o_proj(out.reshape(T, self.q_size))
        return out if self.tp is None else self.tp.all_reduce(out)


class MLP(nn.Module):
    fused: FusedOps | None = None

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, tp=None) -> None:
        super().__init__()
        self.tp = tp
        shards = cfg.shards(tp)
        self.intermediate_size = shards.columns[1] if shards else cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * self.intermediate_size,
                                      bias=cfg.mlp_bias, dtype=dtype)
        self.down_proj = nn.Linear(self.intermediate_size, cfg.hidden_size, dtype=dtype,
                                   bias=cfg.mlp_bias and (tp is None or tp.rank == 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = _fused(self)
        if ops is not None:
            out = self.down_proj(ops.silu_mul(self.gate_up_proj(x)))
        else:
            gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
            out = self.down_proj(F.silu(gate) * up)
        return out if self.tp is None else self.tp.all_reduce(out)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, tp=None) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, dtype, tp)
        self.mlp = MLP(cfg, dtype, tp)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def forward(self, h, residual, cos_sin, kv_cache, meta, backend):
        if residual is None:
            residual, h = h, self.input_layernorm(h)
        else:
            h, residual = self.input_layernorm(h, residual)
        h = self.self_attn(h, cos_sin, kv_cache, meta, backend)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class VocabParallelEmbedding(nn.Module):
    """This rank's rows of the embedding: other ranks' tokens look up zeros, and the
    all-reduce adds every rank's piece."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, tp) -> None:
        super().__init__()
        self.tp = tp
        self.start, rows = cfg.shards(tp).vocab_rows
        self.weight = nn.Parameter(torch.zeros(rows, cfg.hidden_size, dtype=dtype))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        mine = (local >= 0) & (local < self.weight.shape[0])
        out = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight)
        return self.tp.all_reduce(out * mine.unsqueeze(-1).to(out.dtype))


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, tp=None) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype) \
            if tp is None else VocabParallelEmbedding(cfg, dtype, tp)
        self.layers = nn.ModuleList(DecoderLayer(cfg, dtype, tp)
                                    for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)


class DecoderForCausalLM(nn.Module):
    # checkpoint name piece -> (our fused parameter, shard index)
    STACKED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
               "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, tp=None) -> None:
        super().__init__()
        self.cfg = cfg
        self.tp = tp
        self.shards = cfg.shards(tp)
        self.model = DecoderModel(cfg, dtype, tp)
        rows = cfg.vocab_size if tp is None else self.shards.vocab_rows[1]
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(
            cfg.hidden_size, rows, bias=False, dtype=dtype)
        self.rotary: RotaryEmbedding | None = None

    def init_rotary(self, max_positions: int, device: torch.device) -> None:
        self.rotary = RotaryEmbedding(self.cfg, max_positions, device)

    def forward(self, input_ids, positions, kv_caches, meta, backend) -> torch.Tensor:
        """Hidden states [num_tokens, hidden] after the final norm."""
        h = self.model.embed_tokens(input_ids)
        residual = None
        cos_sin = self.rotary.lookup(positions, h.dtype)
        for layer, kv_cache in zip(self.model.layers, kv_caches):
            h, residual = layer(h, residual, cos_sin, kv_cache, meta, backend)
        h, _ = self.model.norm(h, residual)
        return h

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the whole vocabulary (under TP: a collective; every rank calls it
        with the same rows)."""
        if self.lm_head is not None:
            logits = self.lm_head(hidden)
        else:
            logits = F.linear(hidden, self.model.embed_tokens.weight)
        return logits if self.tp is None else self.tp.gather_rows(logits, self.cfg.vocab_size)

    def shard_slice(self, fused: str, shard: int) -> tuple[int, int]:
        """Rows of a fused parameter that hold one checkpoint tensor (this rank's part)."""
        attn, mlp = self.model.layers[0].self_attn, self.model.layers[0].mlp
        if fused == "gate_up_proj":
            return shard * mlp.intermediate_size, mlp.intermediate_size
        q, kv = attn.q_size, attn.kv_size
        return ((0, q), (q, kv), (q + kv, kv))[shard]
