"""kvserve engine: paged KV cache, continuous batching, vLLM-shaped API.

Layout, by part:

- ``engine.core``: the tensor-free bookkeeping (sampling params, requests, block pool,
  KV cache manager, scheduler, stop-string matcher, config). Plain Python; importing it
  never imports torch (tests/test_layout.py).
- ``engine.model_executor``: where state becomes tensors: the model runner, the models and
  their attention backends, weight loaders (safetensors, GGUF), the sampler, quantization
  and the CPU fast paths.
- ``engine`` itself, the front: ``LLMEngine``, ``AsyncLLMEngine``, ``LLM``, tokenizer and
  detokenizer, outputs.

The public names below load on first use, so ``import engine.core.scheduler`` stays free
of torch. Modules that moved keep their old import paths (``engine.scheduler`` and so on).
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

_PUBLIC = {
    "LLM": "engine.llm", "LLMEngine": "engine.llm_engine", "EngineConfig": "engine.core.config",
    "SamplingParams": "engine.core.sampling_params", "RequestOutput": "engine.outputs",
    "CompletionOutput": "engine.outputs", "Logprob": "engine.outputs",
    "StructuredOutputsParams": "engine.core.structured_outputs",
    "LoRARequest": "engine.core.lora",
}
__all__ = list(_PUBLIC)

_CORE = ("sampling_params", "request", "block_pool", "kv_cache_manager", "scheduler",
         "stop_matcher", "faults", "config")
_EXECUTOR = ("model_runner", "model_config", "attention", "sampler", "loader", "gguf_loader",
             "quant", "calibration", "cpu_linear", "cpu_compile", "malloc_tuning", "models")
_MOVED = {f"engine.{m}": f"engine.core.{m}" for m in _CORE}
_MOVED |= {f"engine.{m}": f"engine.model_executor.{m}" for m in _EXECUTOR}


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'engine' has no attribute {name!r}")


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``import engine.scheduler`` (an old path) gives the very module object of its new
    home, so monkeypatching either name patches both."""

    def find_spec(self, fullname, path, target=None):
        if _new_name(fullname) is None:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        return importlib.import_module(_new_name(spec.name))

    def exec_module(self, module):
        pass


def _new_name(fullname: str) -> str | None:
    """Where an old module path (or a module inside an old package path) lives now."""
    for old, new in _MOVED.items():
        if fullname == old or fullname.startswith(old + "."):
            return new + fullname[len(old):]
    return None


sys.meta_path.insert(0, _MovedModules())  # before the path finder: no duplicate modules
