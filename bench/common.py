"""Helpers shared by the bench scripts (imported as ``bench.common`` from the repo root)."""
from __future__ import annotations

import ast
import json
import os


def parse_engine_args(pairs: list[str]) -> dict:
    """["quantization=int4", "cpu_compile=True"] -> {"quantization": "int4", "cpu_compile": True}"""
    kwargs = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            kwargs[key.replace("-", "_")] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key.replace("-", "_")] = value
    return kwargs


def emit_json(result: dict, output: str | None) -> None:
    """Print ``result`` as JSON, and write it to ``output`` too (atomically: a reader never
    sees half a file)."""
    text = json.dumps(result, indent=2)
    print(text)
    if output:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        tmp = output + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text + "\n")
        os.replace(tmp, output)
