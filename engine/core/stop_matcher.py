"""Stop-string matching over streamed text: an Aho-Corasick automaton over characters.

A request may carry thousands of long stop strings, and every sequence checks them on
every step on the engine thread, so the per-character cost must not depend on how many
stop strings there are or how long they are. One ``StopMatcher`` is built per request and
shared by its n sequences; each sequence only keeps an integer state.

Semantics (what ``feed`` reports):

* A stop string matches as soon as its last character has been fed. When several could
  match, the one that ENDS first wins, and among those ending at the same character the
  longest. That is what a token-by-token stream sees first, and it makes the result
  independent of how the text is split into chunks (tokens). With stops ``["abcd", "bc"]``
  the text ``"abcd"`` stops at ``"bc"``.
* ``depth(state)`` is the length of the longest suffix of the text fed so far that is a
  proper prefix of some stop string: exactly the characters a stream must hold back,
  because they may still turn into a stop string.

The automaton is materialised lazily. Construction only sorts the (deduplicated) stop
strings; a trie state stands for a prefix P and is the range of sorted stops starting
with P, so its children are found by binary search on the character at position len(P).
A state, with its failure link, longest-stop output and hold-back depth, is created the
first time the text reaches it and then memoised. 10,000 stop strings of 800 characters
are 8M trie states: building them all eagerly in Python would take seconds and gigabytes
on the engine thread, while a stream only ever visits a few states per character.

Costs: construction is one sort. Feeding is the usual Aho-Corasick walk, amortized at
most two child look-ups per character (each failure move undoes an earlier advance); a
look-up is one dict access once the state is known, and creating a state costs one
O(log #stops) binary search, once per state for the life of the matcher. The memoised
parts only grow and never change meaning, so sharing one matcher is safe; creation
takes a lock so that concurrent feeders could not interleave two new states.
"""
from __future__ import annotations

import threading
from bisect import bisect_left, bisect_right
from operator import itemgetter

ROOT = 0  # the state of an empty text (and of any text with no stop-string prefix at its end)
_ABSENT = -1  # memoised "no child by this character"


class StopMatcher:
    """Aho-Corasick matcher over a fixed set of stop strings; states are plain ints."""

    def __init__(self, stops) -> None:
        stops = list(stops)
        if any(not isinstance(s, str) or not s for s in stops):
            raise ValueError("stop strings must be non-empty strings.")
        self.stops: tuple[str, ...] = tuple(sorted(set(stops)))
        self._lock = threading.Lock()
        # Per state, indexed by the state id: the sorted stops starting with its prefix are
        # stops[lo:hi]; len is the prefix length; fail the longest proper suffix that is a
        # state; out the index of the longest stop ending here (-1: none); hold = depth().
        self._lo = [0]
        self._hi = [len(self.stops)]
        self._len = [0]
        self._fail = [ROOT]
        self._out = [-1]
        self._hold = [0]
        self._kids: list[dict[str, int]] = [{}]

    def __reduce__(self):
        # Copies (deepcopy / pickle of a SamplingParams holding one) rebuild from the stops
        # rather than carry the memo and the lock.
        return (type(self), (self.stops,))

    # ---- matching ------------------------------------------------------------------------
    def feed(self, state: int, text: str) -> tuple[int, tuple[int, str] | None]:
        """Advance ``state`` over ``text``.

        Returns the new state and None, or, at the first stop string that completes,
        the state there and ``(end, stop)``: ``text[:end]`` ends with ``stop`` (which may
        have started in earlier text). The rest of ``text`` is not scanned.
        """
        child, fail, out = self._child, self._fail, self._out
        for i, c in enumerate(text):
            while True:
                nxt = child(state, c)
                if nxt != _ABSENT:
                    state = nxt
                    break
                if state == ROOT:
                    break
                state = fail[state]
            if out[state] >= 0:
                return state, (i + 1, self.stops[out[state]])
        return state, None

    def depth(self, state: int) -> int:
        """Trailing characters of the fed text that may still become a stop string."""
        return self._hold[state]

    def _child(self, state: int, c: str) -> int:
        """The trie child of ``state`` by ``c`` (created on first use), or -1 if none."""
        nxt = self._kids[state].get(c)
        if nxt is None:
            with self._lock:
                nxt = self._kids[state].get(c)
                if nxt is None:
                    nxt = self._materialise(state, c)
        return nxt

    # ---- lazy construction ---------------------------------------------------------------
    def _span(self, state: int, c: str) -> tuple[int, int] | None:
        """The range of sorted stops that continue this state's prefix with ``c``."""
        stops, lo, hi, n = self.stops, self._lo[state], self._hi[state], self._len[state]
        if len(stops[lo]) == n:  # the prefix itself is a stop: it sorts first, has no next char
            lo += 1
        if lo >= hi:
            return None
        if hi - lo == 1:  # a single stop left: the common case deep in long stop strings
            return (lo, hi) if stops[lo][n] == c else None
        key = itemgetter(n)
        a = bisect_left(stops, c, lo, hi, key=key)
        if a == hi or stops[a][n] != c:
            return None
        return a, bisect_right(stops, c, a, hi, key=key)

    def _materialise(self, state: int, c: str) -> int:
        """Create the child of ``state`` by ``c`` (or memoise its absence); caller holds the lock.

        The child's failure link is the child by ``c`` of the first state on ``state``'s
        failure chain that has one; that child may not exist yet either, and so on down
        to shorter suffixes. Those are collected first and created shortest first, so
        every state is created with its failure link already in place (no recursion:
        stop strings can be longer than Python's recursion limit).
        """
        span = self._span(state, c)
        if span is None:
            self._kids[state][c] = _ABSENT
            return _ABSENT
        pending = [(state, span)]  # parents whose c-child must be created, longest first
        fail = ROOT
        parent = state
        while parent != ROOT:
            f = self._fail[parent]
            found = self._find_on_chain(f, c)
            if found is None:  # no suffix continues with c
                break
            if isinstance(found, int):
                fail = found
                break
            pending.append(found)  # (f', span): its c-child is the failure target, to create
            parent = found[0]
        for parent, span in reversed(pending):
            fail = self._new_state(parent, c, span, fail)
        return fail

    def _find_on_chain(self, f: int, c: str):
        """First state from ``f`` down its failure chain with a child by ``c``.

        Returns that child's id if it exists already, ``(state, span)`` if it still has to
        be created, or None if no state on the chain (root included) has such a child.
        """
        while True:
            nxt = self._kids[f].get(c)
            if nxt is None:
                span = self._span(f, c)
                if span is not None:
                    return f, span
                self._kids[f][c] = _ABSENT
                nxt = _ABSENT
            if nxt != _ABSENT:
                return nxt
            if f == ROOT:
                return None
            f = self._fail[f]

    def _new_state(self, parent: int, c: str, span: tuple[int, int], fail: int) -> int:
        lo, hi = span
        n = self._len[parent] + 1
        is_stop = len(self.stops[lo]) == n
        sid = len(self._len)
        self._lo.append(lo)
        self._hi.append(hi)
        self._len.append(n)
        self._fail.append(fail)
        # the longest stop ending here: this prefix itself, else the longest via the suffix
        self._out.append(lo if is_stop else self._out[fail])
        # a complete stop that nothing extends is no longer a prefix worth holding back
        self._hold.append(self._hold[fail] if is_stop and hi - lo == 1 else n)
        self._kids.append({})
        self._kids[parent][c] = sid  # publish last: readers only find complete states
        return sid


def matcher_for(params) -> StopMatcher | None:
    """The request's shared matcher, built on first use (None when it has no stop strings).

    Cached on the SamplingParams object so that the n sequences of a request (which share
    it) build the automaton once. The cache is keyed by the stop list, so a params object
    whose stops were changed afterwards gets a fresh matcher.
    """
    stops = tuple(params.stop_strings)
    if not stops:
        return None
    cached = params.__dict__.get("_stop_matcher")
    if cached is not None and cached[0] == stops:
        return cached[1]
    matcher = StopMatcher(stops)
    params.__dict__["_stop_matcher"] = (stops, matcher)
    return matcher
