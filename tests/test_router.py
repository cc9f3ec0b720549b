"""Replicas behind the prefix-aware router: the policy step by step (plain Python), then
`kvserve serve --data-parallel-size 2` for real: requests sharing a long system prompt stay
on one replica, unrelated ones spread, SSE streams pass through, a killed replica loses no
request that had not started and /health says the pool is degraded; stopping it leaves no
replica behind."""
from __future__ import annotations

import concurrent.futures as cf
import json
import os
import queue
import signal
import time

import httpx
import openai
import pytest
from live_server import start_server, stop_server
from procs import alive, children_of

from server.router.policy import AffinityPolicy, Replica, prefix_hashes

SYSTEM = ("You are a meticulous assistant for a hardware store. Answer in one short "
          "sentence, name the aisle, and never invent products. ") * 6


def test_prefix_hashes_chain_and_skip_the_partial_block():
    a = prefix_hashes("x" * 600 + "tail one", 256)
    b = prefix_hashes("x" * 600 + "other tail", 256)
    assert len(a) == 2 and a == b  # two full blocks; the partial third is left out
    c = prefix_hashes("y" + "x" * 599, 256)
    assert c[0] != a[0] and c[1] != a[1]  # chained: a different start changes every hash


def test_policy_sticks_to_the_prefix_spreads_the_rest_and_yields_to_load():
    policy = AffinityPolicy([Replica("a"), Replica("b")], max_imbalance=4)
    shared = [policy.choose(prefix_hashes(SYSTEM + f"question {i}")) for i in range(16)]
    assert len({r.url for r in shared}) == 1
    home = shared[0]
    assert home.prefix_hits == 15  # all but the first, which had nothing to match
    other = next(r for r in policy.replicas if r is not home)
    unrelated = [policy.choose(prefix_hashes(f"{i} unrelated " * 40)).url for i in range(16)]
    assert unrelated.count(other.url) >= 8  # the least-loaded (least-served) takes them
    home.queue = 20  # flooded: the next shared-prefix request goes where the queue is short
    assert policy.choose(prefix_hashes(SYSTEM + "one more")) is other
    home.queue = 0
    assert policy.choose(prefix_hashes(SYSTEM + "and again")) is home
    home.healthy = other.healthy = False
    assert policy.choose([]) is None


@pytest.fixture(scope="module")
def pool(smol_llm, tmp_path_factory):  # smol_llm: the GGUF conversion is cached first
    from server.cli import free_port

    grpc_port = free_port()
    proc, base, _, log = start_server(tmp_path_factory.mktemp("router"), "dp2",
                                      "--data-parallel-size", "2",
                                      "--kv-cache-memory-bytes", str(128 << 20),
                                      grpc_port=grpc_port)
    yield proc, base, f"127.0.0.1:{grpc_port}"
    stop_server(proc)
    log.close()


def stats(base: str) -> dict:
    return httpx.get(base + "/health", timeout=10).json()


def test_bad_input_through_the_router_costs_nothing(pool):
    """Hostile requests get the replica's (or the router's) 4xx in OpenAI's format, a client
    that hangs up mid-stream has its request aborted on the replica, and the pool stays
    whole and serving."""
    _, base, _ = pool
    post = base + "/v1/completions"
    cases = [
        (dict(content=b"{not json", headers={"content-type": "application/json"}), 400),
        (dict(content=b"[1, 2]", headers={"content-type": "application/json"}), 400),
        (dict(json={"prompt": "hi", "max_tokens": -1}), 400),
        (dict(json={"prompt": "hi", "max_tokens": 2, "temperature": "hot"}), 400),
        (dict(json={"prompt": "hi", "model": "no-such-model"}), 404),
        (dict(content=b"x" * (9 << 20)), 413),  # over the router's 8 MiB body limit
    ]
    for kwargs, status in cases:
        r = httpx.post(post, timeout=30, **kwargs)
        assert r.status_code == status, (kwargs.get("json"), r.status_code, r.text[:200])
        assert r.json()["error"]["message"], r.text[:200]
    assert httpx.get(post, timeout=10).status_code == 405
    assert httpx.get(base + "/v1/no/such/route", timeout=10).status_code == 404
    # a client that goes away mid-stream: its request is aborted on the replica
    with httpx.stream("POST", post, timeout=60, json={
            "prompt": "Count to a thousand:", "max_tokens": 1000, "ignore_eos": True,
            "stream": True}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i == 3:
                break
    deadline = time.monotonic() + 8  # the whole stream would take 15 s or more
    while any(x["queue"] for x in stats(base)["replicas"]):
        assert time.monotonic() < deadline, stats(base)
        time.sleep(0.3)
    assert stats(base)["status"] == "ok"
    r = httpx.post(post, timeout=60, json={"prompt": "hi", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_kserve_grpc_through_the_router(pool):
    """tritonclient's gRPC client against the router's port: unary and decoupled streaming
    answers equal the HTTP ones, requests with one prompt stay on one replica, the replica's
    status codes come back unchanged, the API's metadata passes through."""
    import numpy as np
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    _, base, target = pool
    model = "SmolLM2-135M-Instruct"
    prompt = SYSTEM + "Where are the screws?"
    want = httpx.post(base + "/v1/completions", timeout=60, json={
        "prompt": prompt, "max_tokens": 8, "temperature": 0,
        "ignore_eos": True}).json()["choices"][0]["text"]
    assert want

    def inputs(text: str, stream: bool = False, **params):
        t = grpcclient.InferInput("text_input", [1], "BYTES")
        t.set_data_from_numpy(np.array([text.encode()], dtype=np.object_))
        p = grpcclient.InferInput("sampling_parameters", [1], "BYTES")
        p.set_data_from_numpy(np.array([json.dumps({"temperature": 0, "max_tokens": 8,
                                                    "ignore_eos": True, **params}).encode()],
                                       dtype=np.object_))
        s = grpcclient.InferInput("stream", [1], "BOOL")
        s.set_data_from_numpy(np.array([stream]))
        return [t, p, s]

    g = grpcclient.InferenceServerClient(url=target)
    assert g.is_server_live() and g.is_model_ready(model)
    assert g.get_model_metadata(model).name == model
    before = {r["url"]: r["served"] for r in stats(base)["replicas"]}
    for _ in range(4):
        out = g.infer(model, inputs(prompt), headers={"x-user-id": "u1"})
        assert out.as_numpy("text_output")[0].decode() == prompt + want
    served = sorted(r["served"] - before[r["url"]] for r in stats(base)["replicas"])
    assert served == [0, 4], served  # the same prefix: the same replica
    got: queue.Queue = queue.Queue()
    g.start_stream(callback=lambda result, error: got.put((result, error)))
    g.async_stream_infer(model, inputs(prompt, stream=True), request_id="s1")
    g.stop_stream()  # returns once the stream is answered
    parts = []
    while not got.empty():
        result, error = got.get()
        assert error is None, error
        if result.get_response().outputs:
            parts.append(result.as_numpy("text_output")[0].decode())
    assert len(parts) > 1 and "".join(parts) == want  # token by token, through the proxy
    with pytest.raises(InferenceServerException) as e:
        g.infer("no-such-model", inputs("hi"))
    assert e.value.status() == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as e:
        g.infer(model, inputs("hi", top_k="x"))
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT" and "top_k" in e.value.message()
    g.close()
    # bytes that are no protobuf, an unknown method: the replica's (or gRPC's) error comes
    # back, and the proxy serves on
    import grpc

    with grpc.insecure_channel(target) as channel:
        with pytest.raises(grpc.RpcError) as e:
            channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")(b"\xff" * 64,
                                                                              timeout=30)
        # the replica's answer, passed back unchanged
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value
        assert "not a valid inference.ModelInferRequest" in e.value.details()
        for method in ("/inference.GRPCInferenceService/NoSuchCall", "/other.Service/Infer"):
            with pytest.raises(grpc.RpcError) as e:
                channel.unary_unary(method)(b"", timeout=30)
            assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED, e.value
    g = grpcclient.InferenceServerClient(url=target)
    assert g.infer(model, inputs(prompt)).as_numpy("text_output")[0].decode() == prompt + want
    g.close()


def test_routing_through_two_replicas(pool):
    proc, base, _ = pool
    replicas = children_of(proc.pid, b"serve")
    assert len(replicas) == 2
    client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)

    def ask(i: int, system: str = SYSTEM) -> str:
        return client.chat.completions.create(
            model="SmolLM2-135M-Instruct", max_tokens=4, temperature=0,
            messages=[{"role": "system", "content": system},
                      {"role": "user", "content": f"Where are the nails, size {i}?"}]
        ).choices[0].message.content

    before = {r["url"]: r["served"] for r in stats(base)["replicas"]}
    ask(0)  # the first one: nothing to match anywhere yet
    with cf.ThreadPoolExecutor(4) as ex:
        list(ex.map(ask, range(1, 16)))
    after = stats(base)["replicas"]
    served = sorted(r["served"] - before[r["url"]] for r in after)
    assert served[1] >= 15, after  # >= 15 of the 16 on one replica
    assert sum(r["prefix_hits"] for r in after) >= 15
    # unrelated prompts spread over both
    before = {r["url"]: r["served"] for r in stats(base)["replicas"]}
    with cf.ThreadPoolExecutor(4) as ex:
        list(ex.map(lambda i: ask(i, f"You are assistant number {i}. " * 20), range(8)))
    spread = [r["served"] - before[r["url"]] for r in stats(base)["replicas"]]
    assert min(spread) >= 2, spread
    # SSE passes through the router unbuffered and whole
    kw = dict(model="SmolLM2-135M-Instruct", prompt="The capital of France is", max_tokens=8,
              temperature=0)
    full = client.completions.create(**kw).choices[0].text
    assert "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw)) \
        == full

    # a replica dies: the requests that had not started there go to the other one
    os.kill(replicas[0], signal.SIGKILL)
    with cf.ThreadPoolExecutor(4) as ex:
        texts = list(ex.map(lambda i: client.completions.create(**kw).choices[0].text,
                            range(8)))
    assert texts == [full] * 8
    deadline = time.monotonic() + 10
    while stats(base)["status"] != "degraded":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    r = httpx.get(base + "/health", timeout=10)
    assert r.status_code == 200 and [x["healthy"] for x in r.json()["replicas"]].count(True) == 1

    stop_server(proc)  # the router takes its replicas with it
    deadline = time.monotonic() + 30
    while any(alive(p) for p in replicas) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(alive(p) for p in replicas)
