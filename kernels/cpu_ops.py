"""The C++ CPU ops (kernels/csrc/*.cpp), built once with torch's cpp_extension (cached under
~/.cache/torch_extensions/kvserve_cpu_ops/<hash>, see _build_dir) and registered as real torch ops, ``torch.ops.kvserve.*``:

- ``paged_decode``, ``paged_prefill``, ``store_kv``: paged attention over the block pool
  (kernels/cpu_attention.py);
- ``w8a8_linear``: the int8 x int8 linear of ``quantization="int8"`` (engine/model_executor/quant.py);
- ``lora_bgmv_``: multi-LoRA deltas, each row against its own adapter slot
  (engine/lora/layers.py);
- ``argmax_rows``: greedy sampling's per-row argmax (engine/model_executor/sampler.py);
- ``silu_mul``, ``add_rms_norm``, ``rotary_``: fused elementwise steps of quantized models
  (engine/model_executor/models/llama.py).

Real torch ops rather than pybind functions so torch.compile'd decode steps call them
without leaving the compiled graph. If the build fails (no compiler), ``available()`` is
False and callers keep their torch paths.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
import time

import torch

logger = logging.getLogger(__name__)
_CSRC = os.path.join(os.path.dirname(__file__), "csrc")
_SOURCES = [os.path.join(_CSRC, name) for name in ("paged_decode.cpp", "paged_prefill.cpp",
                                                       "int8_linear.cpp",
                                                       "argmax.cpp", "fused_elementwise.cpp",
                                                       "lora_bgmv.cpp")]
_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffast-math", "-fno-finite-math-only"]
# A build holds <dir>/lock while it runs (a minute or two); one older than this was left by
# a process killed mid-build, and torch would wait on it forever.
STALE_LOCK_SECONDS = 900
_lock = threading.Lock()
_loaded = False
_failed = False


def available() -> bool:
    global _loaded, _failed
    with _lock:
        if not _loaded and not _failed:
            try:
                from torch.utils.cpp_extension import load

                load(name="kvserve_cpu_ops", sources=_SOURCES, is_python_module=False,
                     extra_cflags=_CFLAGS, extra_ldflags=["-fopenmp"], verbose=False,
                     build_directory=_build_dir())
                _register_fakes()
                _loaded = True
            except Exception as e:  # noqa: BLE001 - any build failure means: use torch ops
                logger.warning("C++ CPU ops unavailable (%s); using torch ops.", e)
                _failed = True
    return _loaded


def _build_dir() -> str:
    """One build folder per version of the sources, compiler flags and torch install: two
    checkouts or venvs on one machine (a CI clone beside a working tree) never rebuild over
    each other, and headers are part of the key (torch's own check hashes the .cpp files)."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(_CSRC)):
        with open(os.path.join(_CSRC, name), "rb") as f:
            digest.update(name.encode() + f.read())
    digest.update(" ".join(_CFLAGS + [torch.__version__, torch.__file__]).encode())
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "torch_extensions")
    path = os.path.join(root, "kvserve_cpu_ops", digest.hexdigest()[:16])
    os.makedirs(path, exist_ok=True)
    lock = os.path.join(path, "lock")
    try:
        if time.time() - os.path.getmtime(lock) > STALE_LOCK_SECONDS:
            logger.warning("removing %s, left by a build that was killed", lock)
            os.remove(lock)
    except OSError:  # no lock: the usual case
        pass
    return path


def has_op(name: str) -> bool:
    """torch.ops.kvserve.<name> has a CPU kernel: some are built only where the compiler
    targets AVX-512 (paged_prefill) or AVX-512 VNNI (w8a8_linear)."""
    return available() and torch._C._dispatch_has_kernel_for_dispatch_key(f"kvserve::{name}", "CPU")


def has_w8a8() -> bool:
    return has_op("w8a8_linear")


def _register_fakes() -> None:
    """Shape functions, so torch.compile can trace through the ops."""
    @torch.library.register_fake("kvserve::paged_decode")
    def _(query, key_cache, value_cache, block_tables, seq_lens, scale, window):
        return torch.empty_like(query, memory_format=torch.contiguous_format)

    @torch.library.register_fake("kvserve::paged_prefill")
    def _(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale, window,
          out):
        return None

    @torch.library.register_fake("kvserve::store_kv")
    def _(key, value, key_cache, value_cache, slot_mapping):
        return None

    @torch.library.register_fake("kvserve::lora_bgmv_")
    def _(out, x, a, b, runs, width):
        return None

    @torch.library.register_fake("kvserve::argmax_rows")
    def _(x):
        return x.new_empty(x.shape[0], dtype=torch.long)

    @torch.library.register_fake("kvserve::silu_mul")
    def _(gate_up):
        return gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)

    @torch.library.register_fake("kvserve::add_rms_norm")
    def _(x, residual, weight, eps):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("kvserve::rotary_")
    def _(q, k, cos, sin):
        return None

    @torch.library.register_fake("kvserve::w8a8_linear")
    def _(x, w_packed, w_scale, outliers, w_outliers, bias, w_t, dynamic):
        return x.new_empty((*x.shape[:-1], w_scale.shape[0]))
