"""Triton shrink / expand kernels for multi-LoRA deltas (CUDA): the layout and the torch
reference are in kernels/lora.py. Kept apart from it so that the CPU path never imports
triton (kernels are defined at import time: tests enable the interpreter first)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# ---------------------------------------------------------------------------------------------
# Triton path (CUDA; CPU only under TRITON_INTERPRET=1). Two launches per projection:
#
#   shrink: grid (T, cdiv(W, BLOCK_W))    shrunk[t, w] = x[t] . a[:, slot(t)*W + w]    (fp32)
#   expand: grid (T, cdiv(out, BLOCK_N))  delta[t, n]  = shrunk[t] . b[slot(t)*W:, n]
#
# One program per token (and tile), so a batch mixing any number of adapters in any order
# costs the same as one adapter, with no sort or gather on the host and no host sync (a step
# stays capturable in a CUDA graph). Each token is a GEMV (M = 1 is below tl.dot's minimum),
# done as a broadcast multiply and a reduction in fp32. The rank-sized intermediate stays fp32
# between the launches, so low-precision inputs are rounded once, at the end.
# ---------------------------------------------------------------------------------------------
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Tile sizes: powers of two (in, out and width need not be: the tails are masked). Not yet
# tuned on a GPU; small tiles keep registers low and let small test shapes (in 48, out 80)
# run every loop more than once, tail included.
SHRINK_BLOCK_K = 32   # rows of a (the `in` reduction) per step of the shrink loop
MAX_BLOCK_W = 32      # columns of a slot per shrink program; rows of b per expand step
EXPAND_BLOCK_N = 64   # output columns per expand program


@triton.jit
def _lora_shrink_kernel(
    shrunk_ptr,          # [T, W] fp32, contiguous
    x_ptr,               # [T, IN]     stride_xt, stride_xk
    a_ptr,               # [IN, S * W] stride_ak, stride_aw
    token_slot_ptr,      # [T] int32, contiguous
    IN, W,
    stride_xt, stride_xk,
    stride_ak, stride_aw,
    BLOCK_K: tl.constexpr, BLOCK_W: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    col_ok = cols < W
    out_ptrs = shrunk_ptr + t * W + cols
    slot = tl.load(token_slot_ptr + t)
    if slot < 0:
        # no adapter: the buffer is torch.empty, so leave it defined for the expand step
        tl.store(out_ptrs, tl.zeros([BLOCK_W], dtype=tl.float32), mask=col_ok)
        return
    a_cols = (slot.to(tl.int64) * W + cols) * stride_aw  # this slot's columns of a
    x_row = x_ptr + t * stride_xt
    acc = tl.zeros([BLOCK_W], dtype=tl.float32)
    for k0 in range(0, IN, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < IN
        xk = tl.load(x_row + ks * stride_xk, mask=k_ok, other=0.0).to(tl.float32)
        a_ptrs = a_ptr + ks.to(tl.int64)[:, None] * stride_ak + a_cols[None, :]
        a_tile = tl.load(a_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc += tl.sum(xk[:, None] * a_tile.to(tl.float32), axis=0)
    tl.store(out_ptrs, acc, mask=col_ok)


@triton.jit
def _lora_expand_kernel(
    out_ptr,             # [T, OUT] x's dtype, stride_ot, 1
    shrunk_ptr,          # [T, W] fp32, contiguous
    b_ptr,               # [S * W, OUT] stride_bw, stride_bn
    token_slot_ptr,      # [T] int32, contiguous
    W, OUT,
    stride_ot,
    stride_bw, stride_bn,
    BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < OUT
    out_ptrs = out_ptr + t * stride_ot + cols
    slot = tl.load(token_slot_ptr + t)
    if slot < 0:
        # exact zeros (not 0 * garbage): the caller adds the delta to the base output
        tl.store(out_ptrs, tl.zeros([BLOCK_N], dtype=tl.float32).to(out_ptr.dtype.element_ty),
                 mask=col_ok)
        return
    b_row0 = slot.to(tl.int64) * W  # this slot's first row of b
    b_cols = cols.to(tl.int64) * stride_bn
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for w0 in range(0, W, BLOCK_W):
        ws = w0 + tl.arange(0, BLOCK_W)
        w_ok = ws < W
        s = tl.load(shrunk_ptr + t * W + ws, mask=w_ok, other=0.0)
        b_ptrs = b_ptr + (b_row0 + ws)[:, None] * stride_bw + b_cols[None, :]
        b_tile = tl.load(b_ptrs, mask=w_ok[:, None] & col_ok[None, :], other=0.0)
        acc += tl.sum(s[:, None] * b_tile.to(tl.float32), axis=0)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


def is_interpreted() -> bool:
    """True when these kernels were defined under TRITON_INTERPRET=1 (they then run on CPU)."""
    return type(_lora_shrink_kernel).__name__ == "InterpretedFunction"


def _check_lora_inputs(x, a, b, token_slot, width) -> None:
    """ValueError on anything the kernels would misread; nothing here syncs with the device.
    Slot values are not checked (that would read token_slot back): each must be -1 or below
    S = a.shape[1] // width."""
    for name, t, ndim in (("x", x, 2), ("a", a, 2), ("b", b, 2), ("token_slot", token_slot, 1)):
        if t.dim() != ndim:
            raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}.")
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be a positive int, got {width!r}.")
    if a.shape[0] != x.shape[1]:
        raise ValueError(f"a has {a.shape[0]} rows for x's {x.shape[1]} input features.")
    if a.shape[1] == 0 or a.shape[1] % width:
        raise ValueError(f"a has {a.shape[1]} columns, not a positive multiple of width {width}.")
    if b.shape[0] != a.shape[1]:
        raise ValueError(f"b has {b.shape[0]} rows for a's {a.shape[1]} columns.")
    if token_slot.shape[0] != x.shape[0]:
        raise ValueError(f"token_slot has {token_slot.shape[0]} entries for {x.shape[0]} tokens.")
    if token_slot.dtype != torch.int32:
        raise ValueError(f"token_slot must be int32, got {token_slot.dtype}.")
    if not token_slot.is_contiguous():
        raise ValueError("token_slot must be contiguous (the kernels index it by token).")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"x dtype must be float32, bfloat16 or float16, got {x.dtype}.")
    if a.dtype != x.dtype or b.dtype != x.dtype:
        raise ValueError(f"dtypes differ: x {x.dtype}, a {a.dtype}, b {b.dtype}.")
    for name, t in (("a", a), ("b", b), ("token_slot", token_slot)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, expected {x.device} (x's device).")
    if x.device.type != "cuda" and not is_interpreted():
        raise ValueError(
            f"the Triton LoRA kernels need CUDA tensors (got {x.device}); to run them on CPU "
            "in the Triton interpreter, set TRITON_INTERPRET=1 before kernels.lora is first "
            "imported (the kernels are defined at import time).")


def lora_delta_triton(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                      token_slot: torch.Tensor, width: int) -> torch.Tensor:
    """Delta [T, out] (x's dtype): row t is x[t] @ a[:, s*width:(s+1)*width]
    @ b[s*width:(s+1)*width] for s = token_slot[t] >= 0, exact zeros where it is -1.

    x [T, in], a [in, S*width], b [S*width, out] (any strides: a and b may be views into
    larger weights), token_slot [T] int32 on x's device. Same result as lora_delta_torch,
    without the host-side slot range and mask."""
    _check_lora_inputs(x, a, b, token_slot, width)
    num_tokens, out_dim = x.shape[0], b.shape[1]
    out = torch.empty(num_tokens, out_dim, dtype=x.dtype, device=x.device)
    if num_tokens == 0 or out_dim == 0:
        return out
    shrunk = torch.empty(num_tokens, width, dtype=torch.float32, device=x.device)
    for kernel, grid, args, meta in launch_plan(x, a, b, token_slot, width, shrunk, out):
        kernel[grid](*args, **meta)
    return out


def launch_plan(x, a, b, token_slot, width, shrunk, out) -> list:
    """[(kernel, grid, positional args, constexprs + launch options)] for the shrink then the
    expand, from host shapes only (validated inputs). Separate from the launch so a test can
    compile exactly this for a GPU."""
    num_tokens, out_dim = x.shape[0], b.shape[1]
    block_w = min(MAX_BLOCK_W, max(16, triton.next_power_of_2(width)))
    shrink = (_lora_shrink_kernel, (num_tokens, triton.cdiv(width, block_w)),
              (shrunk, x, a, token_slot, x.shape[1], width,
               x.stride(0), x.stride(1), a.stride(0), a.stride(1)),
              dict(BLOCK_K=SHRINK_BLOCK_K, BLOCK_W=block_w, num_warps=4))
    expand = (_lora_expand_kernel, (num_tokens, triton.cdiv(out_dim, EXPAND_BLOCK_N)),
              (out, shrunk, b, token_slot, width, out_dim,
               out.stride(0), b.stride(0), b.stride(1)),
              dict(BLOCK_W=block_w, BLOCK_N=EXPAND_BLOCK_N, num_warps=4))
    return [shrink, expand]
