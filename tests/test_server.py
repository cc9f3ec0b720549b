"""A live `kvserve serve` on 127.0.0.1 (started here), driven by the official openai client
and raw HTTP. Greedy answers must equal the engine's own output for the same request."""
from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time

from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from engine import SamplingParams

KEY = "sk-test-key"
MODEL = "SmolLM2-135M-Instruct"
HELLO = [{"role": "user", "content": "What is the capital of France?"}]
EMOJI = [{"role": "user", "content": "Reply with three emoji that describe happiness."}]
CJK = [{"role": "user", "content": "Write the word 'hello' in Japanese characters."}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(smol_llm):  # smol_llm: the GGUF conversion is cached before the server starts
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--api-key", KEY,
         "--log-level", "warning", "--max-num-seqs", "64", "--dtype", "float32", "--grpc-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited: {proc.stdout.read()}")
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("server did not become healthy")
    yield base
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)


def engine_chat(llm, messages, **kw):
    params = SamplingParams(temperature=0.0, **kw)
    return llm.chat(messages, params, use_tqdm=False)[0].outputs


def metric(base: str, name: str) -> float:
    for line in httpx.get(base + "/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"metric {name} missing")


def test_chat_matches_engine(client, smol_llm):
    resp = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, max_tokens=32)
    expected = engine_chat(smol_llm, HELLO, max_tokens=32)[0]
    assert resp.choices[0].message.content == expected.text
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage.completion_tokens == len(expected.token_ids)
    assert resp.object == "chat.completion" and resp.model == MODEL
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is the capital "},
                                          {"type": "text", "text": "of France?"}]}]
    by_parts = client.chat.completions.create(model=MODEL, messages=parts, temperature=0, max_tokens=32)
    assert by_parts.choices[0].message.content == expected.text


def test_completions_match_engine(client, smol_llm):
    prompts = ["The capital of France is", "1, 2, 3, 4,"]
    resp = client.completions.create(model=MODEL, prompt=prompts, temperature=0, max_tokens=12)
    expected = smol_llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=12), use_tqdm=False)
    assert [c.text for c in sorted(resp.choices, key=lambda c: c.index)] == \
           [e.outputs[0].text for e in expected]
    echo = client.completions.create(model=MODEL, prompt=prompts[0], temperature=0, max_tokens=4, echo=True)
    assert echo.choices[0].text.startswith(prompts[0])
    ids = smol_llm.tokenizer.encode(prompts[0])
    by_ids = client.completions.create(model=MODEL, prompt=ids, temperature=0, max_tokens=12)
    assert by_ids.choices[0].text == expected[0].outputs[0].text


@pytest.mark.parametrize("messages", [HELLO, EMOJI, CJK], ids=["ascii", "emoji", "cjk"])
def test_stream_equals_non_stream(client, messages):
    full = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=40)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                                 max_tokens=40, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    if messages is not HELLO:  # the test really did stream multi-byte characters
        assert any(ord(ch) > 0x2000 for ch in full.choices[0].message.content)


def test_completion_stream_equals_non_stream(client):
    kw = dict(model=MODEL, prompt="Once upon a time", temperature=0, max_tokens=24)
    full = client.completions.create(**kw)
    text = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices)
    assert text == full.choices[0].text


def test_n_seed_stop(client, smol_llm):
    kw = dict(model=MODEL, messages=HELLO, temperature=1.0, max_tokens=16, n=2, seed=11)
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    stopped = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, stop=["France"])
    expected = engine_chat(smol_llm, HELLO, stop=["France"], max_tokens=None)[0]
    assert stopped.choices[0].message.content == expected.text and "France" not in expected.text
    assert stopped.choices[0].finish_reason == "stop"


def test_logprobs_shapes(client, smol_llm):
    resp = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, max_tokens=6,
                                          logprobs=True, top_logprobs=3)
    content = resp.choices[0].logprobs.content
    expected = engine_chat(smol_llm, HELLO, max_tokens=6, logprobs=3)[0]
    assert len(content) == len(expected.token_ids)
    for item, tid, entry in zip(content, expected.token_ids, expected.logprobs):
        assert item.logprob == pytest.approx(entry[tid].logprob, abs=1e-5)
        assert len(item.top_logprobs) == 3 and item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob
        assert bytes(item.bytes).decode("utf-8", "replace") == item.token or "\ufffd" in item.token
    assert "".join(bytes(b for i in content for b in i.bytes).decode()) == resp.choices[0].message.content
    comp = client.completions.create(model=MODEL, prompt="The sky is", temperature=0, max_tokens=5, logprobs=2)
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert "".join(lp.tokens) == comp.choices[0].text and all(len(t) == 2 for t in lp.top_logprobs)
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])


def test_include_usage_only_when_asked(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 4, "stream": True, "temperature": 0}

    def events(extra):
        with httpx.stream("POST", server + "/v1/completions", json={**body, **extra},
                          headers=headers, timeout=60) as r:
            data = [line[5:].strip() for line in r.iter_lines() if line.startswith("data:")]
        assert data[-1] == "[DONE]"
        return [json.loads(d) for d in data[:-1]]

    plain = events({})
    assert all("usage" not in e for e in plain)
    asked = events({"stream_options": {"include_usage": True}})
    assert all(e["usage"] is None for e in asked[:-1])
    assert asked[-1]["choices"] == [] and asked[-1]["usage"]["completion_tokens"] == 4


def test_async_client_concurrent(server, smol_llm):
    async def main():
        ac = openai.AsyncOpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)
        qs = ["Name a color.", "Name a fruit.", "Name a planet."]
        tasks = [ac.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": q}],
                                            temperature=0, max_tokens=20) for q in qs]
        stream = await ac.chat.completions.create(model=MODEL, messages=HELLO, temperature=0,
                                                  max_tokens=20, stream=True)
        streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        results = await asyncio.gather(*tasks)
        await ac.close()
        return qs, results, streamed

    qs, results, streamed = asyncio.run(main())
    for q, r in zip(qs, results):
        assert r.choices[0].message.content == engine_chat(
            smol_llm, [{"role": "user", "content": q}], max_tokens=20)[0].text
    assert streamed == engine_chat(smol_llm, HELLO, max_tokens=20)[0].text


def test_fifty_streams_a_third_disconnect(server, smol_llm):
    prompts = [f"Count from {i} to {i + 20}:" for i in range(5)]
    expected = {p: o.outputs[0].text for p, o in zip(prompts, smol_llm.generate(
        prompts, SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False))}
    headers = {"Authorization": f"Bearer {KEY}"}

    async def one(ac, i):
        prompt = prompts[i % len(prompts)]
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 24, "temperature": 0, "stream": True}
        text, n = "", 0
        async with ac.stream("POST", server + "/v1/completions", json=body, headers=headers) as r:
            async for line in r.aiter_lines():
                if not line.startswith("data:") or line.endswith("[DONE]"):
                    continue
                text += json.loads(line[5:])["choices"][0]["text"]
                n += 1
                if i % 3 == 0 and n == 2:
                    return None  # hang up mid-stream
        return prompt, text

    async def main():
        async with httpx.AsyncClient(timeout=300) as ac:
            return await asyncio.gather(*(one(ac, i) for i in range(50)))

    results = asyncio.run(main())
    finished = [r for r in results if r is not None]
    assert len(finished) == 33
    for prompt, text in finished:
        assert text == expected[prompt]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (metric(server, "kvserve_num_requests_running")
                                           or metric(server, "kvserve_kv_cache_blocks_in_use")):
        time.sleep(0.2)
    assert metric(server, "kvserve_num_requests_running") == 0
    assert metric(server, "kvserve_kv_cache_blocks_in_use") == 0
    assert metric(server, "kvserve_num_requests_waiting") == 0


@pytest.mark.parametrize("kind, status, param", [
    ("malformed", 400, None), ("wrong_type", 400, "temperature"), ("negative_max", 400, "max_tokens"),
    ("unknown_model", 404, "model"), ("huge_prompt", 400, "prompt"), ("no_key", 401, None),
    ("bad_key", 401, None), ("oversized", 413, None), ("bad_messages", 400, "messages"),
    ("top_p", 400, "top_p"), ("n_zero", 400, "n"),
])
def test_errors_have_openai_shape(server, client, kind, status, param):
    url = server + "/v1/completions"
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 4}
    content = None
    if kind == "malformed":
        content = b'{"model": "x", "prompt": '
    elif kind == "wrong_type":
        body["temperature"] = "hot"
    elif kind == "negative_max":
        body["max_tokens"] = -5
    elif kind == "unknown_model":
        body["model"] = "gpt-17"
    elif kind == "huge_prompt":
        body["prompt"] = "hello " * 9000
    elif kind == "no_key":
        headers.pop("Authorization")
    elif kind == "bad_key":
        headers["Authorization"] = "Bearer sk-wrong"
    elif kind == "oversized":
        body["prompt"] = "x" * (9 << 20)
    elif kind == "bad_messages":
        url, body = server + "/v1/chat/completions", {"model": MODEL, "messages": "hi"}
    elif kind == "top_p":
        body["top_p"] = 1.5
    elif kind == "n_zero":
        body["n"] = 0
    r = httpx.post(url, content=content or json.dumps(body).encode(), headers=headers, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param
    # a normal request right after still succeeds
    ok = client.completions.create(model=MODEL, prompt="Hello", max_tokens=3, temperature=0)
    assert ok.choices[0].text


def test_misc_endpoints_and_triton(server, smol_llm):
    assert httpx.get(server + "/health").status_code == 200
    assert httpx.get(server + "/version").json()["version"]
    assert httpx.get(server + "/v1/models").status_code == 401
    models = httpx.get(server + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert models["data"][0]["id"] == MODEL
    text = httpx.get(server + "/metrics").text
    for name in ("kvserve_time_to_first_token_seconds_bucket", "kvserve_inter_token_latency_seconds",
                 "kvserve_e2e_request_latency_seconds", "kvserve_request_queue_time_seconds",
                 "kvserve_kv_cache_usage_perc", "kvserve_prefix_cache_hit_rate",
                 "kvserve_num_preemptions_total", "kvserve_prompt_tokens_total",
                 "kvserve_generation_tokens_total"):
        assert name in text
    h = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(server + "/v2/health/ready").status_code == 200
    assert httpx.get(f"{server}/v2/models/{MODEL}", headers=h).json()["name"] == MODEL
    body = {"text_input": "The capital of France is", "max_tokens": 8, "temperature": 0}
    out = httpx.post(f"{server}/v2/models/{MODEL}/generate", json=body, headers=h, timeout=60).json()
    expected = smol_llm.generate("The capital of France is", SamplingParams(temperature=0.0, max_tokens=8),
                                 use_tqdm=False)[0].outputs[0].text
    assert out["text_output"] == expected
    with httpx.stream("POST", f"{server}/v2/models/{MODEL}/generate_stream", json=body, headers=h,
                      timeout=60) as r:
        pieces = [json.loads(line[5:])["text_output"] for line in r.iter_lines() if line.startswith("data:")]
    assert "".join(pieces) == expected
    assert httpx.post(f"{server}/v2/models/nope/generate", json=body, headers=h).status_code == 404


# ---- structured outputs through the OpenAI API -----------------------------------------
ASK_PET = [{"role": "user", "content": "Describe a pet as JSON."}]
PET = {"type": "object", "additionalProperties": False, "required": ["name", "kind", "age"],
       "properties": {"name": {"type": "string", "maxLength": 12},
                      "kind": {"type": "string", "enum": ["cat", "dog"]},
                      "age": {"type": "integer", "minimum": 0, "maximum": 30}}}


class Pet(BaseModel):
    name: str = Field(max_length=12)
    kind: Literal["cat", "dog"]
    age: int


def test_response_format_on_chat_and_completions(client):
    r = client.chat.completions.create(
        model=MODEL, messages=ASK_PET, temperature=1.0, seed=5, max_tokens=80,
        response_format={"type": "json_schema", "json_schema": {"name": "pet", "schema": PET}})
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), PET)
    r = client.completions.create(model=MODEL, prompt="A pet, as JSON:", max_tokens=80,
                                  temperature=0, extra_body={"response_format": {
                                      "type": "json_schema", "json_schema": {"schema": PET}}})
    jsonschema.validate(json.loads(r.choices[0].text), PET)
    r = client.chat.completions.create(model=MODEL, messages=ASK_PET, temperature=0, max_tokens=60,
                                       response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    r = client.completions.create(model=MODEL, prompt="Code:", max_tokens=20, temperature=0.8,
                                  seed=2, extra_body={"structured_outputs": {"regex": r"[a-f]{4}-\d\d"}})
    assert re.fullmatch(r"[a-f]{4}-\d\d", r.choices[0].text)
    r = client.chat.completions.create(model=MODEL, messages=ASK_PET, max_tokens=5, temperature=0,
                                       extra_body={"structured_outputs": {"choice": ["cat", "dog"]}})
    assert r.choices[0].message.content in ("cat", "dog")


def test_streamed_constrained_output_reassembles(client):
    kw = dict(model=MODEL, messages=ASK_PET, temperature=0, max_tokens=80,
              response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PET}})
    full = client.chat.completions.create(**kw).choices[0].message.content
    chunks = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        stream=True, **kw) if c.choices]
    assert "".join(chunks) == full
    jsonschema.validate(json.loads(full), PET)


def test_openai_parse_with_a_pydantic_model(client):
    r = client.chat.completions.parse(model=MODEL, messages=ASK_PET, response_format=Pet,
                                      temperature=0, max_tokens=80)
    assert isinstance(r.choices[0].message.parsed, Pet)
    with pytest.raises(openai.LengthFinishReasonError):
        client.chat.completions.parse(model=MODEL, messages=ASK_PET, response_format=Pet,
                                      temperature=0, max_tokens=3)


@pytest.mark.parametrize("extra,needle", [
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "array", "uniqueItems": True}}}}, "uniqueItems"),
    ({"structured_outputs": {"regex": "(unclosed"}}, "unclosed group"),
    ({"structured_outputs": {"grammar": "start: nowhere"}}, "nowhere"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"structured_outputs": {"json_object": True, "regex": "a"}}, "exactly one"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
     "not several"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}}}}],
      "tool_choice": "required"}, "uniqueItems"),
])
def test_unenforceable_constraints_are_400(server, extra, needle):
    body = {"model": MODEL, "messages": ASK_PET, "max_tokens": 4, **extra}
    r = httpx.post(server + "/v1/chat/completions", json=body, timeout=60,
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"]
    ok = httpx.post(server + "/v1/completions", timeout=60, headers={"Authorization": f"Bearer {KEY}"},
                    json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
    assert ok.status_code == 200


# ---- logit_bias, best_of, continuous usage, /tokenize and /detokenize ---------------------
def test_logit_bias_bans_and_forces(client, smol_llm):
    prompt = "The capital of France is"
    greedy = smol_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=1),
                               use_tqdm=False)[0].outputs[0].token_ids[0]
    banned = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0,
                                       logprobs=1, logit_bias={str(greedy): -100})
    assert banned.choices[0].logprobs.tokens[0] != smol_llm.tokenizer.decode([greedy])
    forced = smol_llm.tokenizer.encode(" banana", add_special_tokens=False)[0]
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=1.0,
                                  seed=1, logit_bias={str(forced): 100})
    assert r.choices[0].text == smol_llm.tokenizer.decode([forced]) * 3
    engine = smol_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=3,
                                                      logit_bias={forced: 100}), use_tqdm=False)
    assert engine[0].outputs[0].token_ids == [forced] * 3
    for bad in ({"x": 1}, {"5": 101}, {"99999999": 1}, {"5": "high"}):
        r = httpx.post(server_url(client) + "/completions", timeout=30, headers=auth(),
                       json={"model": MODEL, "prompt": prompt, "max_tokens": 1, "logit_bias": bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias", (bad, r.text)


def server_url(client) -> str:
    return str(client.base_url).rstrip("/")


def auth() -> dict:
    return {"Authorization": f"Bearer {KEY}"}


def test_best_of_and_continuous_usage_stats(client):
    ok = client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, best_of=1)
    assert ok.choices[0].text is not None
    with pytest.raises(openai.BadRequestError, match="best_of"):
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, best_of=2)
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}))
    usages = [c.usage for c in chunks]
    assert all(u is not None for u in usages)
    counts = [u.completion_tokens for u in usages]
    assert counts == sorted(counts) and counts[-1] == 6 and usages[-1].prompt_tokens > 0


def test_tokenize_and_detokenize(server, smol_llm):
    tok = smol_llm.tokenizer
    r = httpx.post(server + "/tokenize", headers=auth(), timeout=30,
                   json={"model": MODEL, "prompt": "Hello world"})
    assert r.json() == {"count": len(tok.encode("Hello world")), "tokens": tok.encode("Hello world"),
                        "max_model_len": smol_llm.engine.max_model_len}
    r = httpx.post(server + "/tokenize", headers=auth(), timeout=30,
                   json={"model": MODEL, "messages": HELLO})
    assert r.json()["tokens"] == smol_llm.render_chat(HELLO)["prompt_token_ids"]
    r = httpx.post(server + "/detokenize", headers=auth(), timeout=30,
                   json={"model": MODEL, "tokens": tok.encode("Hello world")})
    assert r.json() == {"prompt": "Hello world"}
    assert httpx.post(server + "/detokenize", headers=auth(), timeout=30,
                      json={"tokens": [10 ** 9]}).status_code == 400
    assert httpx.post(server + "/tokenize", timeout=30, json={"prompt": "x"}).status_code == 401
    assert httpx.post(server + "/tokenize", headers=auth(), timeout=30,
                      json={"model": "nope", "prompt": "x"}).status_code == 404


def test_echo_logprobs_and_prompt_logprobs(client, smol_llm):
    prompt = "The capital of France is"
    ref = smol_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=3, logprobs=2,
                                                   prompt_logprobs=2), use_tqdm=False)[0]
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0,
                                  echo=True, logprobs=2, extra_body={"prompt_logprobs": 1})
    choice = r.choices[0]
    ids = ref.prompt_token_ids
    lp = choice.logprobs
    assert choice.text == prompt + ref.outputs[0].text
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert len(lp.tokens) == len(ids) + 3
    for k in range(1, len(ids)):  # the echoed prompt's tokens: the engine's prompt logprobs
        assert lp.token_logprobs[k] == pytest.approx(ref.prompt_logprobs[k][ids[k]].logprob, abs=1e-5)
    gen = ref.outputs[0]
    assert lp.token_logprobs[len(ids):] == pytest.approx(
        [e[t].logprob for t, e in zip(gen.token_ids, gen.logprobs)], abs=1e-5)
    assert "".join(lp.tokens[len(ids):]) == gen.text
    vllm_style = choice.model_extra["prompt_logprobs"]
    assert vllm_style[0] is None and len(vllm_style) == len(ids)
    assert vllm_style[1][str(ids[1])]["logprob"] == pytest.approx(
        ref.prompt_logprobs[1][ids[1]].logprob, abs=1e-5)
    r = httpx.post(server_url(client) + "/completions", headers=auth(), timeout=30,
                   json={"model": MODEL, "prompt": prompt, "max_tokens": 1, "prompt_logprobs": 21})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs"


def test_prompt_logprobs_stream_once_like_the_full_response(client):
    def same(got, want):
        assert got[0] is None and want[0] is None and len(got) == len(want)
        for g, w in zip(got[1:], want[1:]):
            assert g.keys() == w.keys()
            for k in g:
                assert g[k]["logprob"] == pytest.approx(w[k]["logprob"], abs=1e-5)

    kw = dict(model=MODEL, max_tokens=3, temperature=0, extra_body={"prompt_logprobs": 2})
    prompt = "The capital of France is"
    full = client.completions.create(prompt=prompt, **kw).choices[0].model_extra["prompt_logprobs"]
    chunks = list(client.completions.create(prompt=prompt, stream=True, **kw))
    carrying = [c.choices[0].model_extra["prompt_logprobs"] for c in chunks
                if c.choices and "prompt_logprobs" in c.choices[0].model_extra]
    assert len(carrying) == 1 and "prompt_logprobs" in chunks[0].choices[0].model_extra
    same(carrying[0], full)
    messages = [{"role": "user", "content": "Name a colour."}]
    full = client.chat.completions.create(messages=messages, **kw).model_extra["prompt_logprobs"]
    chunks = list(client.chat.completions.create(messages=messages, stream=True, **kw))
    carrying = [c.model_extra["prompt_logprobs"] for c in chunks
                if "prompt_logprobs" in c.model_extra]
    assert len(carrying) == 1 and "prompt_logprobs" not in chunks[0].model_extra  # role first
    same(carrying[0], full)
    plain = list(client.chat.completions.create(messages=messages, stream=True, model=MODEL,
                                                max_tokens=3, temperature=0))
    assert not any("prompt_logprobs" in c.model_extra for c in plain)


# ---- tool calling through the OpenAI API --------------------------------------------------
CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
        "required": ["city"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": CITY,
                                          "description": "Current weather in a city"}},
         {"type": "function", "function": {"name": "get_time", "parameters": CITY,
                                          "description": "Local time in a city"}}]
ASK_TOOLS = [{"role": "user", "content": "What are the weather and the time in Paris and Rome?"}]


def called(message) -> list[tuple[str, dict]]:
    """(name, arguments) of each call, its arguments checked against the function's schema."""
    out = []
    for call in message.tool_calls or []:
        assert call.type == "function" and call.id.startswith("call_")
        args = json.loads(call.function.arguments)
        jsonschema.validate(args, CITY)
        out.append((call.function.name, args))
    return out


def test_tool_choice_required_named_single_and_none(client):
    kw = dict(model=MODEL, messages=ASK_TOOLS, tools=TOOLS, temperature=0, max_tokens=80)
    r = client.chat.completions.create(tool_choice="required", **kw)
    assert r.choices[0].finish_reason == "tool_calls"
    assert len(called(r.choices[0].message)) >= 1 and r.choices[0].message.content is None
    one = client.chat.completions.create(tool_choice="required", parallel_tool_calls=False, **kw)
    assert len(called(one.choices[0].message)) == 1
    named = client.chat.completions.create(
        tool_choice={"type": "function", "function": {"name": "get_time"}}, **kw)
    assert [name for name, _ in called(named.choices[0].message)] == ["get_time"]
    assert named.choices[0].finish_reason == "tool_calls"
    none = client.chat.completions.create(tool_choice="none", **kw)
    assert none.choices[0].message.tool_calls is None and none.choices[0].message.content
    # "none" leaves the tools out of the prompt: fewer prompt tokens than "auto"
    auto = client.chat.completions.create(tool_choice="auto", **{**kw, "max_tokens": 1})
    assert none.usage.prompt_tokens < auto.usage.prompt_tokens


def test_streamed_tool_calls_reassemble_to_the_full_response(client):
    kw = dict(model=MODEL, messages=ASK_TOOLS, tools=TOOLS, tool_choice="required",
              temperature=0, max_tokens=80)
    full = client.chat.completions.create(**kw).choices[0]
    chunks = list(client.chat.completions.create(stream=True,
                                                 stream_options={"include_usage": True}, **kw))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    calls: dict[int, dict] = {}
    reasons = []
    for chunk in chunks:
        for choice in chunk.choices:
            reasons.append(choice.finish_reason)
            assert not choice.delta.content
            for d in choice.delta.tool_calls or []:
                if d.index not in calls:  # id, type and name come first
                    assert d.id and d.type == "function" and d.function.name
                    calls[d.index] = {"name": d.function.name, "arguments": ""}
                else:
                    assert d.id is None and d.function.name is None
                calls[d.index]["arguments"] += d.function.arguments or ""
    assert [r for r in reasons if r] == ["tool_calls"]
    want = [{"name": c.function.name, "arguments": c.function.arguments}
            for c in full.message.tool_calls]
    assert [calls[i] for i in sorted(calls)] == want


def test_cut_off_tool_call_finishes_with_length(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK_TOOLS, tools=TOOLS,
                                       tool_choice="required", temperature=0, max_tokens=12)
    assert r.choices[0].finish_reason == "length"


def test_a_tool_result_turn_is_answered(client):
    history = ASK_TOOLS[:1] + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C and sunny"}]
    r = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS,
                                       tool_choice="none", temperature=0, max_tokens=30)
    assert r.choices[0].message.content and r.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError, match="tool_choice"):
        client.chat.completions.create(model=MODEL, messages=ASK_TOOLS, tools=TOOLS,
                                       tool_choice={"type": "function",
                                                    "function": {"name": "nope"}})
