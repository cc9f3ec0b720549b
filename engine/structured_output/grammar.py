"""Grammars for constrained decoding, on llguidance.

A constraint (``StructuredOutputsParams``) compiles once into a matcher prototype, cached
by its canonical text (LRU); each sequence gets a deep copy that follows its committed
tokens. Compiles run on their own thread (llguidance drops the GIL while it builds a
grammar), so neither the event loop, nor the prompt-preparation thread, nor the engine's
step waits for one; a request waits for its grammar alone.

Unsupported JSON-schema keywords, invalid regexes and invalid Lark grammars are errors
(``ValueError`` naming the problem), never a silently unconstrained request.
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

from ..core.structured_outputs import StructuredOutputsParams

# Compact JSON: no free whitespace between tokens, so a model cannot pad with newlines or
# spaces until max_tokens (llguidance's default separators, whitespace_flexible off).
_JSON_OPTIONS = {"whitespace_flexible": False}


class GrammarCompiler:
    def __init__(self, tokenizer, vocab_size: int, eos_token_ids, cache_size: int = 256) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(eos_token_ids)
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, str], object] = OrderedDict()
        self._lock = threading.Lock()  # the cache and the pool
        self._tokenizer_lock = threading.Lock()  # building it takes ~1 s: not under _lock
        self._ll_tokenizer = None
        self._pool: ThreadPoolExecutor | None = None

    # ---- compiling ---------------------------------------------------------------------
    def submit(self, spec: StructuredOutputsParams) -> Future:
        """A future of the prototype matcher (done at once on a cache hit)."""
        with self._lock:
            proto = self._cache.get(spec.key())
            if proto is not None:
                self._cache.move_to_end(spec.key())
                done: Future = Future()
                done.set_result(proto)
                return done
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="kvserve-grammar")
            return self._pool.submit(self.compile, spec)

    def compile(self, spec: StructuredOutputsParams):
        """The prototype matcher for ``spec`` (cached); ValueError if it cannot be enforced."""
        key = spec.key()
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        proto = self._build(spec)
        with self._lock:
            self._cache[key] = proto
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return proto

    def _build(self, spec: StructuredOutputsParams):
        import llguidance

        text = _grammar_text(llguidance, spec)
        matcher = llguidance.LLMatcher(self._tokenizer(), text, log_level=0)
        if matcher.is_error():
            raise ValueError(f"structured_outputs ({spec.kind}) cannot be enforced: "
                             f"{matcher.get_error()}")
        return matcher

    def _tokenizer(self):
        with self._tokenizer_lock:
            if self._ll_tokenizer is None:
                import llguidance.hf

                if self.tokenizer is None:
                    raise ValueError("structured outputs need a tokenizer.")
                self._ll_tokenizer = llguidance.hf.from_tokenizer(
                    self.tokenizer, n_vocab=self.vocab_size,
                    eos_token=self.eos_token_ids or None)
            return self._ll_tokenizer

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


def new_matcher(proto):
    """A sequence's own matcher: a copy of the compiled prototype, at its start."""
    return proto.deep_copy()


def _grammar_text(llguidance, spec: StructuredOutputsParams) -> str:
    M = llguidance.LLMatcher
    try:
        if spec.json is not None:
            return M.grammar_from_json_schema(spec.json, defaults=_JSON_OPTIONS)
        if spec.json_object:
            return M.grammar_from_json_schema({"type": "object"}, defaults=_JSON_OPTIONS)
        if spec.regex is not None:
            return M.grammar_from_regex(spec.regex)
        if spec.choice is not None:
            return llguidance.grammar_from("choice", json.dumps(list(spec.choice)))
        return M.grammar_from_lark(spec.grammar)
    except (ValueError, TypeError) as e:
        raise ValueError(f"structured_outputs ({spec.kind}) cannot be enforced: {e}") from e
