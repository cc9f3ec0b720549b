"""`kvserve info`: what it reports is what the engine in this process decides."""
from __future__ import annotations

import json
import subprocess
import sys


def test_info_matches_the_engine():
    from engine import EngineConfig
    from kernels import cpu_ops
    from server.info import CPU_FLAGS

    out = subprocess.run([sys.executable, "-m", "server.cli", "info", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["auto_dtype"]["dtype"] == str(EngineConfig().torch_dtype).removeprefix("torch.")
    assert info["auto_dtype"]["why"]
    assert set(info["cpu"]["flags"]) == set(CPU_FLAGS)
    assert info["cpu_ops"]["built"] == cpu_ops.available()
    if cpu_ops.available():
        assert info["cpu_ops"]["ops"]["paged_decode"] is True
        assert info["cpu_ops"]["ops"]["w8a8_linear"] == cpu_ops.has_w8a8()
    import torch
    assert info["versions"]["torch"] == torch.__version__
    text = subprocess.run([sys.executable, "-m", "server.cli", "info"], capture_output=True,
                          text=True, timeout=300).stdout
    assert f"auto dtype   {info['auto_dtype']['dtype']}" in text


def _verdict(env: dict) -> str:
    code = "from engine.core.config import cpu_bf16_is_faster; print(cpu_bf16_is_faster())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_the_bf16_verdict_is_kept_per_machine(tmp_path):
    """Processes on one machine agree on dtype="auto" even when a timing would land either side
    of the margin: the first verdict is kept, and KVSERVE_CPU_BF16 overrides it."""
    import os

    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    env.pop("KVSERVE_CPU_BF16", None)
    first = _verdict(env)
    path = tmp_path / "kvserve" / "cpu_bf16.json"
    if "avx512_bf16" not in open("/proc/cpuinfo").read() and \
            "amx_bf16" not in open("/proc/cpuinfo").read():
        assert first == "False" and not path.exists()  # no native bf16: nothing to measure
    else:
        (key, verdict), = json.loads(path.read_text()).items()
        assert str(verdict) == first
        path.write_text(json.dumps({key: not verdict}))  # a later process reads, not measures
        assert _verdict(env) == str(not verdict)
    assert _verdict({**env, "KVSERVE_CPU_BF16": "0"}) == "False"
    assert _verdict({**env, "KVSERVE_CPU_BF16": "1"}) == "True"
