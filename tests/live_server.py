"""Start and stop a real `kvserve serve` process for the tests that need one."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(tmp_path, name: str, *args: str, faults: str = "", grpc_port: int = 0,
                 env: dict | None = None):
    """A SmolLM2 fp32 server on a free port (gRPC off unless ``grpc_port``), healthy.
    Returns (process, base URL, port, log file)."""
    port = free_port()
    log = open(tmp_path / f"{name}.log", "w+")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "KVSERVE_FAULTS": faults, **(env or {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--log-level",
         "warning", "--dtype", "float32", "--max-model-len", "1024", "--max-num-seqs", "16",
         "--grpc-port", str(grpc_port), *args], stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            pytest.fail(f"server exited: {log.read()[-3000:]}")
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return proc, base, port, log
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    pytest.fail("server did not become healthy")


def stop_server(proc) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
