"""Incremental detokenization: UTF-8 safety and stop-string hold-back, with the real tokenizer."""
from __future__ import annotations

import subprocess
import sys

import pytest

from engine.detokenizer import IncrementalDetokenizer
from engine.core.request import Request
from engine.core.sampling_params import SamplingParams
from engine.core.stop_matcher import matcher_for

TEXTS = ["Hello wörld — naïve café 🎉🚀 done", "日本語のテキストと中文字符，还有한국어", "👩‍👩‍👧 family 🇫🇷 flag"]


def stream(tokenizer, text, **params):
    prompt = tokenizer.encode("Say:")
    ids = tokenizer.encode(text)
    req = Request("r", prompt, SamplingParams(**params))
    detok = IncrementalDetokenizer(tokenizer, req)
    seen, stop = [], None
    for tid in ids:
        stop = detok.add_token(tid)
        seen.append(detok.stream_text(finished=stop is not None))
        if stop:
            break
    return ids, detok, seen, stop


@pytest.mark.parametrize("text", TEXTS)
def test_multibyte_never_broken(smol_llm, text):
    tok = smol_llm.tokenizer
    ids, detok, seen, _ = stream(tok, text)
    # the text does split characters across tokens: a naive per-prefix decode would break
    assert any("\ufffd" in tok.decode(ids[:i]) for i in range(1, len(ids)))
    assert detok.text == tok.decode(ids) == text
    for s in seen:
        assert "\ufffd" not in s
    for a, b in zip(seen, seen[1:]):  # the stream only ever grows
        assert b.startswith(a)


def test_stop_string_prefix_is_held_back(smol_llm):
    tok = smol_llm.tokenizer
    text = "The answer is 42. STOP here please"
    ids, detok, seen, stop = stream(tok, text, stop=["STOP"])
    assert stop == "STOP" and detok.text == "The answer is 42. "
    assert all("ST" not in s for s in seen)  # no part of the stop string ever shown
    # a held-back prefix that turns out not to be a stop string is released later
    _, detok, seen, stop = stream(tok, "go to STORE now", stop=["STOP"])
    assert stop is None and detok.text == "go to STORE now" and seen[-1] == "go to STORE now"


def test_generate_cli_prints_a_completion(smol_llm):
    # smol_llm makes sure the GGUF conversion is cached; this checks the command itself.
    out = subprocess.run([sys.executable, "-m", "engine.generate", "What is 2+2?", "--max-tokens", "12"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()


def test_stop_string_kept_with_include_stop_str(smol_llm):
    tok = smol_llm.tokenizer
    _, detok, seen, stop = stream(tok, "The answer is 42. STOP here please", stop=["STOP"],
                                  include_stop_str_in_output=True)
    assert stop == "STOP" and detok.text == "The answer is 42. STOP" and seen[-1] == detok.text
    # the stop string that ENDS first wins, not the one that starts first
    _, detok, _, stop = stream(tok, "we abcdef it", stop=["abcd", "bc"])
    assert stop == "bc" and detok.text == "we a"


class CharTokenizer:
    """Token ids index a list of text pieces: lets a test choose exactly how text is split."""

    def __init__(self, pieces):
        self.pieces = list(pieces)

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.pieces[i] for i in ids)


def split_stream(pieces, params):
    detok = IncrementalDetokenizer(CharTokenizer(pieces), Request("r", [], params))
    seen, stop = [], None
    for i in range(len(pieces)):
        stop = detok.add_token(i)
        seen.append(detok.stream_text(finished=stop is not None))
        if stop:
            break
    return detok, seen, stop


def test_stop_result_does_not_depend_on_token_split():
    import random

    rng = random.Random(5)
    text = "xxabcabcdabcx tail"
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, 8)))
        bounds = [0, *cuts, len(text)]
        pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
        for include in (False, True):
            params = SamplingParams(stop=["abcabcx", "cda", "bcx"],
                                    include_stop_str_in_output=include)
            detok, seen, stop = split_stream(pieces, params)
            assert stop == "cda"
            assert detok.text == ("xxabcabcda" if include else "xxabcab")
            assert all(b.startswith(a) for a, b in zip(seen, seen[1:]))
            assert all(len(s) <= len("xxabcab") for s in seen[:-1])  # nothing of it shown early


class UncheckedStops(SamplingParams):
    """SamplingParams caps the stop list it accepts; the detokenizer must scale regardless."""

    def __init__(self, stops, **kwargs) -> None:
        super().__init__(**kwargs)
        self.unchecked_stops = list(stops)

    @property
    def stop_strings(self) -> list[str]:
        return self.unchecked_stops


def test_many_long_stop_strings_cost_per_token_is_flat():
    """10,000 stop strings of 800 characters: the work per token does not grow with them.

    The generated text runs deep into 5,000 stops that share a 790-character prefix with
    it (the old per-token scan tested every prefix of every stop), then ends in one of
    them. Work is counted, not timed: automaton child look-ups (the Aho-Corasick bound is
    2 per character), states created and binary searches, compared with 10 stops.
    """
    import random

    rng = random.Random(0)
    base = "lorem ipsum dolor sit amet "  # 27 chars: the text runs along the shared prefix
    shared = (base * 30)[:790]
    many = [shared + f"{i:010d}" for i in range(5000)]
    many += [rng.randbytes(400).hex().upper() for _ in range(5000)]  # 800 chars, unrelated
    assert len(many) == 10_000 and all(len(s) == 800 for s in many)
    target = shared + f"{4242:010d}"
    text = (base * 40)[:790 + 27 * 10] + target[790:] + " and more"
    sizes = [rng.randint(4, 6) for _ in range(len(text))]
    bounds = [0]
    while bounds[-1] < len(text):
        bounds.append(min(bounds[-1] + sizes[len(bounds)], len(text)))
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    assert len(pieces) >= 200

    def run(stops):
        params = UncheckedStops(stops)
        matcher = matcher_for(params)
        counts = {"child": 0, "new": 0, "span": 0}
        for name, attr in (("child", "_child"), ("new", "_new_state"), ("span", "_span")):
            def counted(*args, _f=getattr(matcher, attr), _n=name):
                counts[_n] += 1
                return _f(*args)
            setattr(matcher, attr, counted)
        detok, seen, stop = split_stream(pieces, params)
        return detok, seen, stop, counts

    detok, seen, stop, big = run(many)
    cut = 27 * 10  # where the target starts in the text
    assert stop == target and detok.text == text[:cut]
    assert max(len(s) for s in seen[:-1]) <= cut  # the 790 held-back chars were never shown
    fed = cut + len(target)
    assert big["child"] <= 2 * fed  # amortized O(1) look-ups per character
    assert big["new"] <= fed and big["span"] <= 2 * fed

    _, _, stop_small, small = run([shared + f"{i:010d}" for i in range(4240, 4250)])
    assert stop_small == target
    # The same work with 10 stops as with 10,000, give or take the few shallow states of
    # the random stops that start like the target's digits.
    for key in big:
        assert big[key] <= 1.05 * small[key], (key, big, small)
