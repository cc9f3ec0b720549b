"""Attention backends over the paged KV cache, and the metadata the model runner builds for them.

A backend stores the step's new K/V rows into the pool (slot_mapping) and then attends
each sequence's new queries against all of its K/V, read through its block table.
Every layer stores the whole batch before attending, which is what lets a request admitted
in the same step read prefix blocks another request is computing (see KVCacheManager).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from kernels import reference


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor      # [num_tokens] int64
    query_start_loc: torch.Tensor   # [num_seqs + 1] int32
    seq_lens: torch.Tensor          # [num_seqs] int32
    block_tables: torch.Tensor      # [num_seqs, max_blocks] int32
    query_start_loc_cpu: list[int]  # host copies, for backends that loop over sequences
    seq_lens_cpu: list[int]
    max_query_len: int
    max_seq_len: int

    @functools.cached_property
    def decode_split(self) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """(query rows of the single-token sequences, those sequences' indices, the indices of
        the multi-token ones): derived once per step, shared by every layer."""
        qsl = self.query_start_loc_cpu
        decodes = [i for i in range(len(qsl) - 1) if qsl[i + 1] - qsl[i] == 1]
        device = self.query_start_loc.device
        rows = torch.tensor([qsl[i] for i in decodes], dtype=torch.long, device=device)
        idx = torch.tensor(decodes, dtype=torch.long, device=device)
        return rows, idx, [i for i in range(len(qsl) - 1) if qsl[i + 1] - qsl[i] > 1]


class AttentionBackend:
    name = "base"

    def __init__(self, head_dim: int, sliding_window: int | None = None) -> None:
        self.scale = head_dim ** -0.5
        self.sliding_window = sliding_window

    def forward(self, q, k, v, kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        raise NotImplementedError


class TorchAttentionBackend(AttentionBackend):
    """CPU path: torch ops (SDPA per sequence; decodes batched)."""
    name = "torch"

    def forward(self, q, k, v, kv_cache, meta):
        key_cache, value_cache = kv_cache[0], kv_cache[1]
        reference.store_kv(k, v, key_cache, value_cache, meta.slot_mapping)
        return reference.paged_attention(q, key_cache, value_cache, meta.query_start_loc_cpu,
                                         meta.seq_lens_cpu, meta.block_tables, self.scale,
                                         self.sliding_window)


class CpuAttentionBackend(TorchAttentionBackend):
    """CPU default: K/V stored, decode rows and prefill chunks attended by the C++ ops
    (torch.ops.kvserve.*, reading K/V in place from the pool; paged_prefill needs AVX-512 and
    fp32 activations, else prefill chunks go through per-sequence SDPA). A pure decode step
    is two op calls per layer with no host sync, so torch.compile can trace it. Falls back to
    the torch backend's ops when the C++ ops cannot be built."""
    name = "cpu"

    def __init__(self, head_dim: int, sliding_window: int | None = None) -> None:
        super().__init__(head_dim, sliding_window)
        from kernels import cpu_attention

        self.native = cpu_attention.available()
        self.window = sliding_window or 0
        self.prefill_native = cpu_attention.has_paged_prefill(head_dim)

    def forward(self, q, k, v, kv_cache, meta):
        if not self.native:
            return super().forward(q, k, v, kv_cache, meta)
        key_cache, value_cache = kv_cache[0], kv_cache[1]
        torch.ops.kvserve.store_kv(k, v, key_cache, value_cache, meta.slot_mapping)
        if meta.max_query_len == 1:  # a pure decode step: one call for the whole batch
            return torch.ops.kvserve.paged_decode(q, key_cache, value_cache, meta.block_tables,
                                                  meta.seq_lens, self.scale, self.window)
        qsl, lens = meta.query_start_loc_cpu, meta.seq_lens_cpu
        out = torch.empty_like(q)
        rows, idx, prefills = meta.decode_split
        if len(rows):
            out[rows] = torch.ops.kvserve.paged_decode(
                q[rows], key_cache, value_cache, meta.block_tables[idx], meta.seq_lens[idx],
                self.scale, self.window)
        if prefills and self.prefill_native and q.dtype == torch.float32:
            # All multi-token sequences in one call, K/V read from the pool.
            torch.ops.kvserve.paged_prefill(q, key_cache, value_cache, meta.block_tables,
                                            meta.seq_lens, meta.query_start_loc, self.scale,
                                            self.window, out)
            return out
        for i in prefills:
            start, end = qsl[i], qsl[i + 1]
            if lens[i] == end - start and self.sliding_window is None:
                # No cached context: attend over this step's own rows (a full-precision
                # copy even when the pool is narrower), ~2x cheaper than gather + mask.
                out[start:end] = reference.attend_fresh_sequence(
                    q[start:end], k[start:end], v[start:end], self.scale)
            else:
                out[start:end] = reference.attend_sequence(
                    q[start:end], key_cache, value_cache, meta.block_tables[i], lens[i],
                    self.scale, self.sliding_window)
        return out


class TritonAttentionBackend(AttentionBackend):
    """CUDA path: the Triton KV store and unified paged-attention kernels (one launch each per
    layer for the whole flattened batch, no host sync, so a step can be a CUDA graph).

    On CPU the kernels run only in the Triton interpreter (TRITON_INTERPRET=1 set before
    kernels.paged_attention is first imported): slow, for tests. triton is imported here,
    not at module level, so the torch backend never needs it.
    """
    name = "triton"

    def __init__(self, head_dim: int, sliding_window: int | None = None) -> None:
        super().__init__(head_dim, sliding_window)
        from kernels.kv_store import store_kv
        from kernels.paged_attention import decode_num_splits, paged_attention

        self._store_kv = store_kv
        self._paged_attention = paged_attention
        self._num_splits = decode_num_splits

    def forward(self, q, k, v, kv_cache, meta):
        key_cache, value_cache = kv_cache[0], kv_cache[1]
        self._store_kv(k, v, key_cache, value_cache, meta.slot_mapping)
        # a decode-only step splits long contexts over more programs (flash-decoding) when the
        # batch alone leaves the device idle; the count follows the batch size, not the lengths
        splits = 1
        if meta.max_query_len == 1:
            splits = self._num_splits(len(meta.seq_lens_cpu), key_cache.shape[2], q.device)
        return self._paged_attention(q, key_cache, value_cache, meta.query_start_loc,
                                     meta.seq_lens, meta.block_tables, self.scale,
                                     self.sliding_window, num_splits=splits)


BACKENDS = {"cpu": CpuAttentionBackend, "torch": TorchAttentionBackend,
            "triton": TritonAttentionBackend}


def get_backend(name: str, head_dim: int, sliding_window: int | None) -> AttentionBackend:
    if name not in BACKENDS:
        raise ValueError(f"attention_backend {name!r} is not available; choose from "
                         f"{', '.join(BACKENDS)}.")
    return BACKENDS[name](head_dim, sliding_window)
