"""Multi-LoRA deltas for a flattened batch: each token carries the slot of its adapter.

Weights of all ``S`` slots of one projection sit side by side (a slot's scale folded into
its B, lower ranks zero-padded to ``width`` = sub-projections x max rank):

    a: [in, S * width]     slot s owns columns s*width .. (s+1)*width
    b: [S * width, out]    slot s owns rows    s*width .. (s+1)*width

so a fused projection (q|k|v, gate|up) is one block-diagonal B per slot. Token t with slot
s >= 0 gets ``x[t] @ a[:, s] @ b[s]``; slot -1 (no adapter) gets nothing.

``lora_delta_torch`` is the CPU path and the reference: one shrink matmul over the slots
the step uses (a contiguous range lo..hi), a one-hot mask that keeps each token's own slot,
one expand matmul: two GEMMs per projection whatever the mix, instead of a gather, two
matmuls and a scatter per adapter. ``lora_delta_triton`` (CUDA) is the per-token shrink and
expand kernels in kernels/lora_triton.py, checked against it under
``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import torch


def lora_delta_torch(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                     onehot: torch.Tensor | None, lo: int, hi: int, width: int,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """Delta [T, out] for tokens whose slots lie in lo..hi-1 (added into ``out`` in place,
    one addmm, when it is given).

    ``onehot`` [T, hi - lo] (x's dtype) marks each token's slot; None when every token uses
    slot lo (then hi == lo + 1 and no mask is needed)."""
    shrunk = x @ a[:, lo * width:hi * width]
    if onehot is not None:
        T = x.shape[0]
        shrunk = (shrunk.view(T, hi - lo, width) * onehot.unsqueeze(-1)).view(T, -1)
    if out is not None:
        return out.addmm_(shrunk, b[lo * width:hi * width])
    return shrunk @ b[lo * width:hi * width]


def slot_mask(token_slot: list[int], dtype: torch.dtype, device) -> tuple:
    """(onehot or None, lo, hi) for a step's per-token slots (-1: no adapter); None for
    onehot and lo == hi when no token has one."""
    used = [s for s in token_slot if s >= 0]
    if not used:
        return None, 0, 0
    lo, hi = min(used), max(used) + 1
    if hi - lo == 1 and len(used) == len(token_slot):
        return None, lo, hi
    idx = torch.tensor(token_slot, dtype=torch.long)
    onehot = torch.zeros(len(token_slot), hi - lo, dtype=dtype)
    rows = (idx >= 0).nonzero().squeeze(1)
    onehot[rows, idx[rows] - lo] = 1
    return onehot.to(device), lo, hi
