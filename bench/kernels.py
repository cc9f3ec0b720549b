"""Time the Triton kernels against the torch reference and dense SDPA.

    python bench/kernels.py [--dtype bfloat16] [--summary FILE]

On CUDA: decode batches at SmolLM2-135M's and Llama-3-8B's head shapes, batch 1 and 64, 512
and 8k contexts, unified and split-KV (achieved K/V read bandwidth next to the device's peak;
end-to-end ms per decode step is bench/gpu_check.py's engine step), prefill
(TFLOP/s; dense causal SDPA on contiguous K/V as the yardstick, where it computes the same
thing), and the KV store. Each Triton result is also checked against the reference.
Without CUDA: times the torch reference and SDPA only, at small sizes, and says so; with
TRITON_INTERPRET=1 in the environment it also runs the Triton kernels in the interpreter
(a smoke run: interpreter timings mean nothing).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

# `python bench/kernels.py` puts bench/ first on sys.path, where this file would shadow the
# kernels package: drop bench/ and put the repository root first.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.path.dirname(_HERE)] + [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

from kernels import reference  # noqa: E402

# Peak HBM bandwidth, TB/s, by a substring of torch.cuda.get_device_name().
PEAK_TBPS = {"H200": 4.8, "H100 SXM": 3.35, "H100 NVL": 3.9, "H100 PCIe": 2.0, "H100": 3.35,
             "A100-SXM4-80GB": 2.039, "A100 80GB PCIe": 1.935, "A100": 1.555, "L40S": 0.864,
             "RTX 4090": 1.008}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def peak_tbps(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tbps in PEAK_TBPS.items():
        if key in name:
            return tbps
    return None


def bench(fn, device: torch.device, reps: int = 20) -> float:
    """Milliseconds per call (median)."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2] * 1e3


def make_paged(lens, q_lens, kvh, head_dim, block_size, dtype, device, seed=0):
    """A pool with each sequence's K/V in randomly permuted blocks, and the batch tensors."""
    g = torch.Generator(device=device).manual_seed(seed)
    per_seq = [-(-n // block_size) for n in lens]
    num_blocks = sum(per_seq) + 1
    pool = torch.randn((2, num_blocks, block_size, kvh, head_dim), generator=g, device=device,
                       dtype=dtype)
    perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed))
    tables = torch.zeros((len(lens), max(per_seq)), dtype=torch.int32)
    start = 0
    for i, n in enumerate(per_seq):
        tables[i, :n] = perm[start:start + n].int()
        start += n
    qsl = [0]
    for q in q_lens:
        qsl.append(qsl[-1] + q)
    return dict(key_cache=pool[0], value_cache=pool[1], tables=tables.to(device), qsl=qsl,
                lens=list(lens),
                qsl_t=torch.tensor(qsl, dtype=torch.int32, device=device),
                lens_t=torch.tensor(lens, dtype=torch.int32, device=device))


def dense_kv(p, i, seq_len):
    """[KVH, L, D] contiguous K and V of sequence i (for SDPA)."""
    bs = p["key_cache"].shape[1]
    ids = p["tables"][i, :-(-seq_len // bs)].long()
    k = p["key_cache"][ids].flatten(0, 1)[:seq_len].transpose(0, 1).contiguous()
    v = p["value_cache"][ids].flatten(0, 1)[:seq_len].transpose(0, 1).contiguous()
    return k, v


def row(rows, name, **cols):
    rows.append((name, cols))
    shown = "  ".join(f"{k}={v}" for k, v in cols.items())
    print(f"{name:<38} {shown}", flush=True)


def fmt(x, digits=3):
    return "-" if x is None else f"{x:.{digits}f}"


def run(device: torch.device, dtype: torch.dtype, use_triton: bool, small: bool) -> list:
    rows = []
    if use_triton:
        from kernels.kv_store import store_kv
        from kernels.paged_attention import decode_num_splits, paged_attention
    heads, kvh, head_dim, block_size = (32, 8, 128, 16) if not small else (8, 2, 64, 16)
    scale = head_dim ** -0.5
    peak = peak_tbps(device)
    itemsize = torch.empty((), dtype=dtype).element_size()

    # ---- decode: one query per sequence, at real models' head shapes ----
    # (heads, kv_heads, head_dim): SmolLM2-135M and Llama-3-8B; batch 1 and 64, short and 8k
    # contexts. The Triton kernel runs unified (one program per sequence x KV head) and, where
    # the batch leaves the device idle, split-KV (the count the engine would pick).
    if small:
        decode_cases = [("tiny", (8, 2, 64), 4, 100), ("tiny", (8, 2, 64), 1, 300)]
    else:
        decode_cases = [(name, shape, batch, ctx)
                        for name, shape in (("smollm2", (9, 3, 64)), ("llama3-8b", (32, 8, 128)))
                        for batch in (1, 64) for ctx in (512, 8192)]
    for model, (heads_m, kvh_m, hd_m), batch, ctx in decode_cases:
        scale_m = hd_m ** -0.5
        p = make_paged([ctx] * batch, [1] * batch, kvh_m, hd_m, block_size, dtype, device)
        q = torch.randn(batch, heads_m, hd_m, device=device).to(dtype)
        kv_bytes = 2 * batch * ctx * kvh_m * hd_m * itemsize
        ref_fn = lambda: reference.paged_attention(q, p["key_cache"], p["value_cache"], p["qsl"],
                                                   p["lens"], p["tables"], scale_m)
        ref_ms = bench(ref_fn, device) if small or batch * ctx <= 64 * 512 else None
        ks, vs = zip(*(dense_kv(p, i, ctx) for i in range(batch)))
        k_dense, v_dense = torch.stack(ks), torch.stack(vs)        # [B, KVH, L, D]
        q_dense = q.unsqueeze(2)                                    # [B, H, 1, D]
        sdpa_ms = bench(lambda: F.scaled_dot_product_attention(
            q_dense, k_dense, v_dense, scale=scale_m, enable_gqa=True), device)
        del ks, vs, k_dense, v_dense
        splits_list = [1]
        if use_triton:
            n = decode_num_splits(batch, kvh_m, device)
            splits_list += [n] if n > 1 else []
        for splits in splits_list if use_triton else [None]:
            tri_ms = err = bw = None
            if splits is not None:
                fn = lambda s=splits: paged_attention(q, p["key_cache"], p["value_cache"],
                                                      p["qsl_t"], p["lens_t"], p["tables"],
                                                      scale_m, num_splits=s)
                if ref_ms is not None:
                    err = (fn().float() - ref_fn().float()).abs().max().item()
                tri_ms = bench(fn, device)
                bw = kv_bytes / (tri_ms * 1e-3) / 1e12
            sdpa_bw = kv_bytes / (sdpa_ms * 1e-3) / 1e12
            row(rows, f"decode {model} B={batch} ctx={ctx} split={splits or '-'}",
                triton_ms=fmt(tri_ms), ref_ms=fmt(ref_ms), sdpa_dense_ms=fmt(sdpa_ms),
                triton_TBps=fmt(bw, 2), sdpa_TBps=fmt(sdpa_bw, 2),
                peak_TBps=fmt(peak, 2) if peak else "unknown",
                pct_peak=fmt(100 * bw / peak, 0) if (bw and peak) else "-", max_err=fmt(err, 4))
        del p

    # ---- prefill: fresh prompts (SDPA comparable) and a chunk on cached context ----
    prefill_shapes = [(4, 1024, 0), (1, 4096, 0), (2, 512, 1536)] if not small else [(2, 40, 0),
                                                                                     (1, 16, 30)]
    for batch, q_len, ctx in prefill_shapes:
        seq_len = ctx + q_len
        p = make_paged([seq_len] * batch, [q_len] * batch, kvh, head_dim, block_size, dtype,
                       device)
        q = torch.randn(batch * q_len, heads, head_dim, device=device).to(dtype)
        # causal FLOPs: QK^T and PV over the visible keys
        visible = q_len * ctx + q_len * (q_len + 1) / 2
        flops = 4 * batch * heads * head_dim * visible
        ref_fn = lambda: reference.paged_attention(q, p["key_cache"], p["value_cache"], p["qsl"],
                                                   p["lens"], p["tables"], scale)
        ref_ms = bench(ref_fn, device)
        sdpa_ms = None
        if ctx == 0:
            ks, vs = zip(*(dense_kv(p, i, seq_len) for i in range(batch)))
            k_dense, v_dense = torch.stack(ks), torch.stack(vs)
            q_dense = q.view(batch, q_len, heads, head_dim).transpose(1, 2)
            sdpa_ms = bench(lambda: F.scaled_dot_product_attention(
                q_dense, k_dense, v_dense, is_causal=True, scale=scale, enable_gqa=True), device)
        tri_ms = err = None
        if use_triton:
            fn = lambda: paged_attention(q, p["key_cache"], p["value_cache"], p["qsl_t"],
                                         p["lens_t"], p["tables"], scale)
            err = (fn().float() - ref_fn().float()).abs().max().item()
            tri_ms = bench(fn, device)
        tflops = lambda ms: None if ms is None else flops / (ms * 1e-3) / 1e12
        row(rows, f"prefill B={batch} q={q_len} ctx={ctx}", triton_ms=fmt(tri_ms),
            ref_ms=fmt(ref_ms), sdpa_dense_ms=fmt(sdpa_ms), triton_TFLOPs=fmt(tflops(tri_ms), 1),
            sdpa_TFLOPs=fmt(tflops(sdpa_ms), 1), max_err=fmt(err, 4))

    # ---- KV store ----
    for num_tokens in ([256, 4096] if not small else [64]):
        num_blocks = 2 * num_tokens // block_size + 1
        pool = torch.zeros((2, num_blocks, block_size, kvh, head_dim), dtype=dtype, device=device)
        k = torch.randn(num_tokens, kvh, head_dim, device=device).to(dtype)
        v = torch.randn_like(k)
        slots = torch.randperm(num_blocks * block_size, device=device)[:num_tokens]
        nbytes = 4 * num_tokens * kvh * head_dim * itemsize  # read + write, K and V
        ref_ms = bench(lambda: reference.store_kv(k, v, pool[0], pool[1], slots), device)
        tri_ms = bw = None
        if use_triton:
            tri_ms = bench(lambda: store_kv(k, v, pool[0], pool[1], slots), device)
            bw = nbytes / (tri_ms * 1e-3) / 1e12
        row(rows, f"kv_store T={num_tokens}", triton_ms=fmt(tri_ms, 4), ref_ms=fmt(ref_ms, 4),
            triton_TBps=fmt(bw, 2))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    ap.add_argument("--summary", help="also write the result table to this file")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype]
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = peak_tbps(device)
        print(f"device: {name}; peak HBM bandwidth: "
              f"{f'{peak} TB/s' if peak else 'unknown'}; dtype {args.dtype}")
        use_triton, small = True, False
    else:
        use_triton, small = interpret, True
        print("no CUDA device: timing the torch reference and SDPA on CPU at small sizes"
              + (" plus the Triton kernels in the interpreter (smoke run; its timings mean "
                 "nothing)" if interpret else "; the Triton kernels need CUDA (or "
                 "TRITON_INTERPRET=1 for an interpreter smoke run)"))
    rows = run(device, dtype, use_triton, small)
    if args.summary:
        with open(args.summary, "w") as f:
            for name, cols in rows:
                f.write(f"{name:<38} " + "  ".join(f"{k}={v}" for k, v in cols.items()) + "\n")


if __name__ == "__main__":
    main()
