"""Multi-LoRA deltas for a flattened batch: each token carries the slot of its adapter.

Weights of all ``S`` slots of one projection sit side by side (a slot's scale folded into
its B, lower ranks zero-padded to ``width`` = sub-projections x max rank):

    a: [in, S * width]     slot s owns columns s*width .. (s+1)*width
    b: [S * width, out]    slot s owns rows    s*width .. (s+1)*width

so a fused projection (q|k|v, gate|up) is one block-diagonal B per slot. Token t with slot
s >= 0 gets ``x[t] @ a[:, s] @ b[s]``; slot -1 (no adapter) gets nothing.

``lora_delta_torch`` is the reference (and the CPU path where the C++ op could not be
built): one shrink matmul over the slots the step uses (a contiguous range lo..hi), a
one-hot mask that keeps each token's own slot, one expand matmul: two GEMMs per projection
whatever the mix, instead of a gather, two matmuls and a scatter per adapter.
``lora_delta_bgmv`` is the CPU path: the C++ op, each run of one adapter's tokens against
its own slot only. ``lora_delta_triton`` (CUDA) is the per-token shrink and expand kernels
in kernels/lora_triton.py. Both are checked against the reference (the Triton kernels
under ``TRITON_INTERPRET=1``).
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


# ---- CPU: the C++ op (kernels/csrc/lora_bgmv.cpp) ------------------------------------------
# The runner orders a LoRA step's requests by adapter, so its tokens sit in runs of one slot;
# the op multiplies each run by its own slot's A and B only (a quarter of the one-hot's
# FLOPs with four adapters in the step) in one call per projection, shrink and expand fused.
# oneDNN's per-run GEMMs do the same FLOPs but cost ~60 us a call at decode sizes.
MAX_BGMV_WIDTH = 2048  # the op's stack buffer: sub-projections x max rank


def can_bgmv(dtype: torch.dtype, device, width: int) -> bool:
    from . import cpu_ops

    return (torch.device(device).type == "cpu" and dtype in (torch.float32, torch.bfloat16)
            and width <= MAX_BGMV_WIDTH and cpu_ops.has_op("lora_bgmv_"))


def lora_delta_bgmv(x: torch.Tensor, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                    runs: torch.Tensor, width: int) -> torch.Tensor:
    """``out`` plus each run's delta, in place; ``runs`` int64 [R, 3] of (start, end, slot)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    torch.ops.kvserve.lora_bgmv_(out, x, a, b, runs, width)
    return out


def slot_runs(pieces: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(start, end, slot) of each maximal run of one adapter, from the step's consecutive
    (tokens, slot) pieces (one per request); slot -1 (the base model) is skipped."""
    runs, row = [], 0
    for n, slot in pieces:
        if slot >= 0 and n:
            if runs and runs[-1][1] == row and runs[-1][2] == slot:
                runs[-1] = (runs[-1][0], row + n, slot)
            else:
                runs.append((row, row + n, slot))
        row += n
    return runs


def token_slots(runs: list[tuple[int, int, int]], num_tokens: int) -> list[int]:
    """Each token's slot (-1 outside the runs), for the one-hot and the Triton kernels."""
    out = [-1] * num_tokens
    for start, end, slot in runs:
        out[start:end] = [slot] * (end - start)
    return out
