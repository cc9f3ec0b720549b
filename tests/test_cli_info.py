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
