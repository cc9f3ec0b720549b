"""CPU paged decode attention: a small C++ op (kernels/csrc/paged_decode.cpp) that reads K/V
straight from the block pool, instead of gathering them into padded tensors for SDPA.

Built on first use with torch's cpp_extension (cached under ~/.cache/torch_extensions);
if the build fails (no compiler), ``available()`` is False and callers keep the torch path.
"""
from __future__ import annotations

import logging
import os
import threading

import torch

logger = logging.getLogger(__name__)
_SOURCE = os.path.join(os.path.dirname(__file__), "csrc", "paged_decode.cpp")
_lock = threading.Lock()
_module = None
_failed = False


def _load():
    global _module, _failed
    with _lock:
        if _module is None and not _failed:
            try:
                from torch.utils.cpp_extension import load

                _module = load(name="kvserve_paged_decode", sources=[_SOURCE],
                               extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffast-math",
                                             "-fno-finite-math-only"],
                               extra_ldflags=["-fopenmp"],
                               verbose=False)
            except Exception as e:  # noqa: BLE001 - any build failure means: use torch ops
                logger.warning("CPU paged-decode kernel unavailable (%s); using torch ops.", e)
                _failed = True
    return _module


def available() -> bool:
    return _load() is not None


def paged_decode(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                 block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                 sliding_window: int | None = None) -> torch.Tensor:
    """query [num_seqs, num_heads, head_dim] (one token each) -> out of the same shape.
    block_tables [num_seqs, max_blocks] int32, seq_lens [num_seqs] int32 (0 = output zeros)."""
    if query.device.type != "cpu":
        raise ValueError("paged_decode is a CPU kernel")
    if query.dtype != key_cache.dtype or key_cache.dtype != value_cache.dtype:
        raise ValueError("query, key_cache and value_cache must share a dtype")
    if block_tables.shape[0] != query.shape[0] or seq_lens.shape[0] != query.shape[0]:
        raise ValueError("block_tables and seq_lens need one row per query")
    return _load().paged_decode(query, key_cache, value_cache, block_tables.to(torch.int32),
                                seq_lens.to(torch.int32), scale, sliding_window or 0)
