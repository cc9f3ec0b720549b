#!/usr/bin/env python3
"""Replicas behind the router against one engine, same box, same workload, one run:
`kvserve serve` and `kvserve serve --data-parallel-size N`, each driven by bench/serving.py
with the same prompts (groups of requests that share a long system prompt, the case the
router's prefix affinity is for).

    python bench/replicas.py [--replicas 2] [--num-prompts 64] [--max-concurrency 8] \\
        [--output bench/figures/replicas2_vs_1.json]

One box means the cores are shared: N replicas get cores / N threads each (what
`--data-parallel-size` does), so this measures the router's overhead and what batching in
N smaller engines costs or gains, not N machines' worth of throughput.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

import httpx

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

from bench.common import emit_json  # noqa: E402
from server.cli import free_port  # noqa: E402

TOPICS = ["shipping", "billing", "returns", "warranty", "accounts", "delivery", "sizing", "gifts"]


def dataset(path: str, num_prompts: int, output_len: int, seed: int) -> None:
    """Requests in groups by topic: each group's prompts share a ~1.5k-character prefix."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(num_prompts):
            topic = TOPICS[i % len(TOPICS)]
            system = f"You answer questions about {topic} for an online shop. " * 24
            question = f"Customer {rng.randrange(10**6)} asks about order {rng.randrange(10**6)}."
            f.write(json.dumps({"prompt": system + question, "output_len": output_len}) + "\n")


def serve(port: int, replicas: int, log) -> subprocess.Popen:
    extra = ["--data-parallel-size", str(replicas)] if replicas > 1 else []
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--port", str(port),
                             "--grpc-port", "0", "--dtype", "float32", "--log-level", "warning",
                             "--served-model-name", "smol", *extra],
                            stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited; see {log.name}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("server did not become healthy")


def drive(port: int, data: str, args) -> dict:
    out = subprocess.run([sys.executable, os.path.join(_HERE, "serving.py"),
                          "--base-url", f"http://127.0.0.1:{port}", "--model", "smol",
                          "--dataset", data, "--num-prompts", str(args.num_prompts),
                          "--max-concurrency", str(args.max_concurrency),
                          "--warmup-requests", "2"],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--max-concurrency", type=int, default=8)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output")
    args = p.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "prompts.jsonl")
        dataset(data, args.num_prompts, args.output_len, args.seed)
        for n in (1, args.replicas):
            port = free_port()
            with open(os.path.join(tmp, f"serve{n}.log"), "w") as log:
                proc = serve(port, n, log)
                try:
                    results[f"replicas_{n}"] = run = drive(port, data, args)
                    if n > 1:
                        run["router_health"] = httpx.get(
                            f"http://127.0.0.1:{port}/health", timeout=5).json()
                finally:
                    proc.terminate()
                    proc.wait(timeout=60)
    one, many = results["replicas_1"], results[f"replicas_{args.replicas}"]
    def figures(run: dict) -> dict:
        return {"output_tok_s": run["output_throughput"], "req_s": run["request_throughput"],
                "ttft_ms_median": run["ttft_ms"]["median"], "ttft_ms_p99": run["ttft_ms"]["p99"],
                "tpot_ms_median": run["tpot_ms"]["median"], "failed": run["failed"]}

    summary = {"1": figures(one), str(args.replicas): figures(many)}
    emit_json({"workload": vars(args), "summary": summary,
               "ratio_output_throughput": many["output_throughput"] / one["output_throughput"],
               "runs": results}, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
