"""`--engine-arg KEY=VALUE` parsing shared by the in-process bench scripts."""
from __future__ import annotations

import ast


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
