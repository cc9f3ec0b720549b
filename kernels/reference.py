"""Torch implementations of the paged-attention ops: the CPU backend and the kernels' oracle.

Layouts (shared with the Triton kernels):
    query            [num_tokens, num_heads, head_dim]           flattened batch
    key / value      [num_tokens, num_kv_heads, head_dim]        this step's new rows
    key_cache        [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping     [num_tokens]   block_id * block_size + offset; -1 = do not store
    block_tables     [num_seqs, max_blocks_per_seq]               block ids, padded
    query_start_loc  [num_seqs + 1] cumulative query lengths
    seq_lens         [num_seqs]     context_len + query_len per sequence

For sequence i the new queries sit at the end of its sequence:

    |<-------------- seq_len ---------------->|
    |<---- context_len ---->|<-- query_len -->|
    query j (0-based) has absolute position context_len + j and attends keys 0..context_len + j
    (and, with a sliding window W, only keys with position > context_len + j - W).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def store_kv(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
             value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write each token's K/V row into its slot; slot -1 is skipped (padding)."""
    if (slot_mapping < 0).any():
        keep = slot_mapping >= 0
        key, value, slot_mapping = key[keep], value[keep], slot_mapping[keep]
    key_cache.view(-1, *key_cache.shape[2:]).index_copy_(0, slot_mapping, key.to(key_cache.dtype))
    value_cache.view(-1, *value_cache.shape[2:]).index_copy_(
        0, slot_mapping, value.to(value_cache.dtype))


def _causal_mask(context_len: int, query_len: int, seq_len: int, sliding_window: int | None,
                 device: torch.device) -> torch.Tensor:
    q_pos = torch.arange(context_len, context_len + query_len, device=device)[:, None]
    k_pos = torch.arange(seq_len, device=device)[None, :]
    mask = k_pos <= q_pos
    if sliding_window is not None:
        mask &= k_pos > q_pos - sliding_window
    return mask


def _gather(cache: torch.Tensor, block_ids: torch.Tensor, seq_len: int,
            dtype: torch.dtype) -> torch.Tensor:
    """[seq_len, num_kv_heads, head_dim] rows of one sequence, read through its block table,
    as ``dtype`` (the query's: a pool may be narrower, kv_cache_dtype)."""
    return cache[block_ids].flatten(0, 1)[:seq_len].to(dtype)


def paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    query_start_loc: list[int], seq_lens: list[int], block_tables: torch.Tensor,
                    scale: float, sliding_window: int | None = None) -> torch.Tensor:
    """Causal attention of each sequence's new queries against its cached K/V.

    ``query_start_loc`` and ``seq_lens`` are host lists (the CPU backend loops over sequences).
    Returns [num_tokens, num_heads, head_dim].
    """
    out = torch.empty_like(query)
    decodes = [i for i in range(len(seq_lens)) if query_start_loc[i + 1] - query_start_loc[i] == 1]
    if len(decodes) > 1 and sliding_window is None:
        _decode_batch(query, key_cache, value_cache, query_start_loc, seq_lens, block_tables,
                      scale, decodes, out)
        done = set(decodes)
    else:
        done = set()
    for i, seq_len in enumerate(seq_lens):
        if i not in done:
            start, end = query_start_loc[i], query_start_loc[i + 1]
            out[start:end] = attend_sequence(query[start:end], key_cache, value_cache,
                                             block_tables[i], seq_len, scale, sliding_window)
    return out


def attend_sequence(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    block_ids: torch.Tensor, seq_len: int, scale: float,
                    sliding_window: int | None = None) -> torch.Tensor:
    """One sequence: its query_len new queries [q, heads, dim] against its seq_len keys."""
    query_len = query.shape[0]
    num_blocks = -(-seq_len // key_cache.shape[1])
    # [1, heads, len, head_dim]: with a batch dim SDPA takes its fused CPU kernel (a 3-D
    # input falls back to the unfused math path, whose bf16 rounding differs).
    k = _gather(key_cache, block_ids[:num_blocks], seq_len, query.dtype).transpose(0, 1)[None]
    v = _gather(value_cache, block_ids[:num_blocks], seq_len, query.dtype).transpose(0, 1)[None]
    q = query.transpose(0, 1)[None]
    mask = None
    if query_len > 1 or sliding_window is not None:
        mask = _causal_mask(seq_len - query_len, query_len, seq_len, sliding_window, q.device)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return o[0].transpose(0, 1)


def attend_fresh_sequence(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          scale: float) -> torch.Tensor:
    """A sequence with no cached context (its whole prompt in this step, no sliding window):
    causal SDPA on the step's own K/V rows, [len, heads, dim] each. No gather from the pool
    and no mask tensor."""
    q, k, v = (t.transpose(0, 1)[None] for t in (query, key, value))
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    return o[0].transpose(0, 1)


def _decode_batch(query, key_cache, value_cache, query_start_loc, seq_lens, block_tables,
                  scale, decodes, out) -> None:
    """All single-token queries in one padded SDPA call (keys past seq_len masked out)."""
    block_size = key_cache.shape[1]
    idx = torch.tensor(decodes, device=query.device)
    lens = torch.tensor([seq_lens[i] for i in decodes], device=query.device)
    max_len = int(lens.max())
    num_blocks = -(-max_len // block_size)
    tables = block_tables[idx, :num_blocks]
    k = key_cache[tables].flatten(1, 2)[:, :max_len].transpose(1, 2).to(query.dtype)  # [B, KVH, L, D]
    v = value_cache[tables].flatten(1, 2)[:, :max_len].transpose(1, 2).to(query.dtype)
    rows = torch.tensor([query_start_loc[i] for i in decodes], device=query.device)
    q = query[rows].unsqueeze(2)  # [B, H, 1, D]
    mask = (torch.arange(max_len, device=query.device)[None, :] < lens[:, None])[:, None, None, :]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    out[rows] = o.squeeze(2)
