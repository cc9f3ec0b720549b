"""Structured outputs in the engine (llguidance grammars masking the logits), on the bundled
SmolLM2: what comes out validates (jsonschema, re.fullmatch, membership), what cannot be
enforced is refused by name, and constrained requests leave plain ones untouched."""
from __future__ import annotations

import json
import re
import threading
import time

import jsonschema
import pytest

from conftest import assert_no_leak
from engine import LLM, SamplingParams, StructuredOutputsParams
from engine.structured_output.grammar import GrammarCompiler

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "kind": {"type": "string", "enum": ["cat", "dog", "bird"]},
        "address": {"type": "object", "additionalProperties": False,
                    "properties": {"city": {"type": "string", "maxLength": 12},
                                   "zip": {"type": "integer", "minimum": 0, "maximum": 99999}},
                    "required": ["city", "zip"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
        # only spelled right with escapes: a quote, a newline, a backslash
        "motto": {"type": "string", "enum": ['say "hi"', "line\nbreak\\end"]},
    },
    "required": ["name", "kind", "address", "tags", "motto"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Describe a pet as JSON with its name, kind, address, "
                                   "tags and motto."}]


def constrained(**spec) -> StructuredOutputsParams:
    return StructuredOutputsParams(**spec)


def test_json_schema_at_temperature_one_over_20_seeds(smol_llm):
    params = [SamplingParams(temperature=1.0, seed=seed, max_tokens=160,
                             structured_outputs=constrained(json=SCHEMA)) for seed in range(20)]
    outs = smol_llm.chat([ASK] * 20, params, use_tqdm=False)
    finished = [o.outputs[0] for o in outs if o.outputs[0].finish_reason == "stop"]
    assert len(finished) >= 18, [o.outputs[0].finish_reason for o in outs]
    for c in finished:
        jsonschema.validate(json.loads(c.text), SCHEMA)
        # compact: no whitespace between JSON tokens for a model to pad with (a raw newline
        # or tab can only be free whitespace: inside strings JSON escapes them)
        assert "\n" not in c.text and "\t" not in c.text and not c.text.startswith(" ")
    assert len({c.text for c in finished}) > 1  # really sampled
    assert_no_leak(smol_llm.engine)


def test_json_object_regex_and_choice(smol_llm):
    prompt = "Here is some data:"
    outs = smol_llm.generate([prompt] * 3, [
        SamplingParams(temperature=0.7, seed=1, max_tokens=60,
                       structured_outputs=constrained(json_object=True)),
        SamplingParams(temperature=0.7, seed=2, max_tokens=30,
                       structured_outputs=constrained(regex=r"[A-Z]{2}-\d{3}(-[a-z]{1,4})?")),
        SamplingParams(temperature=0.7, seed=3, max_tokens=10,
                       structured_outputs=constrained(choice=["red", "green", "blue"])),
    ], use_tqdm=False)
    obj, code, colour = (o.outputs[0] for o in outs)
    if obj.finish_reason == "stop":
        assert isinstance(json.loads(obj.text), dict)
    else:  # cut by max_tokens: still a prefix of JSON
        assert obj.text.startswith("{")
    assert code.finish_reason == "stop" and re.fullmatch(r"[A-Z]{2}-\d{3}(-[a-z]{1,4})?", code.text)
    assert colour.finish_reason == "stop" and colour.text in ("red", "green", "blue")
    # the same through vLLM's dict spelling, on a chat
    out = smol_llm.chat(ASK, SamplingParams(temperature=0, max_tokens=10, structured_outputs={
        "choice": ["yes", "no"]}), use_tqdm=False)[0].outputs[0]
    assert out.text in ("yes", "no")


@pytest.mark.parametrize("spec,needle", [
    ({"json": {"type": "array", "uniqueItems": True}}, "uniqueItems"),
    ({"json": {"not": {"type": "string"}}}, "not"),
    ({"regex": "(unclosed"}, "unclosed group"),
    ({"grammar": "start: missing_rule"}, "missing_rule"),
    ({"json": {"type": "string", "format": "no-such-format"}}, "no-such-format"),
])
def test_what_cannot_be_enforced_is_refused_by_name(smol_llm, spec, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        smol_llm.generate("x", SamplingParams(structured_outputs=spec), use_tqdm=False)
    assert_no_leak(smol_llm.engine)


def test_params_shape_errors():
    for bad in [{}, {"json": {}, "regex": "a"}, {"regex": ""}, {"choice": []},
                {"choice": [1]}, {"json": "{nope"}, {"json": 3}, {"jsonschema": {}}]:
        with pytest.raises(ValueError):
            SamplingParams(structured_outputs=bad)


def test_mixed_batch_plain_requests_are_unchanged_and_n3_is_valid(smol_llm):
    plain_prompts = ["The capital of France is", "Once upon a time"]
    plain = [SamplingParams(temperature=0, max_tokens=24),
             SamplingParams(temperature=0.9, seed=7, max_tokens=24)]
    alone = smol_llm.generate(plain_prompts, plain, use_tqdm=False)
    json_n3 = SamplingParams(temperature=1.0, seed=11, n=3, max_tokens=160,
                             structured_outputs=constrained(json=SCHEMA))
    rendered = smol_llm.render_chat(ASK)
    mixed = smol_llm.generate([plain_prompts[0], rendered, plain_prompts[1]],
                              [plain[0], json_n3, plain[1]], use_tqdm=False)
    assert [mixed[0].outputs[0].token_ids, mixed[2].outputs[0].token_ids] == \
           [alone[0].outputs[0].token_ids, alone[1].outputs[0].token_ids]
    assert [mixed[0].outputs[0].text, mixed[2].outputs[0].text] == \
           [alone[0].outputs[0].text, alone[1].outputs[0].text]
    samples = mixed[1].outputs
    assert len(samples) == 3 and len({c.text for c in samples}) > 1
    for c in samples:
        if c.finish_reason == "stop":
            jsonschema.validate(json.loads(c.text), SCHEMA)


def test_preemption_keeps_grammar_state(smol_llm):
    """A pool of 12 blocks (192 tokens) for 4 constrained sequences of ~150 tokens each:
    sequences are preempted and recomputed; every output still validates."""
    llm = LLM(dtype="float32", num_kv_blocks=12, block_size=16, max_num_seqs=4)
    params = [SamplingParams(temperature=1.0, seed=seed, max_tokens=120, min_tokens=0,
                             structured_outputs=constrained(json=SCHEMA)) for seed in range(4)]
    outs = llm.chat([ASK] * 4, params, use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0
    for o in outs:
        c = o.outputs[0]
        assert c.finish_reason in ("stop", "length")
        if c.finish_reason == "stop":
            jsonschema.validate(json.loads(c.text), SCHEMA)
    assert sum(o.outputs[0].finish_reason == "stop" for o in outs) >= 3
    assert_no_leak(llm.engine)


def test_a_slow_compile_does_not_hold_up_other_requests(smol_llm, monkeypatch):
    """A grammar that takes 2 s to compile: a plain request added after it gets its first
    token from the very next step, and the constrained one runs once its grammar is ready."""
    engine = smol_llm.engine
    build = GrammarCompiler._build
    release = threading.Event()

    def slow_build(self, spec):
        if spec.regex == "slow[0-9]+":
            release.wait(2.0)
        return build(self, spec)

    monkeypatch.setattr(GrammarCompiler, "_build", slow_build)
    engine.add_request("slow", "Count:", SamplingParams(
        temperature=0, max_tokens=8, structured_outputs=constrained(regex="slow[0-9]+")))
    engine.add_request("plain", "The capital of France is", SamplingParams(temperature=0,
                                                                           max_tokens=4))
    start = time.monotonic()
    first = engine.step()
    assert time.monotonic() - start < 1.0
    assert [o.request_id for o in first] == ["plain"] and first[0].outputs[0].token_ids
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        if "plain" in finished and not release.is_set():
            assert "slow" in engine.pending_grammars  # still compiling, nobody waited
            release.set()
    text = finished["slow"].outputs[0].text
    assert re.fullmatch("slow[0-9]+", text) or (finished["slow"].outputs[0].finish_reason
                                                 == "length" and text.startswith("slow"))
    assert_no_leak(engine)


def test_a_compile_past_its_limit_fails_only_that_request(smol_llm, monkeypatch):
    engine = smol_llm.engine
    monkeypatch.setattr(engine.config, "grammar_compile_timeout", 0.2)
    build = GrammarCompiler._build
    monkeypatch.setattr(GrammarCompiler, "_build",
                        lambda self, spec: (time.sleep(1.0), build(self, spec))[1])
    engine.add_request("late", "x", SamplingParams(
        max_tokens=4, structured_outputs=constrained(regex="late[a-z]")))
    engine.add_request("ok", "The capital of France is", SamplingParams(temperature=0,
                                                                        max_tokens=4))
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    assert done["late"].error and "grammar_compile_timeout" in done["late"].error
    assert done["ok"].outputs[0].finish_reason == "length"
    assert_no_leak(engine)
    time.sleep(1.0)  # let the slow compile finish before the patch is undone


def test_mask_allows_exactly_the_grammars_next_tokens(smol_llm):
    """The sampler's mask against a brute-force oracle: a token is allowed iff its text is
    a non-empty prefix of a choice; after a whole choice, only the end of sequence."""
    import torch

    from engine.model_executor.sampler import apply_grammar_masks

    engine = smol_llm.engine
    proto = engine.grammars.compile(constrained(choice=["yes", "no"]))
    tok = engine.tokenizer
    vocab = engine.model_config.vocab_size
    m = proto.deep_copy()
    logits = torch.zeros(2, vocab)
    apply_grammar_masks(logits, [m], [1])  # row 0 is unconstrained and stays so
    allowed = set(torch.isfinite(logits[1]).nonzero().flatten().tolist())
    expected = {t for t in range(len(tok)) if (s := tok.decode([t]))
                and any(c.startswith(s) for c in ("yes", "no"))}
    assert allowed == expected and torch.isfinite(logits[0]).all()
    assert m.consume_tokens(tok.encode("yes", add_special_tokens=False))
    logits = torch.zeros(1, vocab)
    apply_grammar_masks(logits, [m], [0])
    assert set(torch.isfinite(logits[0]).nonzero().flatten().tolist()) <= set(engine.eos_token_ids)
