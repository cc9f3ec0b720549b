"""``kvserve router --backend URL ...`` (a router in front of kvserve servers anywhere), and
``kvserve serve --data-parallel-size N`` (N local replicas, each its own `kvserve serve`
process and engine, behind a router on the public port)."""
from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import subprocess
import sys
import time


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvserve router",
                                description="Route requests to kvserve replicas by prefix "
                                            "affinity and queue depth.")
    p.add_argument("--backend", nargs="+", required=True, metavar="URL",
                   help="replica base URLs (http://host:port)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=0,
                   help="also proxy KServe v2 gRPC on this port (0: off); needs --grpc-backend")
    p.add_argument("--grpc-backend", nargs="+", metavar="HOST:PORT",
                   help="each replica's gRPC address, in the order of --backend")
    p.add_argument("--health-interval", type=float, default=1.0,
                   help="seconds between reads of each replica's /health and /metrics")
    p.add_argument("--max-imbalance", type=int, default=8,
                   help="queue depth by which a prefix match may exceed the least-loaded "
                        "replica before load wins")
    p.add_argument("--log-level", default="info")
    return p


def run_router(backends: list[str], host: str, port: int, log_level: str = "info",
               **kwargs) -> None:
    import uvicorn

    from .app import build_router

    uvicorn.run(build_router(backends, **kwargs), host=host, port=port, log_level=log_level,
                timeout_graceful_shutdown=5)


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.grpc_port and len(args.grpc_backend or ()) != len(args.backend):
        parser().error("--grpc-port needs --grpc-backend: one HOST:PORT per --backend")
    run_router(args.backend, args.host, args.port, args.log_level,
               health_interval=args.health_interval, max_imbalance=args.max_imbalance,
               grpc_backends=args.grpc_backend, grpc_host=args.host, grpc_port=args.grpc_port)
    return 0


def serve_replicas(argv: list[str], n: int, host: str, port: int, log_level: str,
                   grpc_port: int = 0) -> int:
    """N `kvserve serve` children on free ports, then the router on ``port`` (and, with
    ``grpc_port``, the gRPC proxy there, each replica's gRPC on a free port of its own);
    the children stop with it."""
    from engine.distributed.workers import die_with_parent

    from ..cli import free_port

    ports = [free_port() for _ in range(n)]
    grpc_ports = [free_port() if grpc_port else 0 for _ in range(n)]
    # One box: the cores are shared out (N engines of all cores each would fight over them),
    # unless the caller chose a thread count.
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    # the replicas go when this process goes, even when a signal ends it before `finally`
    procs = [subprocess.Popen([sys.executable, "-m", "server.cli", "serve", *argv,
                               "--host", "127.0.0.1", "--port", str(p), "--grpc-port", str(g)],
                              preexec_fn=functools.partial(die_with_parent, signal.SIGTERM),
                              env=env)
             for p, g in zip(ports, grpc_ports)]
    try:
        _wait_healthy(ports, procs)
        run_router([f"http://127.0.0.1:{p}" for p in ports], host, port, log_level,
                   grpc_backends=[f"127.0.0.1:{g}" for g in grpc_ports], grpc_host=host,
                   grpc_port=grpc_port)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
    return 0


def _wait_healthy(ports: list[int], procs, timeout: float = 600.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    pending = set(ports)
    while pending:
        for p, proc in zip(ports, procs):
            if proc.poll() is not None:
                raise SystemExit(f"kvserve: replica on port {p} exited with {proc.returncode}")
        for p in list(pending):
            try:
                if httpx.get(f"http://127.0.0.1:{p}/health", timeout=1).status_code == 200:
                    pending.discard(p)
            except httpx.HTTPError:
                pass
        if time.monotonic() > deadline:
            raise SystemExit("kvserve: replicas did not become healthy")
        time.sleep(0.5)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
