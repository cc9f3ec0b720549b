"""Triton elementwise kernels for the CUDA decode path: one launch where the aten forms in
engine/model_executor/models/llama.py take several (RMSNorm alone is ~9 ops).

- ``rms_norm(x, w, eps)`` and ``add_rms_norm(x, residual, w, eps)`` (residual += x in place,
  then the norm of the sum): rows of the last dimension; x may be [T, N] or [T, H, N] with
  any row strides (Qwen3's q/k norms run on views into the qkv output);
- ``rotary_(q, k, cos, sin)``: q [T, H, D] and k [T, KVH, D] rotated in place, one launch for
  both; cos/sin [T, 1, D] or [T, D] (the step's table rows, looked up once per step);
  ``norm_rotary_`` does Qwen3's q/k RMSNorm in the same launch;
- ``silu_mul(gate_up)``: SiLU(gate) * up of a [T, 2I] row -> [T, I].

Same contracts as the C++ CPU ops (torch.ops.kvserve.*, kernels/csrc/fused_elementwise.cpp),
so the model picks either set through one attribute (``use_fused_ops``).

Rounding follows the aten forms step for step: every product that aten rounds to the
activation dtype is rounded here too (in bf16 the kernels are bitwise equal to the torch
path; in fp32 they differ only in summation order). Math is in fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .paged_attention import SUPPORTED_DTYPES, check_device, check_kernel_device


@triton.jit(do_not_specialize=["n_rows"])
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr,
    n_rows, inner,            # row r is x[r // inner, r % inner, :]
    stride_x0, stride_x1, stride_r, stride_o0, stride_o1,
    eps,
    N: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, ROUND_BEFORE_SCALE: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols < N)[None, :]
    r64 = rows.to(tl.int64)
    i0, i1 = r64 // inner, r64 % inner
    x = tl.load(x_ptr + (i0 * stride_x0 + i1 * stride_x1)[:, None] + cols[None, :],
                mask=mask, other=0.0)
    dtype = x.dtype
    if HAS_RESIDUAL:  # aten: residual + x, rounded to the activation dtype
        r_ptrs = residual_ptr + (r64 * stride_r)[:, None] + cols[None, :]
        res = tl.load(r_ptrs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + res.to(tl.float32)).to(dtype)
        tl.store(r_ptrs, x, mask=mask)
    h = x.to(tl.float32)
    var = tl.sum(h * h, axis=1) / N
    h = h * tl.rsqrt(var + eps)[:, None]
    w = tl.load(weight_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    if ROUND_BEFORE_SCALE:  # transformers' bf16/fp16 order: normalize, round, then scale
        h = h.to(dtype).to(tl.float32)
    out = (h * w[None, :]).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + (i0 * stride_o0 + i1 * stride_o1)[:, None] + cols[None, :], out, mask=mask)


@triton.jit
def _rotate_rows(
    x_ptr, w_ptr, cos_ptr, sin_ptr, num_tokens, num_heads, eps,
    stride_xt, stride_xh, stride_ct, stride_st,
    HALF: tl.constexpr, HALF_PADDED: tl.constexpr, HEADS_PADDED: tl.constexpr,
    BLOCK_T: tl.constexpr, NORM: tl.constexpr, ROUND_NORM: tl.constexpr,
):
    # rows = BLOCK_T tokens x HEADS_PADDED heads; columns = the first half of head_dim
    rows = tl.arange(0, BLOCK_T * HEADS_PADDED)
    tok = (tl.program_id(0) * BLOCK_T + rows // HEADS_PADDED).to(tl.int64)
    head = rows % HEADS_PADDED
    cols = tl.arange(0, HALF_PADDED)
    col_ok = cols < HALF
    mask = ((tok < num_tokens) & (head < num_heads))[:, None] & col_ok[None, :]
    base = x_ptr + (tok * stride_xt + head * stride_xh)[:, None] + cols[None, :]
    x1 = tl.load(base, mask=mask, other=0.0)
    x2 = tl.load(base + HALF, mask=mask, other=0.0)
    dtype = x1.dtype
    a1, a2 = x1.to(tl.float32), x2.to(tl.float32)
    if NORM:  # Qwen3's per-head RMSNorm of q / k, before the rotation (as RMSNorm does it)
        inv = tl.rsqrt((tl.sum(a1 * a1, axis=1) + tl.sum(a2 * a2, axis=1)) / (2 * HALF) + eps)
        a1, a2 = a1 * inv[:, None], a2 * inv[:, None]
        if ROUND_NORM:
            a1, a2 = a1.to(dtype).to(tl.float32), a2.to(dtype).to(tl.float32)
        w1 = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + HALF + cols, mask=col_ok, other=0.0).to(tl.float32)
        a1 = (a1 * w1[None, :]).to(dtype).to(tl.float32)
        a2 = (a2 * w2[None, :]).to(dtype).to(tl.float32)
    c_ptrs = cos_ptr + (tok * stride_ct)[:, None] + cols[None, :]
    s_ptrs = sin_ptr + (tok * stride_st)[:, None] + cols[None, :]
    c1 = tl.load(c_ptrs, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(c_ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(s_ptrs, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(s_ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
    # aten: x * cos + rotate_half(x) * sin, each product rounded, then the sum
    lo = (a1 * c1).to(dtype).to(tl.float32) + (-a2 * s1).to(dtype).to(tl.float32)
    hi = (a2 * c2).to(dtype).to(tl.float32) + (a1 * s2).to(dtype).to(tl.float32)
    tl.store(base, lo.to(dtype), mask=mask)
    tl.store(base + HALF, hi.to(dtype), mask=mask)


@triton.jit(do_not_specialize=["num_tokens"])
def _rotary_qk_kernel(
    q_ptr, k_ptr, q_weight_ptr, k_weight_ptr, cos_ptr, sin_ptr,
    num_tokens, num_q_heads, num_k_heads, eps,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_ct, stride_st,
    HALF: tl.constexpr, HALF_PADDED: tl.constexpr, HEADS_PADDED: tl.constexpr,
    BLOCK_T: tl.constexpr, NORM: tl.constexpr, ROUND_NORM: tl.constexpr,
):
    """q and k in one launch: axis 1 picks the tensor."""
    if tl.program_id(1) == 0:
        _rotate_rows(q_ptr, q_weight_ptr, cos_ptr, sin_ptr, num_tokens, num_q_heads, eps,
                     stride_qt, stride_qh, stride_ct, stride_st,
                     HALF, HALF_PADDED, HEADS_PADDED, BLOCK_T, NORM, ROUND_NORM)
    else:
        _rotate_rows(k_ptr, k_weight_ptr, cos_ptr, sin_ptr, num_tokens, num_k_heads, eps,
                     stride_kt, stride_kh, stride_ct, stride_st,
                     HALF, HALF_PADDED, HEADS_PADDED, BLOCK_T, NORM, ROUND_NORM)


@triton.jit(do_not_specialize=["num_tokens"])
def _silu_mul_kernel(
    x_ptr, out_ptr, num_tokens, stride_xt, stride_ot,
    INTER: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr,
):
    tok = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = (tok < num_tokens)[:, None] & (cols < INTER)[None, :]
    gate_ptrs = x_ptr + (tok * stride_xt)[:, None] + cols[None, :]
    gate = tl.load(gate_ptrs, mask=mask, other=0.0)
    up = tl.load(gate_ptrs + INTER, mask=mask, other=0.0).to(tl.float32)
    g = gate.to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)  # aten rounds F.silu's output
    tl.store(out_ptr + (tok * stride_ot)[:, None] + cols[None, :],
             (silu * up).to(out_ptr.dtype.element_ty), mask=mask)


# ---- launchers --------------------------------------------------------------------------------
def _check(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}.")
    if t.numel() and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension.")
    check_device(name, t, device)


def _rows_per_program(block_n: int) -> int:
    return max(1, min(16, 2048 // block_n))


def _norm(x, residual, weight, eps):
    _check("x", x, x.device)
    _check("weight", weight, x.device)
    check_kernel_device(x.device)
    if x.dim() not in (2, 3):
        raise ValueError(f"x must be [T, N] or [T, H, N], got {tuple(x.shape)}.")
    n = x.shape[-1]
    if weight.shape != (n,):
        raise ValueError(f"weight must be [{n}], got {tuple(weight.shape)}.")
    if residual is not None:
        if residual.shape != x.shape or x.dim() != 2 or residual.dtype != x.dtype:
            raise ValueError(f"residual must be [T, N] {x.dtype} like x, got "
                             f"{tuple(residual.shape)} {residual.dtype}.")
        _check("residual", residual, x.device)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    inner = x.shape[1] if x.dim() == 3 else 1
    n_rows = x.numel() // n if n else 0
    if n_rows == 0:
        return out
    block_n = triton.next_power_of_2(n)
    rows = _rows_per_program(block_n)
    xs = (x.stride(0), x.stride(1) if x.dim() == 3 else 0)
    os_ = (out.stride(0), out.stride(1) if x.dim() == 3 else 0)
    _rms_norm_kernel[(triton.cdiv(n_rows, rows),)](
        x, residual if residual is not None else x, weight, out, n_rows, inner,
        xs[0], xs[1], residual.stride(0) if residual is not None else 0, os_[0], os_[1],
        float(eps), N=n, BLOCK_N=block_n, ROWS=rows, HAS_RESIDUAL=residual is not None,
        ROUND_BEFORE_SCALE=x.dtype != torch.float32, num_warps=4)
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension of x [T, N] or [T, H, N] -> a new contiguous tensor."""
    return _norm(x, None, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> torch.Tensor:
    """residual += x (in place), then RMSNorm of the sum; x and residual [T, N]."""
    return _norm(x, residual, weight, eps)


def rotary_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate q [T, H, D] and k [T, KVH, D] in place by the rows of cos/sin ([T, 1, D] or
    [T, D]): x * cos + rotate_half(x) * sin."""
    _rotary(q, k, cos, sin, None, None, 0.0)


def norm_rotary_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float) -> None:
    """Qwen3's q/k RMSNorm over head_dim (weights [D]), then the rotation, in place, in one
    launch for q and k."""
    _rotary(q, k, cos, sin, q_weight, k_weight, eps)


def _rotary(q, k, cos, sin, q_weight, k_weight, eps):
    device = q.device
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        _check(name, t, device)
    check_kernel_device(device)
    if q.dim() != 3 or k.dim() != 3 or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(f"q must be [T, H, D] and k [T, KVH, D], got {tuple(q.shape)} and "
                         f"{tuple(k.shape)}.")
    num_tokens, num_heads, dim = q.shape
    if dim % 2:
        raise ValueError(f"head_dim must be even, got {dim}.")
    cos2, sin2 = cos.reshape(cos.shape[0], -1), sin.reshape(sin.shape[0], -1)
    if cos2.shape != (num_tokens, dim) or sin2.shape != cos2.shape:
        raise ValueError(f"cos and sin must be [{num_tokens}, 1, {dim}], got "
                         f"{tuple(cos.shape)} and {tuple(sin.shape)}.")
    if q.dtype != k.dtype:
        raise ValueError(f"q is {q.dtype} but k is {k.dtype}.")
    norm = q_weight is not None
    if norm:
        for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
            _check(name, w, device)
            if w.shape != (dim,):
                raise ValueError(f"{name} must be [{dim}], got {tuple(w.shape)}.")
    if num_tokens == 0:
        return
    half = dim // 2
    heads_padded = triton.next_power_of_2(max(num_heads, k.shape[1]))
    half_padded = triton.next_power_of_2(half)
    block_t = max(1, min(16, 4096 // (heads_padded * half_padded)))
    _rotary_qk_kernel[(triton.cdiv(num_tokens, block_t), 2)](
        q, k, q_weight if norm else q, k_weight if norm else k, cos2, sin2,
        num_tokens, num_heads, k.shape[1], float(eps),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos2.stride(0), sin2.stride(0),
        HALF=half, HALF_PADDED=half_padded, HEADS_PADDED=heads_padded, BLOCK_T=block_t,
        NORM=norm, ROUND_NORM=q.dtype != torch.float32, num_warps=4)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up for gate_up [T, 2I] (gate first) -> [T, I]."""
    _check("gate_up", gate_up, gate_up.device)
    check_kernel_device(gate_up.device)
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise ValueError(f"gate_up must be [T, 2 * I], got {tuple(gate_up.shape)}.")
    num_tokens, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = gate_up.new_empty(num_tokens, inter)
    if out.numel() == 0:
        return out
    block_i = min(1024, triton.next_power_of_2(inter))
    block_t = max(1, min(16, 2048 // block_i))
    grid = (triton.cdiv(num_tokens, block_t), triton.cdiv(inter, block_i))
    _silu_mul_kernel[grid](gate_up, out, num_tokens, gate_up.stride(0), out.stride(0),
                           INTER=inter, BLOCK_T=block_t, BLOCK_I=block_i, num_warps=4)
    return out
