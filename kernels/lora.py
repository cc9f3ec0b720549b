"""Multi-LoRA deltas for a flattened batch: each token carries the slot of its adapter.

Weights of all ``S`` slots of one projection sit side by side (a slot's scale folded into
its B, lower ranks zero-padded to ``width`` = sub-projections x max rank):

    a: [in, S * width]     slot s owns columns s*width .. (s+1)*width
    b: [S * width, out]    slot s owns rows    s*width .. (s+1)*width

so a fused projection (q|k|v, gate|up) is one block-diagonal B per slot. Token t with slot
s >= 0 gets ``x[t] @ a[:, s] @ b[s]``; slot -1 (no adapter) gets nothing.

``lora_delta_torch`` is the reference (and the CPU path where oneDNN prepacking is missing):
one shrink matmul over the slots the step uses (a contiguous range lo..hi), a one-hot mask
that keeps each token's own slot, one expand matmul: two GEMMs per projection whatever the
mix, instead of a gather, two matmuls and a scatter per adapter. ``lora_delta_packed`` is
the CPU path: the same with prepacked weights, or per-run GEMMs when the step's adapter
tokens sit in a few long runs (below). ``lora_delta_triton`` (CUDA) is the per-token shrink and
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


# ---- CPU: the same deltas with oneDNN-prepacked weights ---------------------------------
# At decode sizes the LoRA matmuls are small and plain ``x @ a`` re-lays its weight out on
# every call; prepacked they cost ~25% less. And once a step's tokens are grouped by slot
# (the runner orders LoRA batches that way), long runs skip the one-hot: each run's tokens
# meet only their own slot's A and B, a quarter of the FLOPs with four adapters in the step.
RUN_ROWS = 32  # mean adapter rows per run from which per-run GEMMs beat the one-hot mask


def can_prepack(dtype: torch.dtype, device) -> bool:
    return (torch.device(device).type == "cpu" and dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def _pack(w: torch.Tensor) -> torch.Tensor:
    """w [out, in] in oneDNN's blocked layout for ``_linear``."""
    return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), 64)


def _linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


class PackedSlots:
    """One projection's slots prepacked: A of all slots (the one-hot shrink), and A and B of
    each slot (the per-run path). ``repack(slot)`` after that slot's columns of a / rows of
    b change."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, width: int) -> None:
        self.a, self.b, self.width = a, b, width
        self.slots = a.shape[1] // width
        self.a_all = _pack(a.t())
        self.a_slot = [_pack(a[:, s * width:(s + 1) * width].t()) for s in range(self.slots)]
        self.b_slot = [_pack(b[s * width:(s + 1) * width].t()) for s in range(self.slots)]

    def repack(self, slot: int) -> None:
        w = self.width
        self.a_all = _pack(self.a.t())
        self.a_slot[slot] = _pack(self.a[:, slot * w:(slot + 1) * w].t())
        self.b_slot[slot] = _pack(self.b[slot * w:(slot + 1) * w].t())


def use_runs(runs: list[tuple[int, int, int]]) -> bool:
    """Per-run GEMMs for a step whose adapter tokens sit in few long runs (prefill chunks,
    or decode rows of one adapter); the one-hot mask for many short ones."""
    if len(runs) <= 1:
        return True
    return sum(end - start for start, end, _ in runs) >= RUN_ROWS * len(runs)


def lora_delta_packed(x: torch.Tensor, out: torch.Tensor, packs: PackedSlots,
                      runs: list[tuple[int, int, int]] | None,
                      onehot: torch.Tensor | None) -> torch.Tensor:
    """``out`` plus each token's delta, in place: per run (start, end, slot) when ``runs`` is
    given, else through every slot with ``onehot`` [T, slots] keeping each token's own."""
    if runs is not None:
        for start, end, slot in runs:
            out[start:end].add_(_linear(_linear(x[start:end], packs.a_slot[slot]),
                                        packs.b_slot[slot]))
        return out
    T, w = x.shape[0], packs.width
    shrunk = (_linear(x, packs.a_all).view(T, packs.slots, w) * onehot.unsqueeze(-1))
    return out.addmm_(shrunk.view(T, -1), packs.b)


def slot_runs(token_slot: list[int]) -> list[tuple[int, int, int]]:
    """(start, end, slot) of each maximal run of one adapter (slot -1, the base, skipped)."""
    runs, start = [], 0
    for i in range(1, len(token_slot) + 1):
        if i == len(token_slot) or token_slot[i] != token_slot[start]:
            if token_slot[start] >= 0:
                runs.append((start, i, token_slot[start]))
            start = i
    return runs
