"""Which version of a model serves a request: a stable point per routing key, and weighted
buckets laid out so that growing a canary only ever moves users onto it.

The point is a keyed BLAKE2b of the key (Python's ``hash`` is salted per process, so it
would reshuffle users at every restart). Versions take consecutive slices of [0, 1) newest
first: ramping the newest version from 1% to 10% widens its slice [0, 0.01) to [0, 0.1),
so every key that was on it stays on it."""
from __future__ import annotations

import hashlib
import math

_KEY = b"kvserve-routing-v1"  # changing it moves every user: never do it in place
_SCALE = float(1 << 64)


def route_point(key: str) -> float:
    """The key's fixed place in [0, 1), the same in every process and after restarts."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), key=_KEY,
                             digest_size=8).digest()
    return int.from_bytes(digest, "big") / _SCALE


def version_order(versions) -> list[str]:
    """Newest first: numeric versions by number, then any others by name."""
    def rank(v: str):
        return (0, -int(v), "") if v.isdigit() else (1, 0, v)
    return sorted(versions, key=rank)


def check_weights(weights: dict) -> dict[str, float]:
    """{version: weight} as given by a client or a config -> validated floats; raises
    ValueError naming the bad entry. Weights are relative (99/1 is 99% / 1%)."""
    if not isinstance(weights, dict) or not weights:
        raise ValueError("traffic must be an object of {version: weight}, e.g. "
                         '{"1": 99, "2": 1}')
    out = {}
    for version, w in weights.items():
        if not isinstance(version, str) or not version:
            raise ValueError(f"traffic: version {version!r:.40} must be a non-empty string")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) \
                or w < 0:
            raise ValueError(f"traffic: the weight of version {version:.40} must be a "
                             f"number >= 0, got {w!r:.40}")
        out[version] = float(w)
    if sum(out.values()) <= 0:
        raise ValueError("traffic: at least one version needs a weight above 0")
    return out


def pick(weights: dict[str, float], point: float) -> str:
    """The version whose slice holds ``point``; ``weights`` from check_weights."""
    total = sum(weights.values())
    edge = 0.0
    chosen = None
    for version in version_order(weights):
        w = weights[version]
        if w <= 0:
            continue
        chosen = version
        edge += w / total
        if point < edge:
            return version
    return chosen  # rounding left the top sliver of [0, 1): the last slice takes it
