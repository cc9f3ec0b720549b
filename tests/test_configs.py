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
