"""bench/gpu_check.sh --cpu-dry-run: the device check's own code, every step, on CPU in the
Triton interpreter with a tiny model, as a fresh process tree (what the lent GPU machine will
run, minus the GPU-only measurements, which must say they were skipped)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_cpu_dry_run(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    env.pop("TRITON_INTERPRET", None)  # the script sets it for the dry run itself
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--cpu-dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # what comes back from the device: three files (the tool returns at most eight)
    assert sorted(os.listdir(tmp_path)) == ["steps.log", "summary.json", "summary.md"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["dry_run"] is True
    steps = {s["step"]: s for s in summary["steps"]}
    assert list(steps) == ["versions", "kernel_tests", "parity", "engine", "attention",
                           "kernel_bench"]
    assert all(s["status"] == "PASS" for s in steps.values()), steps
    assert steps["versions"]["interpreter"] is True
    assert " passed" in steps["kernel_tests"]["summary"]
    assert steps["parity"]["equal"] == steps["parity"]["sequences"] == 8
    engine = steps["engine"]
    assert engine["kv_budget"]["num_blocks"] > 0
    assert 0 < engine["launches"]["per_layer"] <= 12
    skipped = "skipped (needs CUDA)"
    assert engine["graph_sizes"] == engine["host_syncs"] == skipped
    for timing in engine["decode"].values():
        assert timing["wall_ms"] > 0 and timing["device_ms"] == skipped
    rows = steps["attention"]["rows"]
    assert {r["splits"] for r in rows} > {1}  # the split-KV kernel was timed too
    assert all(r["GB/s"] == skipped for r in rows)
    assert any(r.startswith("decode tiny B=1 ctx=300 split=4") for r in
               steps["kernel_bench"]["rows"])
    table = (tmp_path / "summary.md").read_text()
    assert table.startswith("| step | status |") and table.count("| PASS |") == 6
