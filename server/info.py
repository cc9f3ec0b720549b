"""``kvserve info``: what this machine gives kvserve, and what the engine would choose here.

Prints the CPU features the fast paths look for, the dtype that ``dtype="auto"`` picks and
why, whether the C++ CPU ops build (and which of them this CPU runs), the CUDA device if
any, and the versions of the packages that matter. ``--json`` for machines to read.
"""
from __future__ import annotations

import argparse
import json
import platform

CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
CPU_OPS = ("paged_decode", "paged_prefill", "store_kv", "argmax_rows", "w8a8_linear",
           "silu_mul", "add_rms_norm", "rotary_")
PACKAGES = ("torch", "triton", "transformers", "starlette", "sse_starlette", "uvicorn")


def _cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def cpu_flags() -> dict[str, bool]:
    words = set(_cpuinfo().split())
    return {flag: flag in words for flag in CPU_FLAGS}


def cpu_model() -> str:
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def dtype_choice(flags: dict[str, bool]) -> tuple[str, str]:
    """(the dtype ``dtype="auto"`` picks on this machine, why)."""
    import torch

    from engine.core.config import EngineConfig, cpu_bf16_is_faster

    chosen = str(EngineConfig().torch_dtype).removeprefix("torch.")
    if torch.cuda.is_available():
        return chosen, "CUDA device: bfloat16"
    if not (flags["avx512_bf16"] or flags["amx_bf16"]):
        return chosen, "no native bf16 on this CPU (avx512_bf16 / amx_bf16)"
    if cpu_bf16_is_faster():
        return chosen, "native bf16, measured >= 1.5x the fp32 matmul rate"
    return chosen, "native bf16, but measured < 1.5x the fp32 matmul rate"


def cpu_ops_status() -> dict:
    from kernels import cpu_ops

    if not cpu_ops.available():
        return {"built": False, "ops": {}}
    return {"built": True, "ops": {name: cpu_ops.has_op(name) for name in CPU_OPS}}


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = version(name.replace("_", "-"))
        except PackageNotFoundError:
            out[name] = None
    return out


def collect() -> dict:
    import torch

    flags = cpu_flags()
    dtype, why = dtype_choice(flags)
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": {"model": cpu_model(),
                    "threads": torch.get_num_threads(), "flags": flags},
            "cuda": cuda, "auto_dtype": {"dtype": dtype, "why": why},
            "cpu_ops": cpu_ops_status(), "versions": versions()}


def render(info: dict) -> str:
    flags = " ".join(f"{k}{'' if v else ' (no)'}" for k, v in info["cpu"]["flags"].items())
    ops = info["cpu_ops"]
    op_line = ("not built: torch fallbacks in use" if not ops["built"] else
               ", ".join(f"{k}{'' if v else ' (not on this CPU)'}" for k, v in ops["ops"].items()))
    return "\n".join([
        f"CPU          {info['cpu']['model']}, {info['cpu']['threads']} torch threads",
        f"CPU features {flags}",
        f"CUDA         {info['cuda'] or 'none'}",
        f"auto dtype   {info['auto_dtype']['dtype']} ({info['auto_dtype']['why']})",
        f"C++ ops      {op_line}",
        "versions     " + ", ".join(f"{k} {v or '(not installed)'}"
                                    for k, v in info["versions"].items()),
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kvserve info", description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="print JSON")
    args = p.parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=2) if args.json else render(info))
    return 0
