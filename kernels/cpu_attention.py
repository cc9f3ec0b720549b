"""CPU paged attention ops: a small C++ library (kernels/csrc/paged_decode.cpp) registered as
torch ops ``torch.ops.kvserve.paged_decode`` (decode attention reading K/V straight from the
block pool, instead of gathering them into padded tensors for SDPA) and
``torch.ops.kvserve.store_kv`` (write new K/V rows into their slots, skipping slot -1).

Real torch ops rather than pybind functions so torch.compile'd decode steps call them
without leaving the compiled graph. Built on first use with torch's cpp_extension (cached
under ~/.cache/torch_extensions); if the build fails (no compiler), ``available()`` is False
and callers keep the torch path.
"""
from __future__ import annotations

import logging
import os
import threading

import torch

logger = logging.getLogger(__name__)
_SOURCE = os.path.join(os.path.dirname(__file__), "csrc", "paged_decode.cpp")
_lock = threading.Lock()
_loaded = False
_failed = False


def _load() -> bool:
    global _loaded, _failed
    with _lock:
        if not _loaded and not _failed:
            try:
                from torch.utils.cpp_extension import load

                load(name="kvserve_paged_ops", sources=[_SOURCE], is_python_module=False,
                     extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffast-math",
                                   "-fno-finite-math-only"],
                     extra_ldflags=["-fopenmp"], verbose=False)
                _register_fakes()
                _loaded = True
            except Exception as e:  # noqa: BLE001 - any build failure means: use torch ops
                logger.warning("CPU paged-attention ops unavailable (%s); using torch ops.", e)
                _failed = True
    return _loaded


def _register_fakes() -> None:
    """Shape functions, so torch.compile can trace through the ops."""
    @torch.library.register_fake("kvserve::paged_decode")
    def _(query, key_cache, value_cache, block_tables, seq_lens, scale, window):
        return torch.empty_like(query, memory_format=torch.contiguous_format)

    @torch.library.register_fake("kvserve::store_kv")
    def _(key, value, key_cache, value_cache, slot_mapping):
        return None


def available() -> bool:
    return _load()


def paged_decode(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                 block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                 sliding_window: int | None = None) -> torch.Tensor:
    """query [num_seqs, num_heads, head_dim] (one token each) -> out of the same shape.
    block_tables [num_seqs, max_blocks] int32, seq_lens [num_seqs] int32 (0 = output zeros)."""
    if query.device.type != "cpu":
        raise ValueError("paged_decode is a CPU kernel")
    _load()
    return torch.ops.kvserve.paged_decode(query, key_cache, value_cache, block_tables, seq_lens,
                                          scale, sliding_window or 0)


def store_kv(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
             value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """key/value [num_tokens, kv_heads, head_dim] into the pool; slot -1 is skipped."""
    _load()
    torch.ops.kvserve.store_kv(key, value, key_cache, value_cache, slot_mapping)
