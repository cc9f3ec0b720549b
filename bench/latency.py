#!/usr/bin/env python3
"""Latency benchmarks for kvserve.

Batch latency (default): the Python engine in-process (``engine.LLM``), one ``generate`` call
per batch of random prompts, for several batch sizes::

    python bench/latency.py --batch-sizes 1,4,16 --input-len 128 --output-len 64

For each batch size, after ``--num-warmup`` untimed batches, it times ``--num-iters`` batches
with ``max_tokens=1`` (prefill: time to the first token of the whole batch) and ``--num-iters``
with ``max_tokens=--output-len`` (end to end), greedy with ``ignore_eos`` so every sequence
produces exactly ``--output-len`` tokens, and reports (medians over the iterations)::

    e2e_s              seconds for the whole batch
    prefill_s          seconds for the max_tokens=1 batch
    ms_per_token       e2e / output_len: per-sequence latency per output token, prefill included
    decode_step_ms     (e2e - prefill) / (output_len - 1): one decode step, i.e. the time
                       between two tokens of a sequence once the batch is decoding
    output_tok_s       batch * output_len / e2e

Every sequence of every batch gets fresh random token ids, so the prefix cache never hits
(identical prompts would make later prefills free and the numbers optimistic).

Cold start (``--cold-start``): launches ``kvserve serve`` as a subprocess, polls ``/health``
until it answers 200 ("ready"), then sends one streaming completion and times its first
content chunk ("first token"); both measured from the launch. Arguments after ``--`` go to
``kvserve serve``::

    python bench/latency.py --cold-start --cold-start-runs 3 -- --config configs/cpu-small.toml

JSON goes to stdout and, with ``--output FILE``, to FILE.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

# bench/ holds scripts, not modules: keep it off sys.path so a script here (bench/kernels.py)
# cannot shadow a package of the same name (kvserve's kernels, or the one transformers probes).
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))  # the repo root: engine, kernels, server

from bench.common import emit_json, parse_engine_args  # noqa: E402


def summary(values: list[float]) -> dict:
    s = sorted(values)
    return {"mean": statistics.fmean(s), "median": statistics.median(s), "min": s[0],
            "max": s[-1], "runs": values}


# ---------------------------------------------------------------------------------------------
# Batch latency (in-process engine)
# ---------------------------------------------------------------------------------------------
def batch_latency(args) -> dict:
    import torch

    from engine import LLM, SamplingParams

    if args.threads:
        torch.set_num_threads(args.threads)
    t = time.perf_counter()
    llm = LLM(args.model, **parse_engine_args(args.engine_arg))
    load_s = time.perf_counter() - t
    tok = llm.tokenizer
    special = set(tok.all_special_ids)
    vocab = [i for i in range(len(tok)) if i not in special]
    rng = random.Random(args.seed)

    def batch(size: int, max_tokens: int) -> float:
        prompts = [{"prompt_token_ids": [rng.choice(vocab) for _ in range(args.input_len)]}
                   for _ in range(size)]
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        got = [len(o.outputs[0].token_ids) for o in outs]
        if got != [max_tokens] * size:
            raise RuntimeError(f"expected {max_tokens} tokens per sequence, got {got}")
        return elapsed

    rows = []
    for size in args.batch_sizes:
        for _ in range(args.num_warmup):
            batch(size, args.output_len)
        prefill = [batch(size, 1) for _ in range(args.num_iters)]
        e2e = [batch(size, args.output_len) for _ in range(args.num_iters)]
        e2e_med, prefill_med = statistics.median(e2e), statistics.median(prefill)
        decode = ((e2e_med - prefill_med) / (args.output_len - 1) * 1000.0
                  if args.output_len > 1 else None)
        row = {"batch_size": size, "e2e_s": summary(e2e), "prefill_s": summary(prefill),
               "ms_per_token": e2e_med / args.output_len * 1000.0,
               "decode_step_ms": decode,
               "output_tok_s": size * args.output_len / e2e_med}
        rows.append(row)
        print(f"batch {size:>3}: e2e {e2e_med:.3f} s, prefill {prefill_med:.3f} s, "
              f"decode step {decode if decode is not None else float('nan'):.1f} ms, "
              f"{row['output_tok_s']:.1f} tok/s", file=sys.stderr)
    cfg = llm.engine.config
    return {"benchmark": "batch_latency",
            "settings": {"model": args.model or "SmolLM2-135M-Instruct (bundled)",
                         "input_len": args.input_len, "output_len": args.output_len,
                         "batch_sizes": args.batch_sizes, "num_warmup": args.num_warmup,
                         "num_iters": args.num_iters, "seed": args.seed,
                         "engine_args": parse_engine_args(args.engine_arg),
                         "device": str(cfg.torch_device), "dtype": str(cfg.torch_dtype),
                         "torch_threads": torch.get_num_threads()},
            "model_load_s": load_s, "results": rows,
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


# ---------------------------------------------------------------------------------------------
# Cold start (subprocess server)
# ---------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(port: int, extra: list[str]) -> list[str]:
    exe = os.path.join(os.path.dirname(sys.executable), "kvserve")  # the venv's entry point
    if not os.path.exists(exe):
        exe = shutil.which("kvserve")
    base = [exe] if exe else [sys.executable, "-m", "server.cli"]
    return [*base, "serve", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
            *extra]


def cold_start_once(args, extra: list[str]) -> dict:
    import httpx

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = serve_command(port, extra)
    env = {**os.environ}
    env.setdefault("HF_HUB_OFFLINE", "1")
    log = tempfile.TemporaryFile(mode="w+")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        with httpx.Client(trust_env=False, timeout=httpx.Timeout(args.timeout, connect=1.0)) as c:
            deadline = t0 + args.timeout
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read()[-3000:]}")
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"server not healthy after {args.timeout} s")
                try:
                    if c.get(base + "/health", timeout=1.0).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.02)
            ready = time.perf_counter() - t0
            model = args.model_name or c.get(base + "/v1/models", headers=headers).json()["data"][0]["id"]
            payload = {"model": model, "prompt": args.prompt, "max_tokens": args.max_tokens,
                       "temperature": 0.0, "ignore_eos": True, "stream": True}
            sent = time.perf_counter()
            first = None
            with c.stream("POST", base + "/v1/completions", json=payload, headers=headers) as r:
                if r.status_code != 200:
                    raise RuntimeError(f"HTTP {r.status_code}: {r.read().decode(errors='replace')}")
                for line in r.iter_lines():
                    if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                        continue
                    chunk = json.loads(line[5:])
                    if first is None and chunk.get("choices") and chunk["choices"][0].get("text"):
                        first = time.perf_counter()
            done = time.perf_counter()
        if first is None:
            raise RuntimeError("the request streamed no content")
        return {"ready_s": ready, "first_token_s": first - t0, "request_ttft_s": first - sent,
                "request_e2e_s": done - sent, "command": cmd}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def cold_start(args, extra: list[str]) -> dict:
    runs = []
    for i in range(args.cold_start_runs):
        r = cold_start_once(args, extra)
        runs.append(r)
        print(f"run {i + 1}: ready {r['ready_s']:.2f} s, first token {r['first_token_s']:.2f} s",
              file=sys.stderr)
    return {"benchmark": "cold_start",
            "settings": {"serve_args": extra, "runs": args.cold_start_runs,
                         "prompt": args.prompt, "max_tokens": args.max_tokens,
                         "command": runs[0]["command"]},
            "ready_s": summary([r["ready_s"] for r in runs]),
            "first_token_s": summary([r["first_token_s"] for r in runs]),
            "request_ttft_s": summary([r["request_ttft_s"] for r in runs]),
            "note": "run 1 may include the one-time GGUF -> safetensors conversion when "
                    "~/.cache/kvserve is empty; later runs find the OS file cache warm",
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Arguments after -- are passed to `kvserve serve` "
                                       "(--cold-start only).")
    p.add_argument("--model", help="HF directory or .gguf (default: the bundled SmolLM2)")
    p.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra EngineConfig field, e.g. max_num_batched_tokens=4096 (repeatable)")
    p.add_argument("--batch-sizes", default="1,4,16",
                   type=lambda s: [int(x) for x in s.split(",") if x.strip()])
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--num-warmup", type=int, default=1)
    p.add_argument("--num-iters", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int,
                   help="torch intra-op threads (default: torch's, one per core). On a shared "
                        "box, fewer threads than cores avoids stalls when another process "
                        "takes a core")
    p.add_argument("--cold-start", action="store_true",
                   help="measure `kvserve serve` launch -> ready -> first streamed token instead")
    p.add_argument("--cold-start-runs", type=int, default=1)
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--max-tokens", type=int, default=8, help="cold-start request length")
    p.add_argument("--model-name", help="cold start: model name to request (default: /v1/models)")
    p.add_argument("--api-key", default=os.environ.get("KVSERVE_API_KEY"),
                   help="cold start: key the server expects, if any")
    p.add_argument("--timeout", type=float, default=300.0, help="cold start: seconds to wait")
    p.add_argument("--output", help="also write the JSON result here")
    args = p.parse_args(argv)
    if args.output_len < 1 or args.input_len < 1 or args.num_iters < 1 or not args.batch_sizes:
        p.error("lengths, --num-iters and --batch-sizes must be positive")
    if extra and not args.cold_start:
        p.error("arguments after -- are for --cold-start")
    return args, extra


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        result = cold_start(args, extra) if args.cold_start else batch_latency(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    emit_json(result, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
