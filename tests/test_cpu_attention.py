"""The C++ CPU paged-decode op against the torch reference, and the "cpu" backend on mixed
steps (decodes through the op, prefill chunks through SDPA)."""
from __future__ import annotations

import pytest
import torch

from engine.model_executor.attention import AttentionMetadata, CpuAttentionBackend, TorchAttentionBackend
from kernels import cpu_attention, cpu_ops, reference

pytestmark = pytest.mark.skipif(not cpu_attention.available(), reason="no C++ toolchain")
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def make_pool(num_blocks, block_size, kv_heads, head_dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    return k, v


def random_tables(seq_lens, block_size, num_blocks, seed=0):
    """Non-contiguous random blocks per sequence; padding entries point at block 0."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_blocks, generator=g)
    width = max(-(-n // block_size) for n in seq_lens)
    tables = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    used = 0
    for i, n in enumerate(seq_lens):
        nb = -(-n // block_size)
        tables[i, :nb] = perm[used:used + nb].to(torch.int32)
        used += nb
    return tables


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(4, 4, 64), (9, 3, 64), (8, 2, 80),
                                                        (10, 2, 48), (4, 1, 128), (6, 2, 32),
                                                        (2, 2, 16)])
@pytest.mark.parametrize("block_size", [16, 32])
def test_decode_matches_reference(dtype, heads, kv_heads, head_dim, block_size):
    lens = [1, 15, 16, 17, 100, 333]
    k, v = make_pool(400, block_size, kv_heads, head_dim, dtype)
    tables = random_tables(lens, block_size, 400)
    q = torch.randn(len(lens), heads, head_dim).to(dtype)
    out = cpu_attention.paged_decode(q, k, v, tables, torch.tensor(lens), head_dim ** -0.5)
    ref = reference.paged_attention(q.float(), k.float(), v.float(), list(range(len(lens) + 1)),
                                    lens, tables, head_dim ** -0.5)
    torch.testing.assert_close(out.float(), ref, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("pool_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(9, 3, 64), (8, 2, 80), (4, 1, 128)])
def test_decode_float32_query_over_a_narrow_pool(pool_dtype, heads, kv_heads, head_dim):
    """kv_cache_dtype: rows are widened exactly, so an fp32 query over a bf16/fp16 pool
    equals fp32 attention over the widened pool (the AVX-512 kernel and the generic one)."""
    lens = [1, 17, 100, 333]
    k, v = make_pool(200, 16, kv_heads, head_dim, pool_dtype)
    tables = random_tables(lens, 16, 200)
    q = torch.randn(len(lens), heads, head_dim)
    out = cpu_attention.paged_decode(q, k, v, tables, torch.tensor(lens), head_dim ** -0.5)
    ref = reference.paged_attention(q, k.float(), v.float(), list(range(len(lens) + 1)), lens,
                                    tables, head_dim ** -0.5)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [1, 7, 16, 40])
def test_decode_sliding_window(window):
    lens = [1, 10, 33, 90]
    k, v = make_pool(64, 16, 2, 32, torch.float32)
    tables = random_tables(lens, 16, 64)
    q = torch.randn(len(lens), 4, 32)
    out = cpu_attention.paged_decode(q, k, v, tables, torch.tensor(lens), 0.2, window)
    ref = torch.stack([reference.attend_sequence(q[i:i + 1], k, v, tables[i], n, 0.2, window)[0]
                       for i, n in enumerate(lens)])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scale, tol", [(3.0, 1e-5), (30.0, 3e-4)])
def test_decode_peaked_softmax(scale, tol):
    """Scores hundreds apart: the vector exp's range reduction and underflow to 0. (At scale
    30 a score is ~250, so fp32 rounding of the dot product alone moves a weight by ~3e-5.)"""
    lens = [5, 64, 130]
    k, v = make_pool(64, 16, 2, 64, torch.float32, seed=3)
    tables = random_tables(lens, 16, 64)
    q = torch.randn(len(lens), 6, 64)
    out = cpu_attention.paged_decode(q, k, v, tables, torch.tensor(lens), scale)
    ref = reference.paged_attention(q, k, v, list(range(len(lens) + 1)), lens, tables, scale)
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


def test_zero_length_sequence_gives_zeros_and_nan_pool_is_not_read():
    k, v = make_pool(8, 16, 1, 16, torch.float32)
    k[4:], v[4:] = float("nan"), float("nan")  # blocks no table points at
    tables = torch.tensor([[0, 1], [2, 0]], dtype=torch.int32)
    out = cpu_attention.paged_decode(torch.randn(2, 2, 16), k, v, tables, torch.tensor([20, 0]), 0.25)
    assert torch.isfinite(out).all() and (out[1] == 0).all()


@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16])
def test_cpu_backend_mixed_step_matches_torch_backend(pool_dtype):
    """Decodes, prefill chunks over cached context, and whole prompts, in one step (the cpu
    backend's paged_decode + paged_prefill against per-sequence SDPA over gathered K/V). A
    bf16 pool under fp32 activations (kv_cache_dtype) too."""
    lens_q = [1, 5, 1, 37, 1, 20, 1]
    seq_lens = [50, 18, 7, 60, 129, 20, 1]
    k_pool, v_pool = make_pool(128, 16, 3, 64, pool_dtype)
    tables = random_tables(seq_lens, 16, 128)
    qsl = [0]
    for n in lens_q:
        qsl.append(qsl[-1] + n)
    T = qsl[-1]
    q, k, v = torch.randn(T, 9, 64), torch.randn(T, 3, 64), torch.randn(T, 3, 64)
    slots = []
    for i, (n, L) in enumerate(zip(lens_q, seq_lens)):
        for pos in range(L - n, L):
            slots.append(int(tables[i, pos // 16]) * 16 + pos % 16)
    meta = AttentionMetadata(torch.tensor(slots), torch.tensor(qsl, dtype=torch.int32),
                             torch.tensor(seq_lens, dtype=torch.int32), tables, qsl, seq_lens,
                             max(lens_q), max(seq_lens))
    outs = []
    for backend in (CpuAttentionBackend(64), TorchAttentionBackend(64)):
        cache = torch.stack([k_pool.clone(), v_pool.clone()])
        outs.append(backend.forward(q, k, v, cache, meta))
    tol = TOL[pool_dtype]
    torch.testing.assert_close(outs[0], outs[1], atol=tol, rtol=tol)


@pytest.mark.skipif(not cpu_ops.has_op("paged_prefill"), reason="needs AVX-512")
@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(4, 4, 16), (9, 3, 64), (4, 1, 128),
                                                       (6, 2, 32)])
@pytest.mark.parametrize("window", [0, 5, 70])
def test_paged_prefill_matches_reference(pool_dtype, heads, kv_heads, head_dim, window):
    """Whole prompts and chunks after cached context, lengths across the kernel's 16-key
    blocks and 64-key passes and its 16-row work items, a sliding window shorter than a
    chunk; decode rows in the same step are left untouched."""
    lens_q = [2, 1, 63, 17, 130, 1, 65]
    seq_lens = [2, 40, 63, 81, 130, 5, 200]
    block = 16
    k_pool, v_pool = make_pool(64, block, kv_heads, head_dim, pool_dtype)
    tables = random_tables(seq_lens, block, 64)
    qsl = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(qsl[-1]), heads, head_dim)
    out = torch.full_like(q, 7.0)
    torch.ops.kvserve.paged_prefill(q, k_pool, v_pool, tables, torch.tensor(seq_lens, dtype=torch.int32),
                                    qsl, head_dim ** -0.5, window, out)
    for i, (n, L) in enumerate(zip(lens_q, seq_lens)):
        rows = out[qsl[i]:qsl[i + 1]]
        if n == 1:
            assert (rows == 7.0).all()
            continue
        ref = reference.attend_sequence(q[qsl[i]:qsl[i + 1]], k_pool, v_pool, tables[i], L,
                                        head_dim ** -0.5, window or None)
        torch.testing.assert_close(rows, ref, atol=2e-5, rtol=2e-5)


def test_launcher_checks():
    k, v = make_pool(4, 16, 1, 16, torch.float32)
    with pytest.raises(ValueError, match="dtype"):
        cpu_attention.paged_decode(torch.randn(1, 1, 16).double(), k, v,
                                   torch.zeros(1, 1, dtype=torch.int32), torch.tensor([1]), 1.0)
    with pytest.raises(ValueError, match="one row per query"):
        cpu_attention.paged_decode(torch.randn(2, 1, 16), k, v,
                                   torch.zeros(1, 1, dtype=torch.int32), torch.tensor([1]), 1.0)


@pytest.mark.parametrize("dtype, pool_dtype", [(torch.float32, torch.float32),
                                               (torch.bfloat16, torch.bfloat16),
                                               (torch.float32, torch.bfloat16)])
def test_store_kv_matches_reference_and_skips_padding(dtype, pool_dtype):
    """fp32 rows into a bf16 pool are rounded to it (kv_cache_dtype)."""
    k_pool, v_pool = make_pool(6, 16, 3, 32, pool_dtype)
    k, v = torch.randn(5, 3, 32).to(dtype), torch.randn(5, 3, 32).to(dtype)
    slots = torch.tensor([17, -1, 0, 95, -1])
    ours = (k_pool.clone(), v_pool.clone())
    ref = (k_pool.clone(), v_pool.clone())
    cpu_attention.store_kv(k, v, *ours, slots)
    reference.store_kv(k, v, *ref, slots)
    assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])
    assert torch.equal(ours[0].view(-1, 3, 32)[95], k[3].to(pool_dtype))
    untouched = torch.ones(96, dtype=torch.bool)
    untouched[[17, 0, 95]] = False
    assert torch.equal(ours[0].view(-1, 3, 32)[untouched], k_pool.view(-1, 3, 32)[untouched])


def test_store_kv_rejects_slots_outside_the_pool():
    k_pool, v_pool = make_pool(2, 16, 1, 16, torch.float32)
    with pytest.raises(IndexError, match="outside the KV pool"):
        cpu_attention.store_kv(torch.randn(1, 1, 16), torch.randn(1, 1, 16), k_pool, v_pool,
                               torch.tensor([32]))
    with pytest.raises(ValueError, match="one slot per token"):
        cpu_attention.store_kv(torch.randn(2, 1, 16), torch.randn(2, 1, 16), k_pool, v_pool,
                               torch.tensor([3]))
