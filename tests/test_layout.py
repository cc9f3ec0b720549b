"""The engine's layout rules: the bookkeeping (engine.core) imports no torch and nothing from
the layers above it; every import path that worked before the layout still works."""
from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

CORE = sorted(p.stem for p in pathlib.Path("engine/core").glob("*.py") if p.stem != "__init__")
OLD_PATHS = ["sampling_params", "request", "block_pool", "kv_cache_manager", "scheduler",
             "config", "model_runner", "model_config", "attention", "sampler", "loader",
             "gguf_loader", "quant", "calibration", "cpu_linear", "cpu_compile",
             "malloc_tuning", "models", "models.llama"]


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=pathlib.Path(__file__).parent.parent)


@pytest.mark.parametrize("module", CORE)
def test_core_module_imports_no_torch(module):
    out = run(f"import sys, engine.core.{module}\n"
              f"bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', "
              f"'transformers') or m.startswith(('engine.model_executor', 'engine.llm'))]\n"
              f"print(bad)")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"engine.core.{module} pulls in {out.stdout.strip()}"


def test_bookkeeping_runs_without_torch():
    # a whole schedule -> update round on the bookkeeping alone, torch never loaded
    out = run("import sys\n"
              "from engine.core.kv_cache_manager import KVCacheManager\n"
              "from engine.core.request import Request\n"
              "from engine.core.sampling_params import SamplingParams\n"
              "from engine.core.scheduler import Scheduler\n"
              "kv = KVCacheManager(8, 4)\n"
              "s = Scheduler(kv, 4, 16)\n"
              "s.add_request(Request('a', [1, 2, 3, 4, 5], SamplingParams(max_tokens=1)))\n"
              "out = s.schedule()\n"
              "done = s.update_from_output(out, {'a': 7})\n"
              "print(done[0].status.name, 'torch' in sys.modules)")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["FINISHED_LENGTH", "False"]


def test_old_import_paths_still_work():
    import importlib

    import engine

    for name in OLD_PATHS:
        new_home = "core" if name.split(".")[0] in engine._CORE else "model_executor"
        assert importlib.import_module(f"engine.{name}") is importlib.import_module(
            f"engine.{new_home}.{name}"), name
    from engine.sampling_params import SamplingParams as old

    from engine import (  # noqa: F401
        LLM,
        CompletionOutput,
        EngineConfig,
        LLMEngine,
        Logprob,
        RequestOutput,
        SamplingParams,
    )
    assert old is SamplingParams
