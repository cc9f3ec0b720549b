"""The fused elementwise Triton kernels (kernels/fused.py) against the aten forms they replace
in engine/model_executor/models/llama.py (RMSNorm, apply_rotary, SiLU * up).

On CUDA they run natively; on CPU in the Triton interpreter, enabled here before kernels.fused
is imported (as in test_kernels.py).

Tolerances, (atol, rtol) against the aten form on the same inputs: fp32 1e-5 (summation order
only); fp16 1e-3 (the kernels round at the same steps as aten); bf16 2e-2: also rounded at the
same steps, but the interpreter converts fp32 -> bf16 by truncation, not round-to-nearest, so
each rounding can be off by one more bf16 ulp (2^-7 relative) there.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from triton_env import DEVICE, ON_CUDA, needs_kernels  # first: the interpreter on CPU

from engine.model_executor.models.llama import RMSNorm, apply_rotary  # noqa: E402
from kernels import fused  # noqa: E402

pytestmark = needs_kernels()

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
TOL = {F32: (1e-5, 1e-5), F16: (1e-3, 1e-3), BF16: (2e-2, 2e-2)}
DTYPES = [F32, BF16, F16]


def close(got, want, dtype):
    atol, rtol = TOL[dtype]
    assert got.dtype == want.dtype
    assert not got.isnan().any()
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol)


def norm_module(width, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = RMSNorm(width, 1e-6, dtype)
    m.weight.data = (torch.randn(width, generator=g) * 0.5 + 1).to(dtype)
    return m.to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,width", [(1, 576), (7, 96), (33, 100), (40, 2048), (0, 64)])
def test_add_rms_norm(tokens, width, dtype):
    m = norm_module(width, dtype)
    x = torch.randn(tokens, width, device=DEVICE).to(dtype)
    residual = (torch.randn(tokens, width, device=DEVICE) * 3).to(dtype)
    want, want_residual = m(x.clone(), residual.clone())
    got = fused.add_rms_norm(x, residual, m.weight, m.eps)
    close(got, want, dtype)
    close(residual, want_residual, dtype)  # the residual stream is updated in place
    assert tokens == 0 or got.data_ptr() != residual.data_ptr()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128, 80])
def test_rms_norm_on_strided_head_views(head_dim, dtype):
    """Qwen3's q/k norms: [T, H, D] views into the qkv output, rows not contiguous."""
    tokens, heads, kv_heads = 9, 6, 2
    m = norm_module(head_dim, dtype, seed=1)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, device=DEVICE).to(dtype)
    q = qkv[:, :heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    before = qkv.clone()
    for x in (q, k):
        close(fused.rms_norm(x, m.weight, m.eps), m(x), dtype)
    assert torch.equal(qkv, before)  # not in place


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kv_heads,ratio", [(1, 1), (2, 3), (3, 3), (1, 8), (4, 2)])
@pytest.mark.parametrize("head_dim", [64, 128, 80])
def test_rotary_q_and_k_in_place(kv_heads, ratio, head_dim, dtype):
    """q and k as the model has them (views into one qkv row), cos/sin as the step's table rows
    ([T, 1, D]), in place, one launch."""
    tokens, heads = 19, kv_heads * ratio
    g = torch.Generator().manual_seed(head_dim + ratio)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g).to(dtype).to(DEVICE)
    q = qkv[:, :heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    v_before = qkv[:, (heads + kv_heads) * head_dim:].clone()
    angles = torch.rand(tokens, 1, head_dim // 2, generator=g) * 100
    cos = torch.cat([angles.cos()] * 2, -1).to(dtype).to(DEVICE)
    sin = torch.cat([angles.sin()] * 2, -1).to(dtype).to(DEVICE)
    want_q, want_k = apply_rotary(q.clone(), k.clone(), (cos, sin))
    fused.rotary_(q, k, cos, sin)
    close(q, want_q, dtype)
    close(k, want_k, dtype)
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim:], v_before)  # v untouched


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kv_heads,ratio,head_dim", [(1, 1, 64), (2, 8, 128), (3, 3, 80)])
def test_norm_rotary_is_qwen3s_qk_norms_then_rotary(kv_heads, ratio, head_dim, dtype):
    tokens, heads = 11, kv_heads * ratio
    g = torch.Generator().manual_seed(head_dim)
    qkv = (torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g) * 3).to(dtype)
    qkv = qkv.to(DEVICE)
    q = qkv[:, :heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    q_norm, k_norm = norm_module(head_dim, dtype, seed=2), norm_module(head_dim, dtype, seed=3)
    angles = torch.rand(tokens, 1, head_dim // 2, generator=g) * 100
    cos = torch.cat([angles.cos()] * 2, -1).to(dtype).to(DEVICE)
    sin = torch.cat([angles.sin()] * 2, -1).to(dtype).to(DEVICE)
    want_q, want_k = apply_rotary(q_norm(q), k_norm(k), (cos, sin))
    # the same math in fp32 on the same (rounded) inputs: the truth both are measured against
    true_q, true_k = apply_rotary(copy.deepcopy(q_norm).float()(q.float()),
                                  copy.deepcopy(k_norm).float()(k.float()),
                                  (cos.float(), sin.float()))
    assert q_norm.weight.dtype == dtype
    fused.norm_rotary_(q, k, cos, sin, q_norm.weight, k_norm.weight, q_norm.eps)
    for got, want, true in ((q, want_q, true_q), (k, want_k, true_k)):
        if dtype == BF16 and not ON_CUDA:
            # four roundings in a row (norm, scale, two products) where a sum can cancel, each
            # one truncated by the interpreter: some elements land several ulps from aten's
            # round-to-nearest, and truncation's bias makes the mean error ~4x aten's. Demand
            # aten's own error give or take one ulp per rounding, and a mean within 5x.
            err, aten_err = (got.float() - true).abs(), (want.float() - true).abs()
            assert (err <= aten_err + 4 * 2 ** -7 * true.abs().clamp(min=1)).all()
            assert err.mean() <= 5 * aten_err.mean(), (err.mean(), aten_err.mean())
        else:
            close(got, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,inter", [(1, 1536), (5, 40), (33, 100), (0, 16)])
def test_silu_mul(tokens, inter, dtype):
    x = (torch.randn(tokens, 2 * inter, device=DEVICE) * 4).to(dtype)
    if tokens:
        x[0, 0] = -80.0  # SiLU's tail: exp overflows to inf, the result must still be -0
    want = F.silu(x[:, :inter]) * x[:, inter:]
    close(fused.silu_mul(x), want, dtype)


@pytest.mark.parametrize("call,match", [
    (lambda: fused.rms_norm(torch.randn(3, 8, device=DEVICE), torch.ones(7, device=DEVICE), 1e-6),
     "weight must be"),
    (lambda: fused.add_rms_norm(torch.randn(3, 8, device=DEVICE), torch.randn(3, 8, device=DEVICE,
                                                                              dtype=F16),
                                torch.ones(8, device=DEVICE), 1e-6), "residual must be"),
    (lambda: fused.rms_norm(torch.randn(3, 8, device=DEVICE).t(), torch.ones(3, device=DEVICE),
                            1e-6), "contiguous"),
    (lambda: fused.rotary_(torch.randn(2, 4, 7, device=DEVICE), torch.randn(2, 1, 7, device=DEVICE),
                           torch.ones(2, 1, 7, device=DEVICE), torch.ones(2, 1, 7, device=DEVICE)),
     "even"),
    (lambda: fused.rotary_(torch.randn(2, 4, 8, device=DEVICE), torch.randn(2, 1, 8, device=DEVICE),
                           torch.ones(3, 1, 8, device=DEVICE), torch.ones(3, 1, 8, device=DEVICE)),
     "cos and sin"),
    (lambda: fused.silu_mul(torch.randn(3, 7, device=DEVICE)), "gate_up must be"),
    (lambda: fused.silu_mul(torch.randn(3, 8, device=DEVICE).long()), "float32, bfloat16"),
])
def test_rejects_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()
