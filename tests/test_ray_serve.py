"""kvserve as a Ray Serve application (server/ray_serve.py) on a local Ray cluster, for real:
two SmolLM2 replicas behind Serve's HTTP proxy, driven with the openai client. Greedy text
equals one in-process engine, streams equal non-streamed answers, requests that share a
long system prompt stay on one replica while unrelated ones spread (the prefix-affinity
request router), bad input gets the server's own 4xx and costs nothing else, and shutting
Serve and Ray down leaves no process behind."""
from __future__ import annotations

import os
import time

import httpx
import openai
import pytest
from procs import alive, descendants_of

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")

PROMPTS = ["The capital of France is", "Water boils at"]
SYSTEM = "You are a careful assistant for a shipping company. " * 24  # ~1.2k chars: 4 blocks


@pytest.fixture(scope="module")
def serve_url():
    from ray import serve

    from server.cli import free_port
    from server.ray_serve import build_app

    before = set(descendants_of(os.getpid()))
    port = free_port()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"dtype": "float32", "num_replicas": "2", "max_model_len": "1024",
                             "max_num_seqs": "8", "kv_cache_memory_bytes": str(64 << 20),
                             "served_model_name": "smol", "max_body_bytes": "65536"}),
                  name="kvserve", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        spawned = [p for p in descendants_of(os.getpid()) if p not in before]
        serve.shutdown()
        ray.shutdown()
        deadline = time.monotonic() + 30
        while any(alive(p) for p in spawned) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert spawned and not [p for p in spawned if alive(p)]


def test_serve_app_answers_like_the_engine(serve_url, smol_llm):
    from engine import SamplingParams

    want = [o.outputs[0].text for o in smol_llm.generate(
        PROMPTS, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)]
    client = openai.OpenAI(base_url=serve_url + "/v1", api_key="x", max_retries=0)
    got = [client.completions.create(model="smol", prompt=p, max_tokens=8,
                                     temperature=0).choices[0].text for p in PROMPTS]
    assert got == want
    messages = [{"role": "user", "content": "Name a color."}]
    whole = client.chat.completions.create(model="smol", messages=messages, max_tokens=12,
                                           temperature=0).choices[0].message.content
    parts = client.chat.completions.create(model="smol", messages=messages, max_tokens=12,
                                           temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in parts if c.choices) == whole
    assert httpx.get(serve_url + "/v1/models", timeout=30).json()["data"][0]["id"] == "smol"


def test_prefix_affinity_and_spread(serve_url):
    def served_by(prompt: str) -> str:
        r = httpx.post(serve_url + "/v1/completions", timeout=60, json={
            "model": "smol", "prompt": prompt, "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200, r.text
        return r.headers["x-kvserve-replica"]

    # no shared prefix: the less-used replica takes each (the counts start a few apart)
    unrelated = [served_by(f"{i} unrelated words " * 20) for i in range(16)]
    assert len(set(unrelated)) == 2, unrelated
    shared = {served_by(SYSTEM + f"Question {i}: where is parcel {i}?") for i in range(8)}
    assert len(shared) == 1, shared


def test_bad_input_gets_a_4xx_and_costs_nothing(serve_url):
    r = httpx.post(serve_url + "/v1/completions", content=b"{not json", timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"]
    r = httpx.post(serve_url + "/v1/completions", timeout=30,
                   json={"model": "smol", "prompt": "x" * 100_000, "max_tokens": 2})
    assert r.status_code == 413 and "error" in r.json()
    r = httpx.post(serve_url + "/v1/completions", timeout=30,
                   json={"model": "smol", "prompt": "hi", "max_tokens": -3})
    assert r.status_code == 400 and r.json()["error"]["message"]
    r = httpx.post(serve_url + "/v1/completions", timeout=60,
                   json={"model": "smol", "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_a_client_that_goes_away_aborts_its_request(serve_url):
    """Closing an SSE stream mid-way cancels it through Serve's handle down to the replica's
    app, which aborts the request: its replica is idle long before the stream could end."""
    with httpx.stream("POST", serve_url + "/v1/completions", timeout=60, json={
            "model": "smol", "prompt": "Count to a thousand:", "max_tokens": 900,
            "ignore_eos": True, "stream": True}) as r:
        replica = r.headers["x-kvserve-replica"]
        for i, _ in enumerate(r.iter_lines()):
            if i == 3:
                break
    deadline = time.monotonic() + 8  # the whole stream would take 15 s or more
    while True:
        m = httpx.get(serve_url + "/metrics", timeout=10)
        if m.headers["x-kvserve-replica"] == replica:
            running = [line for line in m.text.splitlines()
                       if line.startswith("kvserve_num_requests_running ")]
            if float(running[0].split()[1]) == 0:
                break
        assert time.monotonic() < deadline, "the abandoned request is still running"
        time.sleep(0.2)


def test_build_app_settings_are_checked_before_anything_starts():
    """`serve run server.ray_serve:build_app key=value ...` hands strings: typed by
    `kvserve serve`'s own parser; an unknown key or a bad value is refused by name."""
    from server.ray_serve import _split_args, build_app

    opts, argv = _split_args({"model": "/m", "max-num-seqs": "8", "num_replicas": "3",
                              "trust_request_chat_template": "true",
                              "exit_on_engine_death": "false"})
    assert opts == {"num_replicas": 3}
    assert argv == ["--model", "/m", "--max-num-seqs", "8", "--trust-request-chat-template",
                    "--no-exit-on-engine-death"]
    with pytest.raises(ValueError, match="bogus"):
        build_app({"bogus": "1"})
    with pytest.raises(ValueError, match="max-num-seqs"):
        build_app({"max_num_seqs": "many"})
    with pytest.raises(ValueError, match="data_parallel_size"):
        build_app({"data_parallel_size": "2"})
