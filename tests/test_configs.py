"""Every shipped configs/*.toml is accepted by `kvserve serve --config` and valid for the
device it names (no model is loaded)."""
from __future__ import annotations

import glob
import os

import pytest

from engine import EngineConfig
from server.cli import load_settings

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.toml")))


def test_configs_exist():
    assert len(CONFIGS) >= 3


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_is_valid(path):
    engine_kwargs, _ = load_settings(["--config", path])
    if engine_kwargs.get("attention_backend") == "triton":
        engine_kwargs["device"] = "cuda"  # a GPU config: validated as if on one
    config = EngineConfig(**engine_kwargs)
    if "lowlatency" in path:
        assert config.quantization == "int4+int8" and config.cpu_compile
        assert str(config.kv_torch_dtype) == "torch.bfloat16"


def test_flags_override_the_config():
    path = next(p for p in CONFIGS if "lowlatency" in p)
    engine_kwargs, _ = load_settings(["--config", path, "--kv-cache-dtype", "auto",
                                      "--max-num-seqs", "4"])
    assert engine_kwargs["kv_cache_dtype"] == "auto" and engine_kwargs["max_num_seqs"] == 4


def test_cpu_engines_keep_freed_memory(smol_llm):
    """glibc's malloc is told to keep freed blocks (engine/model_executor/malloc_tuning.py) once a CPU engine
    exists: without it each large step re-faults and re-zeroes its pages (~30% of a prefill)."""
    import ctypes
    import platform

    from engine import malloc_tuning

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    assert malloc_tuning._applied is True and malloc_tuning.keep_freed_memory() is True

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
            "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    mapped = libc.mallinfo2().hblkhd
    block = libc.malloc(25 << 20)  # below the raised mmap threshold: from the heap
    try:
        assert block and libc.mallinfo2().hblkhd == mapped
    finally:
        libc.free(block)


@pytest.mark.parametrize("flag", ["--request-timeout", "--header-read-timeout",
                                  "--body-read-timeout", "--engine-death-grace",
                                  "--drain-timeout"])
@pytest.mark.parametrize("value", ["-1", "nan", "inf", "soon"])
def test_duration_flags_refuse_what_is_not_a_duration(flag, value, capsys):
    with pytest.raises(SystemExit):
        load_settings([flag, value])
    assert flag in capsys.readouterr().err
    _, srv = load_settings([flag, "2.5"])
    assert srv[flag[2:].replace("-", "_")] == 2.5
