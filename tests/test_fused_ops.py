"""The fused elementwise C++ ops of quantized CPU models (kernels/csrc/fused_elementwise.cpp)
against the aten forms they replace in engine/model_executor/models/llama.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.model_executor.models.llama import apply_rotary
from kernels import cpu_ops

pytestmark = pytest.mark.skipif(not cpu_ops.available(), reason="no C++ toolchain")


@pytest.mark.parametrize("tokens, inter", [(0, 16), (1, 5), (7, 1536), (33, 40)])
def test_silu_mul(tokens, inter):
    x = torch.randn(tokens, 2 * inter) * 6  # wide enough for exp's range (and SiLU's tails)
    x[:, 0] = -200.0
    ref = F.silu(x[:, :inter]) * x[:, inter:]
    torch.testing.assert_close(torch.ops.kvserve.silu_mul(x), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tokens, width", [(0, 8), (1, 5), (9, 576), (4, 33)])
def test_add_rms_norm_updates_the_residual(tokens, width):
    x, residual, w = torch.randn(tokens, width), torch.randn(tokens, width) * 3, torch.randn(width)
    expect_residual = residual + x
    ref = F.rms_norm(expect_residual, (width,), w, 1e-6)
    out = torch.ops.kvserve.add_rms_norm(x, residual, w, 1e-6)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(residual, expect_residual, atol=0, rtol=0)


@pytest.mark.parametrize("heads, kv_heads, head_dim", [(9, 3, 64), (4, 1, 128), (2, 2, 34)])
def test_rotary_in_place_on_qkv_views(heads, kv_heads, head_dim):
    """q and k are views into the qkv projection's output (row stride = its width); v, the
    third slice, must come out untouched."""
    tokens = 11
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim)
    before = qkv.clone()
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k = q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim)
    angle = torch.rand(tokens, head_dim // 2) * 50
    angle = torch.cat((angle, angle), dim=-1)
    cos, sin = angle.cos()[:, None], angle.sin()[:, None]
    ref_q, ref_k = apply_rotary(q.clone(), k.clone(), (cos, sin))
    torch.ops.kvserve.rotary_(q, k, cos, sin)
    torch.testing.assert_close(q, ref_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k, ref_k, atol=1e-5, rtol=1e-5)
    assert torch.equal(v, before[:, (heads + kv_heads) * head_dim:])


def test_checks_name_the_problem():
    with pytest.raises(ValueError, match="float32"):
        torch.ops.kvserve.silu_mul(torch.randn(2, 8).double())
    with pytest.raises(ValueError, match="residual"):
        torch.ops.kvserve.add_rms_norm(torch.randn(2, 8), torch.randn(3, 8), torch.randn(8), 1e-6)
    with pytest.raises(ValueError, match="D even"):
        torch.ops.kvserve.rotary_(torch.randn(2, 1, 7), torch.randn(2, 1, 7), torch.randn(2, 7),
                                  torch.randn(2, 7))
