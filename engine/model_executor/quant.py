"""CPU quantization: weight-only int4 for the memory-bound small-batch steps
(``quantization="int4"``), and int8 x int8 matmuls for every step (``quantization="int8"``).

Weight-only int4 (group 32, asymmetric).

Small batches read every weight once per step, so their time is weight bytes / bandwidth:
int4 reads 8x fewer bytes than fp32. Large batches are compute-bound and keep the dense
(prepacked) fp32 weights, so each layer holds both and picks by the number of rows.

Quantization is round-to-nearest over groups of 32 input features: w ~ q * scale + min,
q in 0..15. For the bundled GGUF (llama.cpp Q4_1: the same group-32 q * d + m scheme) this
recovers the file's own 4-bit codes, so it loses nothing beyond the file's quantization.
The int4 matmul runs with bf16 activations (torch's CPU int4 kernel), so outputs differ
from fp32 slightly; it is opt-in (``quantization="int4"``), never the default.
"""
from __future__ import annotations

import torch
from torch import nn

from .cpu_linear import PackedLinear

GROUP = 32


def quantize_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes [N, K] int32 in 0..15, scales_and_zeros [K/32, N, 2]) for torch's int4 matmul,
    which computes w = (q - 8) * scale + zero."""
    n, k = weight.shape
    w = weight.float().view(n, k // GROUP, GROUP)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    scale = ((hi - lo) / 15).clamp_min(1e-12)
    codes = ((w - lo[..., None]) / scale[..., None]).round().clamp_(0, 15).to(torch.int32)
    zero = lo + 8 * scale
    return codes.view(n, k), torch.stack([scale.t(), zero.t()], dim=-1).contiguous()


class Int4Linear(nn.Module):
    """int4 up to max_rows rows; above, ``dense`` (default: the prepacked fp32 weights)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, max_rows: int,
                 batch_hint: int, dense: nn.Module | None = None) -> None:
        super().__init__()
        codes, scales = quantize_int4(weight)
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        self.scales = scales.to(torch.bfloat16)
        self.bias = bias
        self.max_rows = max_rows
        self.dense = dense if dense is not None else PackedLinear(weight, bias, batch_hint)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.max_rows:
            return self.dense(x)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.packed, GROUP,
                                                       self.scales).to(x.dtype)
        return y if self.bias is None else y + self.bias


def quantize_int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row of a float [N, K] matrix: (codes [N, K] int8, scales [N])."""
    scale = (w.abs().amax(dim=1) / 127).clamp_min(1e-12)
    codes = (w / scale[:, None]).round().clamp_(-127, 127).to(torch.int8)
    return codes.contiguous(), scale.contiguous()


# torch's int8 weight-only kernel dequantizes per row of activations, so it loses to the
# prepacked fp32 lm_head (49152 x 576) beyond a few rows: 1.05 vs 2.06 ms at 1 row, 1.87 vs
# 2.36 ms at 4, 3.72 vs 3.27 ms at 8 (2-core VM, in isolation). With quantization="int4+int8"
# the W8A8 lm_head is used instead: 1.7 vs 3.1 ms at 1 row, 2.3 vs 8.1 ms at 8.
LM_HEAD_INT8_MAX_ROWS = 4


class Int8Linear(nn.Module):
    """Per-output-channel symmetric int8 for lm_head: the tied embedding of a GGUF file is
    often 8-bit (Q8_0), which int4 would damage (top-1 agreement fell from 99% to 95%)."""

    def __init__(self, weight: torch.Tensor, max_rows: int, batch_hint: int,
                 dense: nn.Module | None = None) -> None:
        super().__init__()
        self.codes, scale = quantize_int8_rows(weight.float())
        self.scales = scale.to(torch.bfloat16)
        self.max_rows = max_rows
        self.dense = dense if dense is not None else PackedLinear(weight, None, batch_hint)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.max_rows:
            return self.dense(x)
        return torch._weight_int8pack_mm(x.to(torch.bfloat16), self.codes, self.scales).to(x.dtype)


def supports_int4(weight: torch.Tensor) -> bool:
    return (weight.dim() == 2 and weight.shape[1] % GROUP == 0
            and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"))


# ---- quantization="int8": W8A8 -------------------------------------------------------------
# The int8 GEMM (VNNI) runs ~4-5x the fp32 rate on the 2-core dev VM (1.0-1.4 vs 0.21-0.27
# TOP/s at 64-512 rows), so both the compute-bound prefill and the large decode batches gain.
# Activations are quantized per row on the fly (symmetric, scale = row max / 127), weights per
# output channel. Accuracy on SmolLM2, teacher-forced top-1 agreement / mean KL against fp32
# (tests/test_quant.py's varied text; bf16 scores ~98% / 0.0009 there, int4 98.5% / 0.0003):
#   qkv, o, gate_up, down; plain                   91.9% / 0.034
#   + SmoothQuant scales (alpha 0.5)                95.8% / 0.010
#   + 16 outlier channels in fp32                   95.8% / 0.004
#   down_proj left in fp32, 16 outliers             98.8% / 0.0013
#   ... 32 outliers, lm_head int8 too               99.1% / 0.0010
#   ... and down_proj int8, 8 per-row outliers      98.4% / 0.0018   <- this
# Outliers are input channels kept out of the int8 product (their scale would crush the rest)
# and added in fp32. Post-norm inputs (qkv, gate_up, lm_head) and o_proj's have fixed ones,
# found once by calibration (engine/model_executor/calibration.py). down_proj's input, SiLU(gate) * up, has
# spikes that move from token to token: a fixed set misses them (0.0036 KL for down_proj alone,
# 0.0015 with a 64-wide Hadamard rotation of its input), so each row's 8 largest entries are
# taken out instead (0.0008).
INT8_OUTLIERS = 32
INT8_DYNAMIC_OUTLIERS = {"down_proj": 8}


def quantize_w8a8(weight: torch.Tensor, input_absmax: torch.Tensor, num_outliers: int | None = None):
    """(w_q [N, K] int8, w_scale [N], outliers [n] int64, w_outliers [n, N]) for
    torch.ops.kvserve.w8a8_linear: the n input channels with the largest activations keep
    fp32 weights; their int8 columns are zero."""
    w = weight.detach().float().clone()
    n = min(INT8_OUTLIERS if num_outliers is None else num_outliers, w.shape[1])
    outliers = input_absmax.float().topk(n).indices.sort().values if n else \
        torch.zeros(0, dtype=torch.long)
    w_outliers = w[:, outliers].t().contiguous()
    w[:, outliers] = 0
    w_q, scale = quantize_int8_rows(w)
    return w_q, scale, outliers.to(torch.long).contiguous(), w_outliers


PANEL = 48  # output columns per panel of kernels/csrc/int8_gemm.h


def pack_w8a8(w_q: torch.Tensor, w_outliers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The C++ op's layouts (kernels/csrc/int8_gemm.h), in panels of 48 output columns:
    w_q [N, K] int8 -> [N/48, K/4, 48, 4] uint8 (w + 128), w_outliers [n, N] fp32 ->
    [N/48, n, 48]. Zero weights pad N and K."""
    n, k = w_q.shape
    n_pad, k_pad = -(-n // PANEL) * PANEL, -(-k // 4) * 4
    w = torch.zeros(n_pad, k_pad, dtype=torch.int16)
    w[:n, :k] = w_q
    w = (w + 128).to(torch.uint8).view(n_pad // PANEL, PANEL, k_pad // 4, 4)
    wo = torch.zeros(len(w_outliers), n_pad)
    wo[:, :n] = w_outliers
    wo = wo.view(len(w_outliers), n_pad // PANEL, PANEL)
    return w.permute(0, 2, 1, 3).contiguous(), wo.permute(1, 0, 2).contiguous()


def w8a8_linear_torch(x, w_q, w_scale, outliers, w_outliers, bias, w_t=None, dynamic=0):
    """The reference of torch.ops.kvserve.w8a8_linear in torch ops (also its fallback when
    the C++ ops cannot be built)."""
    x2 = x.reshape(-1, x.shape[-1]).float()
    rest = x2.clone()
    rest[:, outliers] = 0
    extra = 0
    if dynamic:
        idx = rest.abs().topk(dynamic, dim=1).indices
        extra = torch.einsum("mk,mkn->mn", rest.gather(1, idx), w_t[idx].float())
        rest.scatter_(1, idx, 0.0)
    sx = (rest.abs().amax(dim=1, keepdim=True) / 127)
    sx = torch.where(sx > 0, sx, torch.ones_like(sx))
    xq = (rest / sx).round().clamp_(-127, 127).to(torch.int8)
    y = torch._int_mm(xq, w_q.t()).float() * sx * w_scale if len(x2) else x2.new_empty(0, len(w_scale))
    y = y + x2[:, outliers] @ w_outliers + extra
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], w_q.shape[0])


class W8A8Linear(nn.Module):
    """Fixed outlier channels from ``input_absmax`` (calibration), or with ``dynamic`` > 0 each
    row's ``dynamic`` largest entries (then no fixed ones)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None,
                 input_absmax: torch.Tensor, native: bool, dynamic: int = 0) -> None:
        super().__init__()
        self.w_q, self.w_scale, self.outliers, self.w_outliers = quantize_w8a8(
            weight, input_absmax, 0 if dynamic else None)
        self.bias = None if bias is None else bias.detach().float().contiguous()
        self.dynamic = dynamic
        # bf16 W^T rows for the dynamic outliers (see kernels/csrc/int8_linear.cpp)
        self.w_t = weight.detach().t().to(torch.bfloat16).contiguous() if dynamic else None
        self.native = native  # the C++ op was built (kernels/cpu_ops.py has_w8a8)
        if native:  # the op reads only the packed forms
            self.w_q, self.w_outliers = pack_w8a8(self.w_q, self.w_outliers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fn = torch.ops.kvserve.w8a8_linear if self.native else w8a8_linear_torch
        return fn(x, self.w_q, self.w_scale, self.outliers, self.w_outliers, self.bias,
                  self.w_t, self.dynamic)
