"""Unified Triton paged attention for a flattened varlen batch (decodes and prefill chunks).

One launch covers the whole step. Sequence i owns query rows
query_start_loc[i] .. query_start_loc[i+1] (query_len >= 1) and seq_len = seq_lens[i] keys:
the context_len = seq_len - query_len cached ones and its own new ones, all read from the pool
through block_tables[i]. Query j of the sequence sits at position context_len + j and sees keys
0 .. context_len + j (and, with a sliding window W, only keys with q_pos - k_pos < W).

Grid (no host sync: both sizes come from shapes)

    axis 0: query tiles, T // BLOCK_Q + num_seqs of them (T = query.shape[0])
    axis 1: KV heads

Sequence i is given the tiles first_tile(i) .. first_tile(i+1) - 1, first_tile(i) =
query_start_loc[i] // BLOCK_Q + i. That is floor(end/BQ) - floor(start/BQ) + 1 >= ceil(len/BQ)
tiles, so every query is covered; the spare tiles return at once. A program finds its sequence
by a binary search for the last i with first_tile(i) <= tile.

One program = one KV head x BLOCK_Q query tokens x all QPK = H / KVH query heads of that KV
head, stacked as BLOCK_M = BLOCK_Q * QPK rows (QPK need not be a power of two: rows past
BLOCK_Q * QPK are masked), so each K/V tile is loaded once for the whole group:

    row r  ->  token q_start + r // QPK,  head kv_head * QPK + r % QPK

    Q tile [BLOCK_M, D]    K/V tile [TILE_N, D]      key n of the sequence lives at
    +-----------+          +-----------+             block  = block_tables[i, n // BLOCK_SIZE]
    | t0 h0     |          | n0        |             slot   = n % BLOCK_SIZE
    | t0 h1     |  x  K^T  | n0+1      |             offset = block * stride_b (int64)
    | t1 h0     |          | ...       |                    + slot * stride_s
    | ...       |          +-----------+                    + kv_head * stride_h + d
    +-----------+

Keys are walked in tiles of TILE_N from the window start (0 without a window) to the
causal end of the tile's last query, with an online softmax in fp32 (exp2, log2(e) folded
into the scale). head_dim is padded to a power of two (>= 16) and masked.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_HEAD_DIM = 256


@triton.jit
def _find_sequence(query_start_loc_ptr, num_seqs, tile, BLOCK_Q: tl.constexpr):
    """Last sequence i with query_start_loc[i] // BLOCK_Q + i <= tile (binary search)."""
    lo = num_seqs * 0
    hi = num_seqs + 0
    while lo < hi:
        mid = (lo + hi) // 2
        first_tile = tl.load(query_start_loc_ptr + mid).to(tl.int32) // BLOCK_Q + mid
        if first_tile <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _load_kv_tile(key_cache_ptr, value_cache_ptr, table_row, n, n_ok, kv_head_off, dims, dim_ok,
                  stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                  BLOCK_SIZE: tl.constexpr):
    """K and V [TILE_N, D] of key positions n, read through the sequence's block table."""
    block = tl.load(table_row + n // BLOCK_SIZE, mask=n_ok, other=0).to(tl.int64)
    slot = (n % BLOCK_SIZE).to(tl.int64)
    kv_mask = n_ok[:, None] & dim_ok[None, :]
    k = tl.load(key_cache_ptr + block[:, None] * stride_kb + slot[:, None] * stride_ks
                + kv_head_off * stride_kh + dims[None, :], mask=kv_mask, other=0.0)
    v = tl.load(value_cache_ptr + block[:, None] * stride_vb + slot[:, None] * stride_vs
                + kv_head_off * stride_vh + dims[None, :], mask=kv_mask, other=0.0)
    return k, v


@triton.jit
def _online_softmax_step(q, k, v, allowed, m_i, l_i, acc, qk_scale,
                         FP32_IEEE: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """Fold one K/V tile into the running (max, sum, accumulator) of the rows of q; keys
    where ``allowed`` is False get no weight. Scores in the log2 domain (exp2)."""
    p_dtype = v.dtype
    if UPCAST_DOT:  # the interpreter has no bf16 dot: fp32, with P rounded as on a GPU
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    if FP32_IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = tl.where(allowed, s * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    p = p.to(p_dtype).to(v.dtype)
    if FP32_IEEE:
        pv = tl.dot(p, v, input_precision="ieee")
    else:
        pv = tl.dot(p, v)
    return m_new, l_i, acc * alpha[:, None] + pv


# num_seqs and stride_bt (the block-table width, which grows with the longest context) change
# from step to step: not specialized, or Triton would compile a variant for each value that
# is 1 or a multiple of 16 (a compile in the middle of serving, and one per CUDA graph size).
@triton.jit(do_not_specialize=["num_seqs", "stride_bt"])
def _paged_attention_kernel(
    out_ptr,              # [T, H, D]        stride_ot, stride_oh, 1
    query_ptr,            # [T, H, D]        stride_qt, stride_qh, 1
    key_cache_ptr,        # [NB, BS, KVH, D] stride_kb, stride_ks, stride_kh, 1
    value_cache_ptr,      # [NB, BS, KVH, D] stride_vb, stride_vs, stride_vh, 1
    query_start_loc_ptr,  # [B + 1] int32/int64
    seq_lens_ptr,         # [B] int32/int64
    block_tables_ptr,     # [B, max_blocks] int32, stride_bt, 1
    num_seqs,
    qk_scale,             # softmax scale * log2(e)
    sliding_window,       # int, used only when USE_WINDOW
    stride_ot, stride_oh,
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_bt,
    QPK: tl.constexpr,              # query heads per KV head
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PADDED: tl.constexpr,  # next power of two >= max(HEAD_DIM, 16)
    BLOCK_SIZE: tl.constexpr,       # KV cache block size
    BLOCK_M: tl.constexpr,          # rows per program (power of two >= 16)
    BLOCK_Q: tl.constexpr,          # query tokens per program = BLOCK_M // QPK
    TILE_N: tl.constexpr,           # keys per inner iteration (power of two >= 16)
    USE_WINDOW: tl.constexpr,
    FP32_IEEE: tl.constexpr,        # fp32 inputs: full-precision dots (no TF32)
    UPCAST_DOT: tl.constexpr,       # interpreter + bf16: dot in fp32 (interpreter can't do bf16)
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)

    seq = _find_sequence(query_start_loc_ptr, num_seqs, tile, BLOCK_Q)
    q_begin = tl.load(query_start_loc_ptr + seq).to(tl.int32)
    q_len = tl.load(query_start_loc_ptr + seq + 1).to(tl.int32) - q_begin
    q_start = (tile - (q_begin // BLOCK_Q + seq)) * BLOCK_Q  # first query of this tile, local
    if q_start >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    context_len = seq_len - q_len

    rows = tl.arange(0, BLOCK_M)
    q_tok = q_start + rows // QPK                       # local token index of each row
    head = kv_head * QPK + rows % QPK
    row_ok = (rows < BLOCK_Q * QPK) & (q_tok < q_len)
    q_pos = context_len + q_tok                          # absolute position of each row
    dims = tl.arange(0, HEAD_DIM_PADDED)
    dim_ok = dims < HEAD_DIM

    tok64 = (q_begin + q_tok).to(tl.int64)
    q_ptrs = query_ptr + tok64[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    if UPCAST_DOT:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite: fully masked rows stay 0
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PADDED], dtype=tl.float32)

    # keys [k_lo, k_hi): up to the last query of the tile (<= seq_len)
    k_hi = context_len + tl.minimum(q_start + BLOCK_Q, q_len)
    k_lo = 0
    if USE_WINDOW:
        k_lo = tl.maximum(context_len + q_start - sliding_window + 1, 0)
        k_lo = (k_lo // TILE_N) * TILE_N
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    kv_head_off = kv_head.to(tl.int64)

    for n0 in range(k_lo, k_hi, TILE_N):
        n = n0 + tl.arange(0, TILE_N)                    # key positions of this tile
        n_ok = n < k_hi
        k, v = _load_kv_tile(key_cache_ptr, value_cache_ptr, table_row, n, n_ok, kv_head_off,
                             dims, dim_ok, stride_kb, stride_ks, stride_kh,
                             stride_vb, stride_vs, stride_vh, BLOCK_SIZE)
        allowed = (n[None, :] <= q_pos[:, None]) & n_ok[None, :] & row_ok[:, None]
        if USE_WINDOW:
            allowed = allowed & (q_pos[:, None] - n[None, :] < sliding_window)
        m_i, l_i, acc = _online_softmax_step(q, k, v, allowed, m_i, l_i, acc, qk_scale,
                                             FP32_IEEE, UPCAST_DOT)

    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    acc = acc / l_i[:, None]
    o_ptrs = out_ptr + tok64[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


# ---- split-KV decode (flash-decoding) ------------------------------------------------------
# A decode-only step has one query per sequence, so the unified grid is num_seqs x KVH programs:
# 3 for SmolLM2 at batch 1, on a GPU with 132 SMs. Here each (sequence, KV head) also splits its
# keys over NUM_SPLITS programs; each writes its part's running max m, sum l and unnormalized
# accumulator (fp32), and a second kernel merges the parts:
#
#     M = max_s m_s     L = sum_s l_s * 2^(m_s - M)     out = sum_s acc_s * 2^(m_s - M) / L
#
# The split count depends only on the batch size and the model (decode_num_splits), never on
# the sequence lengths, so a captured CUDA graph stays valid as contexts grow. A split whose
# key range is empty writes m = -1e30, l = 0, acc = 0 and weighs nothing in the merge.
@triton.jit(do_not_specialize=["stride_bt"])
def _paged_decode_split_kernel(
    part_acc_ptr,         # [B, H, S, D] fp32
    part_ml_ptr,          # [B, H, S, 2] fp32: (m, l) per split
    query_ptr, key_cache_ptr, value_cache_ptr,
    query_start_loc_ptr, seq_lens_ptr, block_tables_ptr,
    qk_scale, sliding_window,
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_bt,
    NUM_HEADS: tl.constexpr,
    QPK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PADDED: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,          # power of two >= max(QPK, 16): rows past QPK are masked
    TILE_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    FP32_IEEE: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    token = tl.load(query_start_loc_ptr + seq).to(tl.int64)
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    q_pos = seq_len - 1

    rows = tl.arange(0, BLOCK_M)
    head = kv_head * QPK + rows
    row_ok = rows < QPK
    dims = tl.arange(0, HEAD_DIM_PADDED)
    dim_ok = dims < HEAD_DIM
    q = tl.load(query_ptr + token * stride_qt + head[:, None] * stride_qh + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    if UPCAST_DOT:
        q = q.to(tl.float32)

    # this split's tiles of the keys [k_lo, seq_len)
    k_lo = 0
    if USE_WINDOW:
        k_lo = tl.maximum(seq_len - sliding_window, 0)
        k_lo = (k_lo // TILE_N) * TILE_N
    num_tiles = tl.cdiv(seq_len - k_lo, TILE_N)
    per_split = tl.cdiv(num_tiles, NUM_SPLITS)
    n_begin = k_lo + split * per_split * TILE_N
    n_end = tl.minimum(n_begin + per_split * TILE_N, seq_len)

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PADDED], dtype=tl.float32)
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    kv_head_off = kv_head.to(tl.int64)
    for n0 in range(n_begin, n_end, TILE_N):
        n = n0 + tl.arange(0, TILE_N)
        n_ok = n < n_end
        k, v = _load_kv_tile(key_cache_ptr, value_cache_ptr, table_row, n, n_ok, kv_head_off,
                             dims, dim_ok, stride_kb, stride_ks, stride_kh,
                             stride_vb, stride_vs, stride_vh, BLOCK_SIZE)
        allowed = n_ok[None, :] & row_ok[:, None]
        if USE_WINDOW:
            allowed = allowed & (q_pos - n[None, :] < sliding_window)
        m_i, l_i, acc = _online_softmax_step(q, k, v, allowed, m_i, l_i, acc, qk_scale,
                                             FP32_IEEE, UPCAST_DOT)

    part = (seq.to(tl.int64) * NUM_HEADS + head) * NUM_SPLITS + split  # [BLOCK_M]
    tl.store(part_ml_ptr + part * 2, m_i, mask=row_ok)
    tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=row_ok)
    tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + dims[None, :], acc,
             mask=row_ok[:, None] & dim_ok[None, :])


@triton.jit
def _merge_splits_kernel(
    out_ptr, part_acc_ptr, part_ml_ptr, query_start_loc_ptr,
    stride_ot, stride_oh,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    token = tl.load(query_start_loc_ptr + seq).to(tl.int64)
    splits = tl.arange(0, NUM_SPLITS)
    part = (seq.to(tl.int64) * NUM_HEADS + head) * NUM_SPLITS + splits
    m = tl.load(part_ml_ptr + part * 2)
    l_s = tl.load(part_ml_ptr + part * 2 + 1)
    dims = tl.arange(0, HEAD_DIM_PADDED)
    dim_ok = dims < HEAD_DIM
    acc = tl.load(part_acc_ptr + part[:, None] * HEAD_DIM + dims[None, :],
                  mask=dim_ok[None, :], other=0.0)
    m_max = tl.max(m, axis=0)
    w = tl.exp2(m - m_max)
    total = tl.sum(l_s * w, axis=0)
    total = tl.where(total == 0.0, 1.0, total)  # a sequence with no keys (graph padding): 0
    o = tl.sum(acc * w[:, None], axis=0) / total
    tl.store(out_ptr + token * stride_ot + head * stride_oh + dims,
             o.to(out_ptr.dtype.element_ty), mask=dim_ok)


MAX_DECODE_SPLITS = 16
INTERPRETER_SMS = 8  # a pretend device for the interpreter: small batches take the split path


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    """SMs of a CUDA device (asked once: eager decode steps ask every layer)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRETER_SMS


def decode_num_splits(num_seqs: int, num_kv_heads: int, device: torch.device) -> int:
    """Key splits per (sequence, KV head) of a decode-only step: enough programs to fill the
    device once (a power of two, at most MAX_DECODE_SPLITS); 1 when the batch fills it alone.
    Depends on shapes only, so a CUDA graph captured for a batch size keeps its split count."""
    sms = _multiprocessors(device)
    programs = max(1, num_seqs * num_kv_heads)
    if programs >= sms:
        return 1
    return min(MAX_DECODE_SPLITS, triton.next_power_of_2(triton.cdiv(sms, programs)))


def is_interpreted() -> bool:
    """True when the kernels were defined under TRITON_INTERPRET=1 (they then run on CPU)."""
    return type(_paged_attention_kernel).__name__ == "InterpretedFunction"


def check_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (all tensors on one device).")


def check_kernel_device(device: torch.device) -> None:
    if device.type != "cuda" and not is_interpreted():
        raise ValueError(
            f"the Triton kernels need CUDA tensors (got {device}); to run them on CPU in the "
            "Triton interpreter, set TRITON_INTERPRET=1 before the kernels module is first "
            "imported (the kernels are defined at import time).")


def _check_index(name: str, t: torch.Tensor, ndim: int) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}.")
    if t.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be int32 or int64, got {t.dtype}.")


def paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                    block_tables: torch.Tensor, scale: float, sliding_window: int | None = None,
                    out: torch.Tensor | None = None, num_splits: int = 1) -> torch.Tensor:
    """Causal attention of each sequence's new queries against its paged K/V.

    query [T, H, D]; key_cache / value_cache [num_blocks, block_size, KVH, D];
    query_start_loc [B + 1], seq_lens [B], block_tables [B, max_blocks] (device tensors);
    returns ``out`` [T, H, D] (allocated when None). Rows of ``query`` past
    query_start_loc[-1] are not written. ``num_splits`` > 1 splits each sequence's keys over
    that many programs when the step is decode-only (T == num_seqs; see decode_num_splits);
    other steps ignore it.
    """
    if query.dim() != 3:
        raise ValueError("query must be [num_tokens, num_heads, head_dim], got "
                         f"{tuple(query.shape)}.")
    if key_cache.dim() != 4:
        raise ValueError("key_cache must be [num_blocks, block_size, num_kv_heads, head_dim], "
                         f"got {tuple(key_cache.shape)}.")
    if value_cache.shape != key_cache.shape:
        raise ValueError(f"value_cache shape {tuple(value_cache.shape)} differs from key_cache "
                         f"{tuple(key_cache.shape)}.")
    num_tokens, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, kv_head_dim = key_cache.shape
    if kv_head_dim != head_dim:
        raise ValueError(f"query head_dim {head_dim} != cache head_dim {kv_head_dim}.")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in [1, {MAX_HEAD_DIM}], got {head_dim}.")
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}.")
    if query.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"query dtype must be float32, bfloat16 or float16, got {query.dtype}.")
    if key_cache.dtype != query.dtype or value_cache.dtype != query.dtype:
        raise ValueError(f"dtypes differ: query {query.dtype}, key_cache {key_cache.dtype}, "
                         f"value_cache {value_cache.dtype}.")
    _check_index("query_start_loc", query_start_loc, 1)
    _check_index("seq_lens", seq_lens, 1)
    _check_index("block_tables", block_tables, 2)
    num_seqs = seq_lens.shape[0]
    if query_start_loc.shape[0] != num_seqs + 1:
        raise ValueError(f"query_start_loc has {query_start_loc.shape[0]} entries for "
                         f"{num_seqs} sequences (expected num_seqs + 1).")
    if block_tables.shape[0] != num_seqs:
        raise ValueError(f"block_tables has {block_tables.shape[0]} rows for {num_seqs} sequences.")
    if block_tables.dtype != torch.int32:
        raise ValueError(f"block_tables must be int32, got {block_tables.dtype}.")
    if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window < 1):
        raise ValueError(f"sliding_window must be None or a positive int, got {sliding_window!r}.")
    if out is None:
        out = torch.empty_like(query)
    elif out.shape != query.shape or out.dtype != query.dtype:
        raise ValueError(f"out must be {tuple(query.shape)} {query.dtype}, got "
                         f"{tuple(out.shape)} {out.dtype}.")
    for name, t in (("query", query), ("key_cache", key_cache), ("value_cache", value_cache),
                    ("out", out), ("block_tables", block_tables)):
        if t.numel() and t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension "
                             f"(stride {t.stride(-1)}).")
    device = query.device
    for name, t in (("key_cache", key_cache), ("value_cache", value_cache), ("out", out),
                    ("query_start_loc", query_start_loc), ("seq_lens", seq_lens),
                    ("block_tables", block_tables)):
        check_device(name, t, device)
    check_kernel_device(device)
    if num_tokens == 0 or num_seqs == 0:
        return out

    if not isinstance(num_splits, int) or not 1 <= num_splits <= MAX_DECODE_SPLITS \
            or num_splits & (num_splits - 1):
        raise ValueError(f"num_splits must be a power of two in [1, {MAX_DECODE_SPLITS}], got "
                         f"{num_splits!r}.")
    if num_splits > 1 and num_tokens == num_seqs:
        plans = split_launch_plan(query, key_cache, value_cache, query_start_loc, seq_lens,
                                  block_tables, scale, sliding_window, out, num_splits)
        for kernel, (grid, args, meta) in zip((_paged_decode_split_kernel, _merge_splits_kernel),
                                              plans):
            kernel[grid](*args, **meta)
        return out
    grid, args, meta = launch_plan(query, key_cache, value_cache, query_start_loc, seq_lens,
                                   block_tables, scale, sliding_window, out)
    _paged_attention_kernel[grid](*args, **meta)
    return out


def split_launch_plan(query, key_cache, value_cache, query_start_loc, seq_lens, block_tables,
                      scale, sliding_window, out, num_splits):
    """The split-KV decode's two launches: [(grid, args, meta)] for the split kernel, then the
    merge. Allocates the fp32 partials (from the graph pool when captured)."""
    num_tokens, num_heads, head_dim = query.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    num_seqs = seq_lens.shape[0]
    qpk = num_heads // num_kv_heads
    head_dim_padded = max(16, triton.next_power_of_2(head_dim))
    part_acc = torch.empty((num_seqs, num_heads, num_splits, head_dim), dtype=torch.float32,
                           device=query.device)
    part_ml = torch.empty((num_seqs, num_heads, num_splits, 2), dtype=torch.float32,
                          device=query.device)
    split = ((num_seqs, num_kv_heads, num_splits),
             (part_acc, part_ml, query, key_cache, value_cache, query_start_loc, seq_lens,
              block_tables, scale * LOG2E, sliding_window or 0,
              query.stride(0), query.stride(1),
              key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
              value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
              block_tables.stride(0)),
             dict(NUM_HEADS=num_heads, QPK=qpk, HEAD_DIM=head_dim,
                  HEAD_DIM_PADDED=head_dim_padded, BLOCK_SIZE=block_size,
                  BLOCK_M=max(16, triton.next_power_of_2(qpk)),
                  TILE_N=64 if head_dim_padded * query.element_size() <= 256 else 32,
                  NUM_SPLITS=num_splits, USE_WINDOW=sliding_window is not None,
                  FP32_IEEE=query.dtype == torch.float32,
                  UPCAST_DOT=is_interpreted() and query.dtype == torch.bfloat16,
                  num_warps=4, num_stages=2))
    merge = ((num_seqs, num_heads),
             (out, part_acc, part_ml, query_start_loc, out.stride(0), out.stride(1)),
             dict(NUM_HEADS=num_heads, HEAD_DIM=head_dim, HEAD_DIM_PADDED=head_dim_padded,
                  NUM_SPLITS=num_splits, num_warps=1))
    return split, merge


def launch_plan(query, key_cache, value_cache, query_start_loc, seq_lens, block_tables, scale,
                sliding_window, out):
    """(grid, positional args, constexprs + launch options) for validated inputs; from host
    shapes only. Separate from the launch so a test can compile exactly this for a GPU."""
    num_tokens, num_heads, head_dim = query.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    num_seqs = seq_lens.shape[0]
    qpk = num_heads // num_kv_heads
    decode_only = num_tokens == num_seqs  # every sequence has one query (host shapes only)
    block_m = max(16 if decode_only else 64, triton.next_power_of_2(qpk))
    block_q = block_m // qpk
    head_dim_padded = max(16, triton.next_power_of_2(head_dim))
    tile_n = 64 if head_dim_padded * query.element_size() <= 256 else 32
    grid = (num_tokens // block_q + num_seqs, num_kv_heads)
    args = (out, query, key_cache, value_cache, query_start_loc, seq_lens, block_tables,
            num_seqs, scale * LOG2E, sliding_window or 0,
            out.stride(0), out.stride(1),
            query.stride(0), query.stride(1),
            key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
            value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
            block_tables.stride(0))
    meta = dict(QPK=qpk, HEAD_DIM=head_dim, HEAD_DIM_PADDED=head_dim_padded,
                BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_Q=block_q, TILE_N=tile_n,
                USE_WINDOW=sliding_window is not None,
                FP32_IEEE=query.dtype == torch.float32,
                UPCAST_DOT=is_interpreted() and query.dtype == torch.bfloat16,
                num_warps=4, num_stages=2)
    return grid, args, meta
