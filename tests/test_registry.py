"""The model registry: stable weighted routing, the TOML, and a live in-process server
(starlette TestClient) holding tiny random models: two base models side by side and an
adapter version, exact against transformers / PEFT; a version swap under client load with
no failed request; bad loads and bad traffic that change nothing; scale to zero; the admin
key. The real SmolLM2 through `kvserve serve --config` is in test_registry_live.py."""
from __future__ import annotations

import copy
import gc
import json
import subprocess
import sys
import threading
import time
import weakref

import pytest
import torch
from starlette.testclient import TestClient

from conftest import hf_greedy
from server.registry.config import parse_registry
from server.registry.routing import check_weights, pick, route_point

ADMIN, USER = "adm-key", "usr-key"
PROMPT = [5, 17, 33, 2, 250, 11, 9]
NEW = 10
TINY_ENGINE = {"skip_tokenizer_init": True, "dtype": "float32", "num_kv_blocks": 64,
               "max_num_seqs": 4, "max_model_len": 256}


# ---- routing: plain Python ----------------------------------------------------------------
def share(weights, keys) -> dict[str, float]:
    counts: dict[str, int] = {}
    for k in keys:
        v = pick(weights, route_point(k))
        counts[v] = counts.get(v, 0) + 1
    return {v: c / len(keys) for v, c in counts.items()}


KEYS = [f"user-{i}" for i in range(20_000)]


def test_split_99_1_over_20000_keys():
    got = share(check_weights({"1": 99, "2": 1}), KEYS)
    assert 0.0079 <= got["2"] <= 0.0121, got
    assert got["1"] + got["2"] == 1.0


def test_ramping_the_canary_keeps_its_users():
    on_v2 = {k for k in KEYS if pick({"1": 99.0, "2": 1.0}, route_point(k)) == "2"}
    for pct in (5, 10, 50, 100):
        now = {k for k in KEYS if pick({"1": 100.0 - pct, "2": float(pct)}, route_point(k)) == "2"}
        assert on_v2 <= now, pct
        assert abs(len(now) / len(KEYS) - pct / 100) < 0.02
        on_v2 = now
    # three versions: the newest takes the low end, the middle one the next slice
    three = share({"1": 80.0, "2": 15.0, "3": 5.0}, KEYS)
    assert abs(three["3"] - 0.05) < 0.01 and abs(three["2"] - 0.15) < 0.015


def test_points_are_the_same_in_another_process():
    """Not Python's salted hash: a restart (another process) keeps every user in place."""
    keys = ["alice", "bob", "user-17", "ünïcødé", ""]
    code = ("import json, sys; from server.registry.routing import route_point; "
            "print(json.dumps([route_point(k) for k in json.loads(sys.argv[1])]))")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(keys)], capture_output=True,
                         text=True, check=True, env={"PYTHONHASHSEED": "123"})
    assert json.loads(out.stdout) == [route_point(k) for k in keys]
    assert len({route_point(k) for k in keys}) == len(keys)


@pytest.mark.parametrize("weights, needle", [
    ({}, "traffic must be"), ({"1": -1}, ">= 0"), ({"1": 0, "2": 0}, "above 0"),
    ({"1": "a"}, ">= 0"), ({"1": True}, ">= 0"), ({"1": float("nan")}, ">= 0"),
    ([1, 2], "traffic must be"),
])
def test_bad_weights_are_refused(weights, needle):
    with pytest.raises(ValueError, match=needle):
        check_weights(weights)


@pytest.mark.parametrize("doc, needle", [
    ({"models": {}}, "at least one model"),
    ({"models": {"a": {"versions": {}}}}, "at least one version"),
    ({"models": {"a": {"versions": {"x": {"path": "/p"}}}}}, "positive integers"),
    ({"models": {"a": {"versions": {"1": {}}}}}, "either 'path'"),
    ({"models": {"a": {"versions": {"1": {"lora": "/l"}}}}}, "needs 'base'"),
    ({"models": {"a": {"versions": {"1": {"lora": "/l", "base": "2"}}}}}, "not a full version"),
    ({"models": {"a": {"versions": {"1": {"path": "/p"}}, "traffic": {"2": 1}}}}, "no version 2"),
    ({"models": {"a": {"versions": {"1": {"path": "/p"}}, "engine": {"dtyp": "x"}}}},
     "unknown engine settings dtyp"),
    ({"models": {"a:b": {"versions": {"1": {"path": "/p"}}}}}, "model name"),
    ({"memory_budget": "1GiB", "models": {"a": {"versions": {"1": {"path": "/p"}}}}},
     "needs its 'memory' share"),
    ({"memory_budget": "1GiB", "models": {
        "a": {"memory": "768MiB", "versions": {"1": {"path": "/p"}}},
        "b": {"memory": "512MiB", "versions": {"1": {"path": "/q"}}}}},
     r"add up to 1.25 GiB, over the memory_budget of 1.00 GiB \(a 0.75 GiB, b 0.50 GiB\)"),
])
def test_bad_registry_configs_name_the_key(doc, needle):
    with pytest.raises(ValueError, match=needle):
        parse_registry(doc)


def test_default_traffic_is_the_newest_version():
    spec = parse_registry({"models": {"a": {"versions": {"1": {"path": "/p"},
                                                         "2": {"lora": "/l", "base": "1"}}}}})
    assert spec.models["a"].traffic == {"2": 100.0}


# ---- a live in-process server on tiny models ----------------------------------------------
@pytest.fixture(scope="module")
def models(tiny_models, tmp_path_factory):
    """Model directories and their transformers oracles: tiny llama (v1), a perturbed copy
    of it (v3), tiny qwen2, and a PEFT adapter of the llama."""
    from test_lora import ALL, save_adapter

    llama_dir, llama = tiny_models("llama")
    qwen_dir, qwen = tiny_models("qwen2")
    root = tmp_path_factory.mktemp("registry")
    variant = copy.deepcopy(llama)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in variant.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    variant.save_pretrained(str(root / "variant"))
    adapter = save_adapter(llama, str(root / "adapter"), seed=3, r=4, lora_alpha=8,
                           target_modules=ALL)
    return {"llama": (llama_dir, llama), "variant": (str(root / "variant"), variant.eval()),
            "qwen": (qwen_dir, qwen), "adapter": (str(root / "adapter"), adapter)}


@pytest.fixture(scope="module")
def expected(models):
    return {name: hf_greedy(oracle, PROMPT, NEW) for name, (_, oracle) in models.items()}


def make_app(spec_doc: dict, **settings):
    from engine.async_engine import AsyncLLMEngine
    from engine.core.config import EngineConfig
    from server.app import ServerSettings, build_app

    spec = parse_registry(spec_doc)
    return build_app(None, ServerSettings(next(iter(spec.models)), **settings), spec,
                     lambda kw: AsyncLLMEngine.from_config(EngineConfig(**kw)))


def completion(client, model, user=None, stream=False, prompt=PROMPT, max_tokens=NEW,
               headers=None):
    """(status, reported model, token ids, error) of one greedy completion."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}
    if user is not None:
        body["user"] = user
    h = {"Authorization": f"Bearer {USER}", **(headers or {})}
    if not stream:
        r = client.post("/v1/completions", json=body, headers=h)
        if r.status_code != 200:
            return r.status_code, None, None, r.text
        data = r.json()
        return 200, data["model"], data["choices"][0]["token_ids"], None
    ids, reported, error = [], None, None
    with client.stream("POST", "/v1/completions", json={**body, "stream": True},
                       headers=h) as r:
        if r.status_code != 200:
            return r.status_code, None, None, r.read().decode()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                error = chunk["error"]
                continue
            reported = chunk["model"]
            ids += chunk["choices"][0].get("token_ids", [])
    return (200 if error is None else 500), reported, ids, error


def admin(client, method, path, body=None, key=ADMIN):
    return client.request(method, path, json=body,
                          headers={"Authorization": f"Bearer {key}"} if key else {})


def index(client) -> dict[tuple[str, str], dict]:
    rows = admin(client, "POST", "/v2/repository/index", {}).json()
    return {(r["name"], r["version"]): r for r in rows}


@pytest.fixture(scope="module")
def two_bases(models):
    """tiny (llama v1 + an adapter as v2) and qwen, side by side, under a memory budget."""
    doc = {"memory_budget": "1GiB", "models": {
        "tiny": {"memory": "256MiB", "engine": TINY_ENGINE, "traffic": {"1": 100},
                 "versions": {"1": {"path": models["llama"][0]},
                              "2": {"lora": models["adapter"][0], "base": "1"}}},
        "qwen": {"memory": "256MiB", "engine": TINY_ENGINE,
                 "versions": {"1": {"path": models["qwen"][0]}}}}}
    app = make_app(doc, api_key=USER, admin_key=ADMIN)
    with TestClient(app) as client:
        yield client, app.state.registry


def test_two_base_models_and_an_adapter_version_are_exact(two_bases, expected):
    client, _ = two_bases
    for model, want, reported in (("tiny:1", "llama", "tiny:1"), ("qwen", "qwen", "qwen:1"),
                                  ("tiny:2", "adapter", "tiny:2"), ("tiny", "llama", "tiny:1")):
        for stream in (False, True):
            status, got_model, ids, err = completion(client, model, stream=stream)
            assert status == 200, err
            assert got_model == reported and ids == expected[want], (model, stream)
    listing = client.get("/v1/models", headers={"Authorization": f"Bearer {USER}"})
    cards = {c["id"]: c for c in listing.json()["data"]}
    assert {"tiny", "tiny:1", "tiny:2", "qwen", "qwen:1"} <= set(cards)
    assert cards["tiny:2"]["parent"] == "tiny:1" and cards["qwen:1"]["parent"] is None
    rows = index(client)
    assert rows[("tiny", "2")]["kind"] == "lora" and rows[("tiny", "2")]["base"] == "tiny:1"
    assert rows[("tiny", "1")]["memory_bytes"] > 0 and rows[("tiny", "2")]["memory_bytes"] == 0


def test_weights_route_by_user_and_pins_ignore_them(two_bases):
    client, _ = two_bases
    assert admin(client, "PUT", "/v2/repository/models/tiny/traffic",
                 {"1": 50, "2": 50}).status_code == 200
    try:
        seen = {}
        for i in range(12):
            user = f"u{i}"
            first = completion(client, "tiny", user=user, max_tokens=2)[1]
            assert all(completion(client, "tiny", user=user, max_tokens=2)[1] == first
                       for _ in range(2))
            seen[user] = first
        assert set(seen.values()) == {"tiny:1", "tiny:2"}
        # the x-user-id header is the key when there is no `user`
        u = next(iter(seen))
        assert completion(client, "tiny", max_tokens=2, headers={"x-user-id": u})[1] == seen[u]
        assert all(completion(client, "tiny:1", user=u, max_tokens=2)[1] == "tiny:1"
                   for u in seen)
    finally:
        admin(client, "PUT", "/v2/repository/models/tiny/traffic", {"1": 100})


@pytest.mark.parametrize("body, needle", [
    ({"1": -1}, ">= 0"), ({"1": 0}, "above 0"), ({"9": 100}, "not loaded"), ([1], "JSON object"),
    ({"1": "a"}, ">= 0"), ({"x": 1}, "positive integers"),
])
def test_bad_traffic_changes_nothing(two_bases, body, needle):
    client, registry = two_bases
    before = dict(registry.models["tiny"].traffic)
    r = admin(client, "PUT", "/v2/repository/models/tiny/traffic", body)
    assert r.status_code == 400 and needle in r.json()["error"], r.text
    assert registry.models["tiny"].traffic == before
    assert admin(client, "PUT", "/v2/repository/models/nope/traffic", {"1": 1}).status_code == 404
    assert admin(client, "PUT", "/v2/repository/models/tiny/traffic",
                 {"1": 1e308, "2" * 10: 1}).status_code == 400
    assert registry.models["tiny"].traffic == before


def test_hostile_routing_fields(two_bases, expected):
    client, registry = two_bases
    h = {"Authorization": f"Bearer {USER}"}
    body = {"prompt": PROMPT, "max_tokens": 2, "temperature": 0, "return_token_ids": True}
    for model, user, status in (("tiny", 5, 400), ("tiny", ["a"], 400), ("x" * 100_000, None, 404),
                                ("tiny:" + "9" * 50, None, 404), ("tiny:0", None, 404),
                                ("tiny:-1", None, 404), ("tiny", "u" * 1_000_000, 200),
                                ("tiny::1", None, 404), (":1", None, 404)):
        r = client.post("/v1/completions", headers=h, json={**body, "model": model, "user": user})
        assert r.status_code == status, (model[:20], str(user)[:20], r.text[:200])
    for name, params in (("y" * 200, {"path": "/x"}), ("tiny", {"version": "1" * 20, "path": "/x"}),
                         ("tiny", {"version": -3, "path": "/x"}), ("tiny", {"path": 5}),
                         ("tiny", {"path": "", "config": "{]"}), ("tiny", {"weight": -1e9,
                                                                          "path": "/x"})):
        r = admin(client, "POST", f"/v2/repository/models/{name}/load", {"parameters": params})
        assert r.status_code == 400 and r.json()["error"], (name[:20], params)
    assert completion(client, "tiny")[2] == expected["llama"]


def test_bad_loads_change_nothing(two_bases, models, tmp_path):
    client, registry = two_bases
    before = {m: dict(registry.models[m].traffic) for m in registry.models}
    cases = [
        ("tiny", {"version": "5", "path": str(tmp_path / "missing")}, 400, "failed to load"),
        ("tiny", {"version": "6", "path": models["variant"][0],
                  "config": json.dumps({"kv_cache_memory_bytes": 300 << 20,
                                        "num_kv_blocks": None})},
         400, "over tiny's memory share"),
        ("other", {"path": models["variant"][0]}, 400, "needs its 'memory' share"),
        ("other", {"path": models["variant"][0], "config": '{"memory": "600MiB"}'}, 400,
         "does not fit"),
        ("tiny", {"version": "1", "path": models["variant"][0]}, 409, "READY"),
        ("tiny", {"path": models["variant"][0], "bogus": 1}, 400, "unknown load parameters"),
        ("tiny", {"version": "7", "path": models["variant"][0], "config": '{"dtyp": 1}'}, 400,
         "unknown engine settings"),
        ("tiny", {"version": "8", "lora": models["adapter"][0], "base": "qwen:1"}, 400,
         "loaded without LoRA"),
    ]
    for name, params, status, needle in cases:
        r = admin(client, "POST", f"/v2/repository/models/{name}/load", {"parameters": params})
        assert r.status_code == status and needle in r.json()["error"], (params, r.text)
    assert {m: registry.models[m].traffic for m in before} == before
    rows = index(client)
    assert rows[("tiny", "5")]["state"] == "FAILED" and rows[("tiny", "5")]["reason"]
    assert ("other", "1") not in rows or rows[("other", "1")]["state"] != "READY"
    assert completion(client, "tiny:5")[0] == 404
    # what still runs is untouched: each model answers, and every KV block is free again
    assert completion(client, "tiny")[1] == "tiny:1"
    assert completion(client, "qwen")[1] == "qwen:1"
    # the unloads that would strand a model's traffic or its adapter are refused too
    r = admin(client, "POST", "/v2/repository/models/tiny/unload", {"parameters": {"version": "1"}})
    assert r.status_code == 409 and "base of tiny:2" in r.json()["error"]


def test_admin_endpoints_take_only_the_admin_key(two_bases, models):
    client, registry = two_bases
    paths = [("POST", "/v2/repository/models/tiny/load", {"parameters": {"version": "9",
                                                                         "path": "/x"}}),
             ("POST", "/v2/repository/models/tiny/unload", {"parameters": {"version": "2"}}),
             ("PUT", "/v2/repository/models/tiny/traffic", {"1": 1}),
             ("GET", "/v2/repository/models/tiny/traffic", None)]
    for method, path, body in paths:
        for key in (None, "wrong", USER):
            r = admin(client, method, path, body, key=key)
            assert r.status_code == 401 and "admin key" in r.json()["error"], (path, key)
    assert ("tiny", "9") not in index(client)
    assert registry.models["tiny"].versions["2"].state == "READY"
    # the read-only index takes either key, and nothing else
    assert admin(client, "POST", "/v2/repository/index", {}, key=USER).status_code == 200
    assert admin(client, "POST", "/v2/repository/index", {}, key=None).status_code == 401


def test_admin_api_is_off_without_an_admin_key(models):
    doc = {"models": {"m": {"engine": TINY_ENGINE,
                            "versions": {"1": {"path": models["llama"][0]}}}}}
    with TestClient(make_app(doc)) as client:
        r = admin(client, "POST", "/v2/repository/models/m/load",
                  {"parameters": {"path": models["variant"][0]}}, key=None)
        assert r.status_code == 403 and "--admin-key" in r.json()["error"]


def run_clients(client, stop: threading.Event, results: list, n: int = 3):
    """n client threads, alternating streamed and whole completions, each with its user."""
    def loop(i):
        k = 0
        while not stop.is_set():
            results.append(completion(client, "swap", user=f"c{i}-{k}", stream=bool(k % 2)))
            k += 1
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    return threads


def test_swap_under_load_fails_nothing_and_frees_the_old_version(models, expected):
    doc = {"models": {"swap": {"engine": TINY_ENGINE,
                               "versions": {"1": {"path": models["llama"][0]}}}}}
    app = make_app(doc, api_key=USER, admin_key=ADMIN)
    registry = app.state.registry
    with TestClient(app) as client:
        old_engine = weakref.ref(registry.models["swap"].versions["1"].gateway.engine.engine)
        stop, results = threading.Event(), []
        long_one = {}
        threads = run_clients(client, stop, results)
        pinned = threading.Thread(target=lambda: long_one.setdefault(
            "r", completion(client, "swap:1", max_tokens=60)))
        time.sleep(0.3)
        pinned.start()
        time.sleep(0.2)
        r = admin(client, "POST", "/v2/repository/models/swap/load",
                  {"parameters": {"version": "3", "path": models["variant"][0]}})
        assert r.status_code == 200 and r.json()["state"] == "READY", r.text
        assert registry.models["swap"].traffic == {"1": 100.0}  # a new version starts at 0
        assert admin(client, "PUT", "/v2/repository/models/swap/traffic",
                     {"1": 99, "3": 1}).status_code == 200
        assert admin(client, "PUT", "/v2/repository/models/swap/traffic",
                     {"3": 100}).status_code == 200
        r = admin(client, "POST", "/v2/repository/models/swap/unload",
                  {"parameters": {"version": "1"}})
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + 60
        while index(client)[("swap", "1")]["state"] != "UNLOADED":
            assert time.monotonic() < deadline, index(client)
            time.sleep(0.05)
        time.sleep(0.3)
        stop.set()
        for t in [*threads, pinned]:
            t.join(timeout=60)
        failures = [r for r in results if r[0] != 200]
        assert not failures, failures[:3]
        by_version = {"swap:1": [], "swap:3": []}
        for _, reported, ids, _ in results:
            by_version[reported].append(ids)
        assert by_version["swap:1"] and by_version["swap:3"]
        assert all(ids == expected["llama"] for ids in by_version["swap:1"])
        assert all(ids == expected["variant"] for ids in by_version["swap:3"])
        status, reported, ids, _ = long_one["r"]  # in flight across the unload: ran on v1
        assert status == 200 and reported == "swap:1"
        assert ids == hf_greedy(models["llama"][1], PROMPT, 60)
        row = index(client)[("swap", "1")]
        assert row["memory_bytes"] == 0 and row["traffic_percent"] == 0
        assert completion(client, "swap:1")[0] == 404
        metrics = client.get("/metrics").text
        assert 'kvserve_model_state{model_name="swap",state="UNLOADED",version="1"} 1.0' in metrics
        assert 'kvserve_model_memory_bytes{model_name="swap",version="1"} 0.0' in metrics
        assert 'vllm:num_requests_running{model_name="swap",version="3"}' in metrics
        assert 'vllm:num_requests_running{model_name="swap",version="1"}' not in metrics
        gc.collect()
        assert old_engine() is None, gc.get_referrers(old_engine())


def test_scale_to_zero_and_back(models, expected):
    doc = {"models": {"cold": {"engine": TINY_ENGINE, "idle_unload_s": 0.3,
                               "versions": {"1": {"path": models["llama"][0]}}}}}
    app = make_app(doc)
    registry = app.state.registry
    with TestClient(app) as client:
        assert completion(client, "cold")[2] == expected["llama"]
        engine = weakref.ref(registry.models["cold"].versions["1"].gateway.engine.engine)
        deadline = time.monotonic() + 20
        while registry.models["cold"].versions["1"].state != "IDLE" or engine() is not None:
            assert time.monotonic() < deadline, registry.models["cold"].versions["1"].state
            time.sleep(0.05)
            gc.collect()
        assert registry.models["cold"].versions["1"].memory == 0
        status, reported, ids, err = completion(client, "cold")
        assert status == 200 and ids == expected["llama"], err
        assert registry.models["cold"].versions["1"].state == "READY"
        metrics = client.get("/metrics").text
        assert 'kvserve_cold_start_seconds_count{model_name="cold"} 1.0' in metrics


def test_unload_stops_what_outlives_the_drain_timeout(models):
    """A request that would run on long after its version was unloaded (a slow client, a
    huge max_tokens) is stopped at the drain timeout: its stream ends with an error event,
    not a hang, and the version's memory is freed."""
    doc = {"models": {"d": {"engine": TINY_ENGINE, "versions": {
        "1": {"path": models["llama"][0]}, "2": {"path": models["llama"][0]}},
        "traffic": {"2": 100}}}}
    app = make_app(doc, api_key=USER, admin_key=ADMIN, drain_timeout=0.5)
    registry = app.state.registry
    with TestClient(app) as client:
        engine = registry.models["d"].versions["1"].gateway.engine.engine
        step = engine.step

        def slow():  # ~20 tokens a second: 200 tokens would take 10 s
            time.sleep(0.05)
            return step()
        engine.step = slow
        result = {}
        pinned = threading.Thread(target=lambda: result.setdefault(
            "r", completion(client, "d:1", stream=True, max_tokens=200)))
        pinned.start()
        time.sleep(0.5)
        t0 = time.monotonic()
        r = admin(client, "POST", "/v2/repository/models/d/unload",
                  {"parameters": {"version": "1"}})
        assert r.status_code == 200, r.text
        pinned.join(timeout=30)
        assert not pinned.is_alive()
        status, _, ids, error = result["r"]
        assert status == 500 and error and 0 < len(ids) < 200, result["r"]
        deadline = time.monotonic() + 10
        while index(client)[("d", "1")]["state"] != "UNLOADED":
            assert time.monotonic() < deadline, index(client)
            time.sleep(0.05)
        assert time.monotonic() - t0 < 5  # the timeout, not the 10 s the request wanted
        assert index(client)[("d", "1")]["memory_bytes"] == 0
        assert completion(client, "d")[0] == 200  # version 2 serves on
