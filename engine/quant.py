"""Weight-only int4 (group 32, asymmetric) for the memory-bound small-batch steps on CPU.

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
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, max_rows: int,
                 batch_hint: int) -> None:
        super().__init__()
        codes, scales = quantize_int4(weight)
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        self.scales = scales.to(torch.bfloat16)
        self.bias = bias
        self.max_rows = max_rows
        self.dense = PackedLinear(weight, bias, batch_hint)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.max_rows:
            return self.dense(x)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.packed, GROUP,
                                                       self.scales).to(x.dtype)
        return y if self.bias is None else y + self.bias


# torch's int8 weight-only kernel dequantizes per row of activations, so it loses to the
# prepacked fp32 lm_head (49152 x 576) beyond a few rows: 1.05 vs 2.06 ms at 1 row, 1.87 vs
# 2.36 ms at 4, 3.72 vs 3.27 ms at 8 (2-core VM, in isolation).
LM_HEAD_INT8_MAX_ROWS = 4


class Int8Linear(nn.Module):
    """Per-output-channel symmetric int8 for lm_head: the tied embedding of a GGUF file is
    often 8-bit (Q8_0), which int4 would damage (top-1 agreement fell from 99% to 95%)."""

    def __init__(self, weight: torch.Tensor, max_rows: int, batch_hint: int) -> None:
        super().__init__()
        w = weight.float()
        scale = (w.abs().amax(dim=1) / 127).clamp_min(1e-12)
        self.codes = (w / scale[:, None]).round().clamp_(-127, 127).to(torch.int8)
        self.scales = scale.to(torch.bfloat16)
        self.max_rows = max_rows
        self.dense = PackedLinear(weight, None, batch_hint)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.max_rows:
            return self.dense(x)
        return torch._weight_int8pack_mm(x.to(torch.bfloat16), self.codes, self.scales).to(x.dtype)


def supports_int4(weight: torch.Tensor) -> bool:
    return (weight.dim() == 2 and weight.shape[1] % GROUP == 0
            and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"))
