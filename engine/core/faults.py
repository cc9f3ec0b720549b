"""Fault injection for tests of the engine's failure handling; off unless configured.

``KVSERVE_FAULTS`` (read at import) or ``configure(spec)`` takes comma-separated rules:

- ``sample:SEED``: sampling fails (a ``RuntimeError``) for every request whose
  ``SamplingParams.seed`` is SEED, as a bug in the sampler would: the step must fail that
  request alone.
- ``fatal:SEED``: a step that schedules such a request raises ``EngineFatalError``, which
  nothing inside the engine catches: the engine loop dies, as on an unrecoverable device
  error.

The seed is the key because clients set it and it changes nothing else for a greedy request.
"""
from __future__ import annotations

import os


class EngineFatalError(RuntimeError):
    """An error the engine must not try to survive (the loop stops)."""


_rules: dict[str, set[int]] = {}


def configure(spec: str | None) -> None:
    _rules.clear()
    for rule in (spec or "").split(","):
        if rule.strip():
            kind, _, seed = rule.strip().partition(":")
            if kind not in ("sample", "fatal"):
                raise ValueError(f"unknown fault rule {rule!r} (sample:SEED or fatal:SEED)")
            _rules.setdefault(kind, set()).add(int(seed))


def enabled() -> bool:
    return bool(_rules)


def check(kind: str, requests) -> None:
    """Raise the configured fault if one of ``requests`` (Request objects) is targeted."""
    seeds = _rules.get(kind)
    if not seeds:
        return
    for req in requests:
        if req.sampling_params.seed in seeds:
            if kind == "fatal":
                raise EngineFatalError(f"injected fatal fault (request {req.request_id})")
            raise RuntimeError(f"injected sampling fault (request {req.request_id})")


configure(os.environ.get("KVSERVE_FAULTS"))
