"""The multi-LoRA Triton kernels (kernels/lora_triton.py: lora_delta_triton) against the torch path
(lora_delta_torch with slot_mask's one-hot), the reference.

On CUDA they run natively; on CPU in the Triton interpreter, enabled here before kernels.lora_triton
is imported (its kernels are defined at import time, as in test_kernels.py).

Dimensions are chosen off the kernels' tile sizes (in=48 against SHRINK_BLOCK_K=32, out=80
against EXPAND_BLOCK_N=64, widths 4..192 against MAX_BLOCK_W=32), so every loop runs more than
once with a masked tail, and widths that are not powers of two (3 x 4 = 12) are covered.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from triton_env import DEVICE, ON_CUDA, needs_kernels  # first: the interpreter on CPU

from kernels.lora_triton import lora_delta_triton  # noqa: E402
from kernels.lora import lora_delta_torch, slot_mask  # noqa: E402

pytestmark = needs_kernels()

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
# (atol, rtol) against the fp32 reference on the same (rounded) inputs. fp32: only the
# summation order differs. bf16/fp16: the kernel rounds its fp32 result once, at the end.
TOL = {F32: (1e-5, 1e-4), BF16: (2e-2, 1e-2), F16: (2e-3, 2e-3)}

IN, OUT, SLOTS = 48, 80, 3
UNEVEN = [0, 0, 0, -1, -1, 2, 2, 2, 2, 2, 1]


def weights(width: int, dtype=F32, seed: int = 0, extra_cols: int = 0):
    """Random a [IN, S*width + extra_cols], b [S*width, OUT + extra_cols], scaled so the
    deltas are O(1)."""
    torch.manual_seed(seed)
    a = torch.randn(IN, SLOTS * width + extra_cols) / IN ** 0.5
    b = torch.randn(SLOTS * width, OUT + extra_cols) / width ** 0.5
    return a.to(dtype).to(DEVICE), b.to(dtype).to(DEVICE)


def tokens(num: int, dtype=F32, seed: int = 1, extra_cols: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(num, IN + extra_cols).to(dtype).to(DEVICE)


def slots_tensor(token_slot: list[int]) -> torch.Tensor:
    return torch.tensor(token_slot, dtype=torch.int32).to(DEVICE)


def reference(x, a, b, token_slot: list[int], width: int) -> torch.Tensor:
    """lora_delta_torch in fp32 on the same inputs; zeros when no token has an adapter."""
    onehot, lo, hi = slot_mask(token_slot, F32, DEVICE)
    if lo == hi:
        return torch.zeros(x.shape[0], b.shape[1], dtype=F32, device=DEVICE)
    return lora_delta_torch(x.float(), a.float(), b.float(), onehot, lo, hi, width)


def check(x, a, b, token_slot: list[int], width: int) -> torch.Tensor:
    """Run the kernels, compare with the reference; -1 rows must be exactly zero."""
    got = lora_delta_triton(x, a, b, slots_tensor(token_slot), width)
    assert got.shape == (x.shape[0], b.shape[1]) and got.dtype == x.dtype
    assert got.device.type == DEVICE.type
    base = torch.tensor([s < 0 for s in token_slot], dtype=torch.bool, device=DEVICE)
    assert torch.equal(got[base], torch.zeros_like(got[base])), "slot -1 rows must be zero"
    want = reference(x, a, b, token_slot, width)
    if not base.all():  # a wrong kernel must not pass against an all-zero reference
        assert want[~base].abs().amax() > 0.1
    atol, rtol = TOL[x.dtype]
    torch.testing.assert_close(got.float(), want, atol=atol, rtol=rtol)
    return got


@pytest.mark.parametrize("n_sub", [1, 3])
@pytest.mark.parametrize("rank", [4, 16, 64])
def test_ranks_and_widths(rank, n_sub):
    """width = sub-projections x rank: 4 .. 192, including 12 and 48 (not powers of two)."""
    width = n_sub * rank
    a, b = weights(width, seed=rank + n_sub)
    check(tokens(len(UNEVEN)), a, b, UNEVEN, width)


@pytest.mark.parametrize("token_slot", [
    UNEVEN,
    [-1] * 7,
    [1] * 9,                                   # one slot, not the first: lo = 1
    [2, -1, 0, 1, 0, -1, 2, 2, 1, -1, 0] * 2,  # interleaved, 22 tokens
    [0],
], ids=["uneven", "all_none", "one_slot", "interleaved", "single"])
def test_slot_patterns(token_slot):
    width = 3 * 4
    a, b = weights(width)
    got = check(tokens(len(token_slot)), a, b, token_slot, width)
    if all(s < 0 for s in token_slot):
        assert torch.equal(got, torch.zeros_like(got))


def test_each_token_uses_its_own_slot():
    """Same x row under slots 0, 1, 2 and -1: three different deltas (no slot mixed up)."""
    width = 16
    a, b = weights(width)
    x = tokens(1).expand(4, IN).contiguous()
    got = check(x, a, b, [0, 1, 2, -1], width)
    for i in range(3):
        for j in range(i + 1, 3):
            assert (got[i] - got[j]).abs().amax() > 0.1


def test_strided_views():
    """a and b as column slices of larger weights (non-contiguous, offset storage), then both
    column-major (stride(0) == 1); x a column slice: the kernels follow the given strides."""
    width = 12
    big_a, big_b = weights(width, seed=3, extra_cols=9)
    a = big_a[:, 7:7 + SLOTS * width]
    b = big_b[:, 5:5 + OUT]
    x = tokens(len(UNEVEN), extra_cols=9)[:, 3:3 + IN]
    assert not (a.is_contiguous() or b.is_contiguous() or x.is_contiguous())
    check(x, a, b, UNEVEN, width)
    a_t, b_t = a.t().contiguous().t(), b.t().contiguous().t()  # same values, column-major
    assert a_t.stride(0) == 1 and b_t.stride(0) == 1
    check(x, a_t, b_t, UNEVEN, width)


@pytest.mark.parametrize("dtype", [BF16, F16])
def test_half_dtypes(dtype):
    width = 3 * 16
    a, b = weights(width, dtype=dtype)
    check(tokens(len(UNEVEN), dtype=dtype), a, b, UNEVEN, width)


def test_no_tokens():
    a, b = weights(8)
    got = lora_delta_triton(tokens(0), a, b, slots_tensor([]), 8)
    assert got.shape == (0, OUT) and got.dtype == F32


def bad_cases() -> dict:
    """name -> args with one thing wrong, for lora_delta_triton(x, a, b, token_slot, width)."""
    width = 8
    a, b = weights(width)
    x, ts = tokens(4), slots_tensor([0, 1, -1, 2])
    return {
        "x_1d": (x[0], a, b, ts, width),
        "a_3d": (x, a.unsqueeze(0), b, ts, width),
        "width_mismatch": (x, a, b, ts, 7),
        "width_zero": (x, a, b, ts, 0),
        "width_float": (x, a, b, ts, 8.0),
        "in_mismatch": (x[:, :40], a, b, ts, width),
        "b_rows": (x, a, b[:-width], ts, width),
        "slots_len": (x, a, b, ts[:3], width),
        "slots_int64": (x, a, b, ts.long(), width),
        "slots_2d": (x, a, b, ts.view(4, 1), width),
        "slots_strided": (x, a, b, slots_tensor([0, 0, 1, 1, -1, -1, 2, 2])[::2], width),
        "dtype_mix": (x, a.to(BF16), b, ts, width),
        "float64": (x.double(), a.double(), b.double(), ts, width),
    }


# name -> a fragment of the error it must raise (so each case fails for its own reason)
BAD = {
    "x_1d": "x must be 2-D", "a_3d": "a must be 2-D",
    "width_mismatch": "multiple of width 7", "width_zero": "width must be a positive int",
    "width_float": "width must be a positive int", "in_mismatch": "input features",
    "b_rows": "b has 16 rows", "slots_len": "3 entries for 4 tokens",
    "slots_int64": "must be int32", "slots_2d": "token_slot must be 1-D",
    "slots_strided": "contiguous", "dtype_mix": "dtypes differ", "float64": "x dtype must be",
}


def test_bad_case_names():
    assert sorted(bad_cases()) == sorted(BAD)


@pytest.mark.parametrize("name", list(BAD))
def test_bad_inputs_raise(name):
    with pytest.raises(ValueError, match=BAD[name]):
        lora_delta_triton(*bad_cases()[name])


def test_good_twin_of_bad_inputs_runs():
    """The inputs bad_cases() spoils are themselves valid (each ValueError is the one fault)."""
    width = 8
    a, b = weights(width)
    check(tokens(4), a, b, [0, 1, -1, 2], width)


# Runs in a fresh interpreter without TRITON_INTERPRET: compiles both kernels ahead of time for
# sm_90 through ptxas, from exactly what lora_delta_triton launches (launch_plan), for a few
# shapes. Catches GPU-only compile errors on a machine with no GPU; as in test_kernels.py.
AOT_SCRIPT = r"""
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels import lora_triton as lora

TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
         torch.int32: "i32"}

def compile_plan(jit_fn, args, meta):
    meta = dict(meta)
    options = {k: meta.pop(k) for k in ("num_warps", "num_stages") if k in meta}
    signature, constexprs = {}, dict(meta)
    for name, value in zip(jit_fn.arg_names, args):
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + TYPES[value.dtype]
        elif value == 1 and name not in jit_fn.do_not_specialize:
            constexprs[name] = 1  # what a launch does with an int equal to 1
        else:
            signature[name] = "i32"
    for name in constexprs:
        signature[name] = "constexpr"
    signature = {n: signature[n] for n in jit_fn.arg_names}
    src = ASTSource(fn=jit_fn, signature=signature, constexprs=constexprs)
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)

assert not lora.is_interpreted()
# (dtype, tokens, in, width, out): Llama-3-8B qkv at rank 16, a small fp32 case, width 1
for dtype, T, IN, W, OUT in [(torch.bfloat16, 64, 4096, 48, 6144),
                             (torch.float32, 3, 48, 12, 80), (torch.float16, 1, 576, 1, 1536)]:
    x, out = torch.empty(T, IN, dtype=dtype), torch.empty(T, OUT, dtype=dtype)
    a, b = torch.empty(IN, 3 * W, dtype=dtype), torch.empty(3 * W, OUT, dtype=dtype)
    slots, shrunk = torch.zeros(T, dtype=torch.int32), torch.empty(T, W)
    for kernel, grid, args, meta in lora.launch_plan(x, a, b, slots, W, shrunk, out):
        compile_plan(kernel, args, meta)
        print(kernel.fn.__name__, dtype, grid, flush=True)
print("AOT_OK")
"""


@pytest.mark.skipif(ON_CUDA, reason="on CUDA the kernels are compiled and run natively above")
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", AOT_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0 and "AOT_OK" in proc.stdout, (
        f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
