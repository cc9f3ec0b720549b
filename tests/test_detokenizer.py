"""Incremental detokenization: UTF-8 safety and stop-string hold-back, with the real tokenizer."""
from __future__ import annotations

import subprocess
import sys

import pytest

from engine.detokenizer import IncrementalDetokenizer
from engine.request import Request
from engine.sampling_params import SamplingParams

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
