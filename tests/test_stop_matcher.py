"""StopMatcher against a brute-force reference: same match and hold-back whatever the chunking."""
from __future__ import annotations

import copy
import pickle
import random
import types

import pytest

from engine.core.sampling_params import SamplingParams
from engine.core.stop_matcher import ROOT, StopMatcher, matcher_for


def ref_match(stops, text):
    """(end, stop) of the first stop string to end in text (the longest at that end), or None."""
    for end in range(1, len(text) + 1):
        hits = [s for s in stops if text.endswith(s, 0, end)]
        if hits:
            return end, max(hits, key=len)
    return None


def ref_hold(stops, text):
    """Longest suffix of text that is a proper prefix of some stop string."""
    return max((n for s in stops for n in range(len(s)) if text.endswith(s[:n])), default=0)


def feed_chunks(matcher, chunks):
    """Feed chunks in order; (global end, stop) of the match, and depth after each chunk fed."""
    state, done, depths = ROOT, 0, []
    for chunk in chunks:
        state, hit = matcher.feed(state, chunk)
        if hit is not None:
            return (done + hit[0], hit[1]), depths
        done += len(chunk)
        depths.append((done, matcher.depth(state)))
    return None, depths


def random_split(rng, text):
    """text cut into chunks at random places (up to half of the possible cuts)."""
    places = range(1, len(text))
    cuts = sorted(rng.sample(places, rng.randint(0, len(places) // 2)))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


@pytest.mark.parametrize("alphabet", ["ab", "abc", "aab"])
def test_random_against_reference(alphabet):
    rng = random.Random(alphabet)  # str seeds are deterministic (unlike hash())
    for _ in range(300):
        stops = ["".join(rng.choices(alphabet, k=rng.randint(1, 5)))
                 for _ in range(rng.randint(1, 6))]
        text = "".join(rng.choices(alphabet + "x", k=rng.randint(0, 30)))
        matcher = StopMatcher(stops)  # reused across splits: the memo must not change answers
        want = ref_match(stops, text)
        for _ in range(4):
            got, depths = feed_chunks(matcher, random_split(rng, text))
            assert got == want, (stops, text)
            for done, depth in depths:
                assert depth == ref_hold(stops, text[:done]), (stops, text[:done])


def test_char_by_char_equals_whole_text():
    rng = random.Random(7)
    for _ in range(200):
        stops = ["".join(rng.choices("ab", k=rng.randint(1, 7))) for _ in range(rng.randint(1, 8))]
        text = "".join(rng.choices("ab", k=40))
        whole, _ = feed_chunks(StopMatcher(stops), [text])
        single, _ = feed_chunks(StopMatcher(stops), list(text))
        assert whole == single == ref_match(stops, text)


@pytest.mark.parametrize("stops, text, want", [
    (["abcd", "bc"], "xabcd", (4, "bc")),  # the first to END wins, not the first to start
    (["ab", "abc"], "abc", (2, "ab")),  # a stop that is a prefix of another ends first
    (["bc", "abc"], "xabc", (4, "abc")),  # same end: the longest
    (["aaab"], "aaaaab", (6, "aaab")),  # repeated characters: the failure link keeps "aaa"
    (["aaab"], "aaaa", None),
    (["🎉🚀", "naïve"], "a naïve 🎉🚀", (7, "naïve")),
    (["x", "x"], "abx", (3, "x")),  # duplicates
])
def test_cases(stops, text, want):
    for chunks in ([text], list(text)):
        got, _ = feed_chunks(StopMatcher(stops), chunks)
        assert got == want == ref_match(stops, text)


def test_hold_back_depths():
    m = StopMatcher(["aaab", "abcd", "bc"])
    texts = ["", "a", "aa", "aaa", "aaaa", "x", "ab", "aab"]
    states = [m.feed(ROOT, t) for t in texts]
    assert all(hit is None for _, hit in states)
    assert [m.depth(state) for state, _ in states] == [0, 1, 2, 3, 3, 0, 2, 2]
    # a complete stop that nothing extends is not held back; its held suffix is
    m = StopMatcher(["ab", "bx"])
    state, hit = m.feed(ROOT, "ab")
    assert hit == (2, "ab") and m.depth(state) == 1  # "b" may still become "bx"


def test_feed_stops_at_the_first_match():
    m = StopMatcher(["ab", "cd"])
    state, hit = m.feed(ROOT, "xabcd")
    assert hit == (3, "ab")
    assert m.depth(state) == 0


def test_long_stops_no_recursion_limit():
    # failure chains longer than Python's recursion limit
    stops = ["a" * 5000 + "b", "a" * 2500 + "c", "x" + "a" * 3000 + "d"]
    m = StopMatcher(stops)
    text = "x" + "a" * 6000 + "c"
    state, hit = m.feed(ROOT, text[:-1])
    assert hit is None and m.depth(state) == 5000
    assert m.feed(state, "c")[1] == (1, "a" * 2500 + "c")
    assert feed_chunks(StopMatcher(stops), [text])[0] == ref_match(stops, text)


def test_states_are_independent_when_shared():
    rng = random.Random(3)
    stops = ["".join(rng.choices("abc", k=rng.randint(2, 6))) for _ in range(20)]
    texts = ["".join(rng.choices("abc", k=50)) for _ in range(5)]
    shared = StopMatcher(stops)
    states, results = [ROOT] * 5, [None] * 5
    for i in range(50):  # interleave five sequences char by char on one matcher
        for k, text in enumerate(texts):
            if results[k] is None:
                states[k], hit = shared.feed(states[k], text[i])
                if hit is not None:
                    results[k] = (i + hit[0], hit[1])
    assert results == [ref_match(stops, t) for t in texts]


def test_empty_stop_rejected():
    with pytest.raises(ValueError):
        StopMatcher(["ok", ""])


def test_matcher_for_is_cached_per_params():
    params = SamplingParams(n=3, stop=["STOP", "END"])
    m = matcher_for(params)
    assert m is not None and matcher_for(params) is m  # the n children share one
    assert matcher_for(SamplingParams()) is None
    # copies rebuild a working matcher (no lock or memo carried along)
    for clone in (copy.deepcopy(params), pickle.loads(pickle.dumps(params))):
        assert matcher_for(clone) is not m
        assert matcher_for(clone).feed(ROOT, "xEND")[1] == (4, "END")
    # stops changed after the fact: not the stale matcher
    holder = types.SimpleNamespace(stop_strings=["STOP"])
    first = matcher_for(holder)
    holder.stop_strings = ["OTHER"]
    assert matcher_for(holder) is not first and matcher_for(holder).stops == ("OTHER",)
