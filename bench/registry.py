#!/usr/bin/env python3
"""The registry's two costs, on a live `kvserve serve --config`: a steady client's TTFT while
a version is swapped (load v2 of the same model, move all traffic to it, unload v1) against
the same client without a swap, in one run; and a model's reload after it was scaled to
zero against its first start.

    python bench/registry.py [--model PATH] [--clients 4] [--seconds 20] \\
        [--output bench/figures/registry_swap.json]

Every client streams greedy completions back to back (a short prompt, --max-tokens each);
TTFT is time to the first content chunk, measured on the client. The swap starts one second
into its phase; its admin calls are timed too. Failed requests are counted (the goal: 0).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

from bench.common import emit_json  # noqa: E402

ADMIN = "bench-admin"
PROMPT = "Write one sentence about the sea."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(config: str, port: int, log) -> tuple[subprocess.Popen, float]:
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--config", config,
                             "--port", str(port), "--grpc-port", "0", "--log-level", "warning"],
                            stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"server exited; see {log.name}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc, time.monotonic() - t0
        except httpx.HTTPError:
            time.sleep(0.2)


async def one(client: httpx.AsyncClient, base: str, max_tokens: int) -> tuple[float | None, str]:
    """(TTFT seconds or None if it failed, the served model)."""
    body = {"model": "smol", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "ignore_eos": True}
    t0 = time.monotonic()
    ttft, served = None, ""
    async with client.stream("POST", base + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return None, ""
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return None, served
            served = chunk.get("model", served)
            if ttft is None and chunk["choices"] and chunk["choices"][0]["text"]:
                ttft = time.monotonic() - t0
    return ttft, served


async def phase(base: str, clients: int, seconds: float, max_tokens: int, during=None) -> dict:
    """``clients`` back-to-back streaming clients for ``seconds``; ``during()`` runs
    alongside (the swap)."""
    ttfts, failed, served = [], 0, {}
    stop = time.monotonic() + seconds

    async def loop(client):
        nonlocal failed
        while time.monotonic() < stop:
            t, model = await one(client, base, max_tokens)
            if t is None:
                failed += 1
            else:
                ttfts.append(t)
                served[model] = served.get(model, 0) + 1

    async with httpx.AsyncClient(timeout=120) as client:
        jobs = [loop(client) for _ in range(clients)]
        extra = [during()] if during else []
        results = await asyncio.gather(*jobs, *extra)
    ttfts.sort()
    return {"requests": len(ttfts), "failed": failed, "served": served,
            "ttft_p50_ms": round(1000 * statistics.median(ttfts), 1),
            "ttft_p99_ms": round(1000 * ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))], 1),
            "ttft_max_ms": round(1000 * ttfts[-1], 1),
            **({"swap": results[-1]} if during else {})}


async def swap(base: str, model_path: str) -> dict:
    """Load v2 (same weights, a second engine), give it all traffic, unload v1; timed."""
    h = {"Authorization": f"Bearer {ADMIN}"}
    m = base + "/v2/repository/models/smol"
    out = {}
    await asyncio.sleep(1.0)
    async with httpx.AsyncClient(timeout=300, headers=h) as c:
        t0 = time.monotonic()
        r = await c.post(m + "/load", json={"parameters": {"version": "2", "path": model_path}})
        r.raise_for_status()
        out["load_s"] = round(time.monotonic() - t0, 2)
        t1 = time.monotonic()
        (await c.put(m + "/traffic", json={"2": 100})).raise_for_status()
        (await c.post(m + "/unload", json={"parameters": {"version": "1"}})).raise_for_status()
        while True:
            rows = (await c.post(base + "/v2/repository/index", json={})).json()
            if next(r for r in rows if r["version"] == "1")["state"] == "UNLOADED":
                break
            await asyncio.sleep(0.05)
        out["traffic_to_v1_unloaded_s"] = round(time.monotonic() - t1, 2)
    return out


def metric(base: str, name: str) -> float:
    for line in httpx.get(base + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model path (default: the bundled SmolLM2 GGUF)")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--idle-unload-s", type=float, default=3.0)
    p.add_argument("--output")
    args = p.parse_args()
    from engine.core.config import default_model_path

    model_path = args.model or default_model_path()
    with tempfile.TemporaryDirectory() as tmp:
        config = os.path.join(tmp, "registry.toml")
        with open(config, "w") as f:
            f.write(f'admin_key = "{ADMIN}"\ndtype = "float32"\n[models.smol]\n'
                    f'idle_unload_s = {args.idle_unload_s}\n'
                    f'engine = {{kv_cache_memory_bytes = 268435456}}\n'
                    f'[models.smol.versions.1]\npath = "{model_path}"\n')
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        log = open(os.path.join(tmp, "server.log"), "w+")
        proc, started = start(config, port, log)
        try:
            h = {"Authorization": f"Bearer {ADMIN}"}
            first_load = httpx.post(base + "/v2/repository/index", json={},
                                    headers=h).json()[0]["load_seconds"]
            steady = asyncio.run(phase(base, args.clients, args.seconds, args.max_tokens))
            swapping = asyncio.run(phase(base, args.clients, args.seconds, args.max_tokens,
                                         lambda: swap(base, model_path)))
            deadline = time.monotonic() + 60 + args.idle_unload_s
            while time.monotonic() < deadline:
                rows = httpx.post(base + "/v2/repository/index", json={}, headers=h).json()
                if any(r["version"] == "2" and r["state"] == "IDLE" for r in rows):
                    break
                time.sleep(0.2)
            t0 = time.monotonic()
            ttft, _ = asyncio.run(_once(base, args.max_tokens))
            cold_request = time.monotonic() - t0
            reload_s = metric(base, 'kvserve_cold_start_seconds_sum{model_name="smol"}')
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            log.close()
    result = {
        "command": "python bench/registry.py " + " ".join(sys.argv[1:]),
        "clients": args.clients, "seconds_per_phase": args.seconds,
        "max_tokens": args.max_tokens,
        "first_start": {"process_to_healthy_s": round(started, 2),
                        "model_load_and_warmup_s": first_load},
        "reload_after_idle": {"cold_start_s": round(reload_s, 3),
                              "first_request_e2e_s": round(cold_request, 3),
                              "first_request_ttft_s": None if ttft is None else round(ttft, 3)},
        "steady_client": steady, "during_swap": swapping,
        "p99_ttft_ratio_swap_vs_steady": round(swapping["ttft_p99_ms"] / steady["ttft_p99_ms"], 2),
    }
    emit_json(result, args.output)
    return 0


async def _once(base: str, max_tokens: int):
    async with httpx.AsyncClient(timeout=300) as client:
        return await one(client, base, max_tokens)


if __name__ == "__main__":
    sys.exit(main())
