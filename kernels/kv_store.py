"""Triton KV store: write the step's new K/V rows into their pool slots.

    key / value   [T, KVH, D]                    (any token/head strides, last dim contiguous)
    slot_mapping  [T]   slot = block * block_size + offset; -1 = skip (padding)
    key_cache     [num_blocks, block_size, KVH, D]

One program stores BLOCK_T tokens; each token's KVH x D row is one flattened column range
c = h * D_PADDED + d (D and KVH padded to powers of two and masked):

    token t  --slot_mapping[t]-->  block = slot // block_size, offset = slot % block_size
    key[t, h, d]  ->  key_cache + block * stride_b + offset * stride_s + h * stride_h + d
                      (int64: pools of 10^5+ blocks pass 2^31 elements)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .paged_attention import SUPPORTED_DTYPES, check_device, check_kernel_device


# num_tokens changes every step: not specialized (no new variant when it is 1 or a multiple of 16)
@triton.jit(do_not_specialize=["num_tokens"])
def _store_kv_kernel(
    key_ptr,          # [T, KVH, D]        stride_kt, stride_kh, 1
    value_ptr,        # [T, KVH, D]        stride_vt, stride_vh, 1
    key_cache_ptr,    # [NB, BS, KVH, D]   stride_cb, stride_cs, stride_ch, 1
    value_cache_ptr,  # [NB, BS, KVH, D]   stride_db, stride_ds, stride_dh, 1
    slot_mapping_ptr,  # [T] int32/int64, -1 = skip
    num_tokens,
    stride_kt, stride_kh,
    stride_vt, stride_vh,
    stride_cb, stride_cs, stride_ch,
    stride_db, stride_ds, stride_dh,
    NUM_KV_HEADS: tl.constexpr,
    KV_HEADS_PADDED: tl.constexpr,  # next power of two >= NUM_KV_HEADS
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PADDED: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_ok = toks < num_tokens
    slot = tl.load(slot_mapping_ptr + toks, mask=tok_ok, other=-1).to(tl.int64)
    tok_ok = tok_ok & (slot >= 0)
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE

    cols = tl.arange(0, KV_HEADS_PADDED * HEAD_DIM_PADDED)
    head = (cols // HEAD_DIM_PADDED).to(tl.int64)
    dim = cols % HEAD_DIM_PADDED
    mask = tok_ok[:, None] & ((dim < HEAD_DIM) & (head < NUM_KV_HEADS))[None, :]
    tok64 = toks.to(tl.int64)

    k = tl.load(key_ptr + tok64[:, None] * stride_kt + head[None, :] * stride_kh + dim[None, :],
                mask=mask)
    v = tl.load(value_ptr + tok64[:, None] * stride_vt + head[None, :] * stride_vh + dim[None, :],
                mask=mask)
    tl.store(key_cache_ptr + block[:, None] * stride_cb + offset[:, None] * stride_cs
             + head[None, :] * stride_ch + dim[None, :], k, mask=mask)
    tl.store(value_cache_ptr + block[:, None] * stride_db + offset[:, None] * stride_ds
             + head[None, :] * stride_dh + dim[None, :], v, mask=mask)


def store_kv(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
             value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write key/value [T, KVH, D] rows into their slots of key_cache/value_cache
    [num_blocks, block_size, KVH, D]; slot -1 is skipped. Same contract as
    kernels.reference.store_kv (slots are not bounds-checked: no host sync)."""
    if key.dim() != 3 or value.shape != key.shape:
        raise ValueError(f"key and value must both be [num_tokens, num_kv_heads, head_dim], got "
                         f"{tuple(key.shape)} and {tuple(value.shape)}.")
    if key_cache.dim() != 4 or value_cache.shape != key_cache.shape:
        raise ValueError("key_cache and value_cache must both be [num_blocks, block_size, "
                         f"num_kv_heads, head_dim], got {tuple(key_cache.shape)} and "
                         f"{tuple(value_cache.shape)}.")
    num_tokens, num_kv_heads, head_dim = key.shape
    if tuple(key_cache.shape[2:]) != (num_kv_heads, head_dim):
        raise ValueError(f"rows are [{num_kv_heads}, {head_dim}] but the cache holds "
                         f"{tuple(key_cache.shape[2:])}.")
    if slot_mapping.dim() != 1 or slot_mapping.shape[0] != num_tokens:
        raise ValueError(f"slot_mapping must be [{num_tokens}], got {tuple(slot_mapping.shape)}.")
    if slot_mapping.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"slot_mapping must be int64 (or int32), got {slot_mapping.dtype}.")
    if key_cache.dtype not in SUPPORTED_DTYPES:
        raise ValueError("cache dtype must be float32, bfloat16 or float16, got "
                         f"{key_cache.dtype}.")
    for name, t in (("key", key), ("value", value), ("value_cache", value_cache)):
        if t.dtype != key_cache.dtype:
            raise ValueError(f"{name} dtype {t.dtype} differs from key_cache {key_cache.dtype}.")
    for name, t in (("key", key), ("value", value), ("key_cache", key_cache),
                    ("value_cache", value_cache)):
        if t.numel() and t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension "
                             f"(stride {t.stride(-1)}).")
    device = key.device
    for name, t in (("value", value), ("key_cache", key_cache), ("value_cache", value_cache),
                    ("slot_mapping", slot_mapping)):
        check_device(name, t, device)
    check_kernel_device(device)
    if num_tokens == 0:
        return
    grid, args, meta = launch_plan(key, value, key_cache, value_cache, slot_mapping)
    _store_kv_kernel[grid](*args, **meta)


def launch_plan(key, value, key_cache, value_cache, slot_mapping):
    """(grid, positional args, constexprs + launch options) for validated inputs."""
    num_tokens, num_kv_heads, head_dim = key.shape
    head_dim_padded = triton.next_power_of_2(head_dim)
    kvh_padded = triton.next_power_of_2(num_kv_heads)
    block_t = max(1, min(16, 4096 // (kvh_padded * head_dim_padded)))
    grid = (triton.cdiv(num_tokens, block_t),)
    args = (key, value, key_cache, value_cache, slot_mapping, num_tokens,
            key.stride(0), key.stride(1), value.stride(0), value.stride(1),
            key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
            value_cache.stride(0), value_cache.stride(1), value_cache.stride(2))
    meta = dict(NUM_KV_HEADS=num_kv_heads, KV_HEADS_PADDED=kvh_padded, HEAD_DIM=head_dim,
                HEAD_DIM_PADDED=head_dim_padded, BLOCK_SIZE=key_cache.shape[1], BLOCK_T=block_t,
                num_warps=4)
    return grid, args, meta
