#!/usr/bin/env python3
"""Tensor parallelism on this machine: the same offline workload at tp=1 and tp=N in one
run, and where tp=N's time goes (rank 0's time inside collectives: all-reduces, the logits
gather and the step broadcast, which include waiting for the slowest rank).

    python bench/tp.py [--tp 3] [--num-prompts 32] [--input-len 128] [--output-len 64]

SmolLM2 splits only 3 (or 9) ways: 9 heads, 3 KV heads. On a 2-core machine tp>1 shares
the same two cores between ranks, so it measures overhead, not speed-up.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

from bench.common import emit_json  # noqa: E402


def timed(cls, name: str, totals: dict):
    """Wrap cls.name to add its wall time to totals[name] (rank 0 only: this process)."""
    original = getattr(cls, name)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            totals[name] = totals.get(name, 0.0) + time.perf_counter() - t0
    setattr(cls, name, wrapper)


def run(llm, prompts, output_len: int) -> tuple[float, int]:
    from engine import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return time.perf_counter() - t0, sum(len(o.outputs[0].token_ids) for o in outs)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tp", type=int, default=3)
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--output")
    args = p.parse_args()
    from engine import LLM
    from engine.distributed.tp import TPGroup

    rng = random.Random(0)
    prompts = [[rng.randrange(100, 40000) for _ in range(args.input_len)]
               for _ in range(args.num_prompts)]
    kw = dict(dtype="float32", kv_cache_memory_bytes=256 << 20)
    one = LLM(**kw)
    run(one, prompts[:2], 4)  # warm-up
    t1, n1 = run(one, prompts, args.output_len)
    layers = one.engine.model_config.num_hidden_layers
    del one

    totals: dict = {}
    for name in ("all_reduce", "gather_rows", "broadcast_object"):
        timed(TPGroup, name, totals)
    t0 = time.perf_counter()
    many = LLM(tensor_parallel_size=args.tp, **kw)
    start_s = time.perf_counter() - t0
    run(many, prompts[:2], 4)
    totals.clear()
    steps0 = many.engine.runner.tp.num_collectives
    tn, nn = run(many, prompts, args.output_len)
    collectives = many.engine.runner.tp.num_collectives - steps0
    steps = collectives // (2 * layers + 2)
    many.shutdown()
    emit_json({
        "command": "python bench/tp.py " + " ".join(sys.argv[1:]),
        "cores": os.cpu_count(), "tp": args.tp,
        "workload": f"{args.num_prompts} prompts x {args.input_len} in, {args.output_len} out",
        "tp1_s": round(t1, 2), f"tp{args.tp}_s": round(tn, 2),
        "slowdown": round(tn / t1, 2), "tokens": [n1, nn],
        f"tp{args.tp}_start_s": round(start_s, 2),
        "rank0_seconds_in": {k: round(v, 2) for k, v in totals.items()},
        "steps": steps,
        "all_reduce_ms_per_layer_per_step": round(
            1000 * totals.get("all_reduce", 0) / max(1, steps * (2 * layers + 1)) * 2, 3),
    }, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
