"""LoRA adapters through a live `kvserve serve`, with the openai client: listed, selected by
``model`` (OpenAI routes and KServe v2's ``sampling_parameters.lora_name``), loaded and
unloaded at run time, refused with the protocol's errors; PEFT's merged SmolLM2 is the
oracle for the adapters' greedy output."""
from __future__ import annotations

import copy
import json
import threading
import time

import httpx
import openai
import pytest
import torch

from conftest import hf_greedy
from live_server import start_server, stop_server

KEY = "sk-lora"
BASE = "SmolLM2-135M-Instruct"
PROMPT = "The three most useful kitchen tools are"
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def smol_adapter(hf_smol, path, seed: int, **config):
    """A random PEFT adapter of SmolLM2 saved at ``path``; returns the merged oracle."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(hf_smol), LoraConfig(init_lora_weights=False, **config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    model.save_pretrained(str(path))
    return model.merge_and_unload().eval()


@pytest.fixture(scope="module")
def lora_env(hf_smol, smol_llm, tmp_path_factory):
    """(base URL, {name: (path, oracle)}, prompt ids); alpha and beta served from the
    start, gamma only on disk (loaded at run time by a test)."""
    root = tmp_path_factory.mktemp("smol-loras")
    adapters = {
        "alpha": (root / "alpha", smol_adapter(hf_smol, root / "alpha", 1, r=4, lora_alpha=8,
                                               target_modules=ALL)),
        "beta": (root / "beta", None),
        "gamma": (root / "gamma", smol_adapter(hf_smol, root / "gamma", 3, r=8, lora_alpha=8,
                                               target_modules=["q_proj", "v_proj", "down_proj"])),
    }
    smol_adapter(hf_smol, root / "beta", 2, r=2, lora_alpha=4, target_modules=["o_proj", "up_proj"])
    proc, base, _, log = start_server(
        root, "lora", "--api-key", KEY, "--lora-modules", f"alpha={root / 'alpha'}",
        f"beta={root / 'beta'}", "--allow-runtime-lora-updates", "--max-loras", "2",
        "--max-lora-rank", "8")
    ids = smol_llm.tokenizer.encode(PROMPT)
    yield base, adapters, ids
    stop_server(proc)
    log.close()


@pytest.fixture(scope="module")
def client(lora_env):
    return openai.OpenAI(base_url=lora_env[0] + "/v1", api_key=KEY, max_retries=0)


def post(base: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(base + path, json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"})


def completion(client, model: str, ids, n: int = 8) -> str:
    r = client.completions.create(model=model, prompt=ids, max_tokens=n, temperature=0)
    assert r.model == model
    return r.choices[0].text


def test_adapters_listed_with_their_parent(client):
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {BASE, "alpha", "beta"}
    assert cards["alpha"].parent == BASE and cards["beta"].parent == BASE
    assert cards[BASE].parent is None
    assert cards[BASE].max_model_len == cards["alpha"].max_model_len == 1024


def test_model_selects_the_adapter(client, lora_env, smol_llm):
    base, adapters, ids = lora_env
    alpha = completion(client, "alpha", ids)
    assert alpha == smol_llm.tokenizer.decode(hf_greedy(adapters["alpha"][1], ids, 8))
    assert completion(client, BASE, ids) != alpha
    with pytest.raises(openai.NotFoundError):
        completion(client, "no-such-adapter", ids)


def test_streaming_equals_non_streaming_on_an_adapter(client):
    kw = dict(model="beta", messages=[{"role": "user", "content": "Name a fruit."}],
              max_tokens=12, temperature=0)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        full.choices[0].message.content
    assert full.model == "beta" and all(c.model == "beta" for c in chunks)


def test_kserve_lora_name(lora_env, smol_llm):
    base, adapters, ids = lora_env
    body = {"inputs": [
        {"name": "text_input", "datatype": "BYTES", "shape": [1], "data": [PROMPT]},
        {"name": "sampling_parameters", "datatype": "BYTES", "shape": [1],
         "data": [json.dumps({"lora_name": "alpha", "temperature": 0, "max_tokens": 8})]},
        {"name": "exclude_input_in_output", "datatype": "BOOL", "shape": [1], "data": [True]}]}
    r = post(base, f"/v2/models/{BASE}/infer", body)
    assert r.status_code == 200, r.text
    text = r.json()["outputs"][0]["data"][0]
    assert text == smol_llm.tokenizer.decode(hf_greedy(adapters["alpha"][1], ids, 8))
    body["inputs"][1]["data"] = [json.dumps({"lora_name": "nope", "max_tokens": 2})]
    r = post(base, f"/v2/models/{BASE}/infer", body)
    assert r.status_code == 404 and "nope" in r.json()["error"]


def test_load_serve_and_unload_at_run_time(client, lora_env, smol_llm):
    base, adapters, ids = lora_env
    path = str(adapters["gamma"][0])
    r = post(base, "/v1/load_lora_adapter", {"lora_name": "gamma", "lora_path": path})
    assert r.status_code == 200, r.text
    assert "gamma" in {m.id for m in client.models.list().data}
    gamma = completion(client, "gamma", ids)
    assert gamma == smol_llm.tokenizer.decode(hf_greedy(adapters["gamma"][1], ids, 8))
    # twice the same name, a missing directory, a non-adapter: 400, and it keeps serving
    assert post(base, "/v1/load_lora_adapter",
                {"lora_name": "gamma", "lora_path": path}).status_code == 400
    r = post(base, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": path + "-missing"})
    assert r.status_code == 400 and "'x'" in r.json()["error"]["message"]
    assert post(base, "/v1/load_lora_adapter", {"lora_name": "y"}).status_code == 400
    for bad in ({"lora_name": 5, "lora_path": path}, {"lora_name": "", "lora_path": path},
                {"lora_name": BASE, "lora_path": path}, {"lora_name": "z", "lora_path": ["x"]},
                {"lora_name": "z" * 100_000, "lora_path": "\x00"}):
        r = post(base, "/v1/load_lora_adapter", bad)
        assert r.status_code == 400 and r.json()["error"]["message"], bad
    assert post(base, "/v1/unload_lora_adapter", {"lora_name": None}).status_code == 404
    assert completion(client, "gamma", ids) == gamma

    # unloading while a request runs on it: that request finishes, new ones get 404
    done = {}

    def long_request():
        r = client.completions.create(model="gamma", prompt=ids, max_tokens=48, temperature=0,
                                      extra_body={"ignore_eos": True})
        done["tokens"] = r.usage.completion_tokens

    t = threading.Thread(target=long_request)
    t.start()
    time.sleep(0.5)
    assert post(base, "/v1/unload_lora_adapter", {"lora_name": "gamma"}).status_code == 200
    t.join(timeout=120)
    assert done.get("tokens") == 48
    with pytest.raises(openai.NotFoundError):
        completion(client, "gamma", ids)
    assert post(base, "/v1/unload_lora_adapter", {"lora_name": "gamma"}).status_code == 404


def test_per_adapter_metrics(lora_env, client):
    base, _, ids = lora_env
    completion(client, "beta", ids, 3)
    text = httpx.get(base + "/metrics", timeout=10).text
    lines = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
             for line in text.splitlines() if line and not line.startswith("#")}
    assert lines['kvserve_lora_requests_total{adapter="beta"}'] >= 1
    assert lines['kvserve_lora_generation_tokens_total{adapter="beta"}'] >= 3
    assert "kvserve_lora_slots_in_use" in lines
