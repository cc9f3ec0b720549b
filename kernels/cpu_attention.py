"""CPU paged attention: ``torch.ops.kvserve.paged_decode`` (decode attention reading K/V
straight from the block pool, instead of gathering them into padded tensors for SDPA),
``torch.ops.kvserve.paged_prefill`` (the same for a step's multi-token sequences, causal;
kernels/csrc/paged_prefill.cpp, called by engine/model_executor/attention.py) and
``torch.ops.kvserve.store_kv`` (write new K/V rows into their slots, skipping slot -1); the
C++ lives in kernels/csrc/paged_decode.cpp and is built by kernels/cpu_ops.py.
"""
from __future__ import annotations

import torch

from .cpu_ops import available, has_op

__all__ = ["available", "has_paged_prefill", "paged_decode", "store_kv"]

PREFILL_HEAD_DIMS = (16, 32, 64, 128, 256)  # paged_prefill.cpp's dispatch_dim


def has_paged_prefill(head_dim: int) -> bool:
    """paged_prefill was built (it needs AVX-512) and takes this head size (fp32 queries)."""
    return head_dim in PREFILL_HEAD_DIMS and has_op("paged_prefill")


def paged_decode(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                 block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                 sliding_window: int | None = None) -> torch.Tensor:
    """query [num_seqs, num_heads, head_dim] (one token each) -> out of the same shape.
    block_tables [num_seqs, max_blocks] int32, seq_lens [num_seqs] int32 (0 = output zeros)."""
    if query.device.type != "cpu":
        raise ValueError("paged_decode is a CPU kernel")
    available()
    return torch.ops.kvserve.paged_decode(query, key_cache, value_cache, block_tables, seq_lens,
                                          scale, sliding_window or 0)


def store_kv(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
             value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """key/value [num_tokens, kv_heads, head_dim] into the pool; slot -1 is skipped."""
    available()
    torch.ops.kvserve.store_kv(key, value, key_cache, value_cache, slot_mapping)
