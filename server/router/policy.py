"""Which replica takes a request: prefix-cache affinity balanced against queue depth.
Plain Python, no I/O (tests drive it step by step).

A request's prefix is cut into fixed-size blocks of its prompt (the text, or the chat
messages as JSON) and each block gets a chained hash, like the engine's block hashes: two
requests that share their first k blocks share their first k hashes. Each replica keeps an
LRU set of the hashes it was recently sent; the request goes to the replica holding the
longest run of its leading hashes, so its KV blocks are likely still cached there, unless
that replica's queue is deeper than the least-loaded one's by more than ``max_imbalance``
requests: then load wins. With no match anywhere, the least-loaded replica takes it.
"""
from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass, field

BLOCK_CHARS = 256  # ~64 tokens of English per block
MAX_BLOCKS = 64  # a request's first 16k characters are enough to tell prefixes apart


def prefix_hashes(text: str, block_chars: int = BLOCK_CHARS) -> list[bytes]:
    """Chained hashes of the text's full blocks (a partial last block is left out: it
    cannot be a shared cached block)."""
    out, prev = [], b""
    for i in range(0, min(len(text), block_chars * MAX_BLOCKS) - block_chars + 1, block_chars):
        prev = hashlib.blake2b(prev + text[i:i + block_chars].encode("utf-8", "surrogatepass"),
                               digest_size=12).digest()
        out.append(prev)
    return out


GENERATE_PATHS = ("/v1/completions", "/v1/chat/completions", "/generate", "/generate_stream")


def request_hashes(path: str, body: bytes) -> list[bytes]:
    """Prefix hashes of a generate request's prompt (or messages); none for other routes."""
    if not path.endswith(GENERATE_PATHS):
        return []
    try:
        data = json.loads(body)
    except ValueError:
        return []
    if not isinstance(data, dict):
        return []
    for key in ("messages", "prompt", "text_input"):
        if key in data:
            value = data[key]
            return prefix_hashes(value if isinstance(value, str) else json.dumps(value))
    return []


@dataclass
class Replica:
    url: str
    healthy: bool = True
    queue: int = 0  # waiting + running, from its /metrics
    in_flight: int = 0  # requests this router has open on it (fresher than /metrics)
    capacity: int = 4096  # block hashes remembered
    recent: OrderedDict = field(default_factory=OrderedDict)
    served: int = 0
    prefix_hits: int = 0  # requests routed here for a prefix match

    @property
    def load(self) -> int:
        return max(self.queue, self.in_flight)

    def matched(self, hashes: list[bytes]) -> int:
        n = 0
        for h in hashes:
            if h not in self.recent:
                break
            n += 1
        return n

    def remember(self, hashes: list[bytes]) -> None:
        for h in hashes:
            self.recent[h] = None
            self.recent.move_to_end(h)
        while len(self.recent) > self.capacity:
            self.recent.popitem(last=False)


class AffinityPolicy:
    def __init__(self, replicas: list[Replica], max_imbalance: int = 8) -> None:
        self.replicas = replicas
        self.max_imbalance = max_imbalance

    def choose(self, hashes: list[bytes], exclude: set[str] = frozenset()) -> Replica | None:
        """The replica for a request with these prefix hashes (None: no healthy one),
        recorded as sent there."""
        picked = self.pick(hashes, exclude)
        if picked is not None:
            self.record(*picked, hashes)
        return picked and picked[0]

    def pick(self, hashes: list[bytes], exclude: set[str] = frozenset()
             ) -> tuple[Replica, bool] | None:
        """(the replica for these prefix hashes, whether for a prefix match); records
        nothing (for callers that learn later where the request really went)."""
        pool = [r for r in self.replicas if r.healthy and r.url not in exclude]
        if not pool:
            return None
        least = min(pool, key=lambda r: (r.load, r.served))
        best = max(pool, key=lambda r: (r.matched(hashes), -r.load))
        hit = best.matched(hashes) > 0 and best.load - least.load <= self.max_imbalance
        return (best, True) if hit else (least, False)

    @staticmethod
    def record(replica: Replica, hit: bool, hashes: list[bytes]) -> None:
        replica.served += 1
        replica.prefix_hits += int(hit)
        replica.remember(hashes)
