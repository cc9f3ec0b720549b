"""A registry through a real `kvserve serve --config registry.toml`: SmolLM2 as version 1
and a PEFT adapter of it as version 2 (PEFT's merged model is the oracle), split 50/50 by
user. The stock tritonclient over HTTP and gRPC (x-user-id metadata) and the openai client
see the same stable split, which survives a restart; `kvserve models` drives the admin API."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import openai
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from conftest import hf_greedy
from live_server import free_port, start_server, stop_server
from test_lora_server import ALL, smol_adapter

ADMIN, USER = "adm-live", "usr-live"
PROMPT = "The three most useful kitchen tools are"
USERS = [f"user-{i}" for i in range(10)]


@pytest.fixture(scope="module")
def setup(hf_smol, smol_llm, smol_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("registry-live")
    oracle = smol_adapter(hf_smol, root / "adapter", 5, r=4, lora_alpha=8, target_modules=ALL)
    config = root / "registry.toml"
    config.write_text(f'''api_key = "{USER}"
admin_key = "{ADMIN}"
[models.smol]
traffic = {{"1" = 50, "2" = 50}}
[models.smol.versions.1]
path = "{smol_path}"
[models.smol.versions.2]
lora = "{root / 'adapter'}"
base = "1"
''')
    ids = smol_llm.tokenizer.encode(PROMPT)
    want = {"1": smol_llm.tokenizer.decode(hf_greedy(hf_smol, ids, 6)),
            "2": smol_llm.tokenizer.decode(hf_greedy(oracle, ids, 6))}
    return root, config, want


def serve(root, config, name):
    grpc_port = free_port()
    proc, base, port, log = start_server(root, name, "--config", str(config),
                                         grpc_port=grpc_port)
    return proc, base, port, grpc_port, log


def openai_split(base) -> dict[str, str]:
    client = openai.OpenAI(base_url=base + "/v1", api_key=USER, max_retries=0)
    return {u: client.completions.create(model="smol", prompt=PROMPT, max_tokens=1,
                                         temperature=0, user=u).model for u in USERS}


def test_registry_server_end_to_end(setup):
    root, config, want = setup
    proc, base, port, grpc_port, log = serve(root, config, "registry-1")
    try:
        client = openai.OpenAI(base_url=base + "/v1", api_key=USER, max_retries=0)
        for version in ("1", "2"):  # each version, pinned, exact against its oracle
            r = client.completions.create(model=f"smol:{version}", prompt=PROMPT, max_tokens=6,
                                          temperature=0)
            assert r.model == f"smol:{version}" and r.choices[0].text == want[version]
        split = openai_split(base)
        assert set(split.values()) == {"smol:1", "smol:2"}

        # Triton clients: the version each user lands on is the same as over OpenAI, and is
        # reported back in model_version; a pinned version ignores the split.
        auth = {"authorization": f"Bearer {USER}"}
        h = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
        g = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        for u in USERS[:4]:
            for mod, c in ((httpclient, h), (grpcclient, g)):
                t = mod.InferInput("text_input", [1], "BYTES")
                t.set_data_from_numpy(np.array([PROMPT.encode()], dtype=np.object_))
                p = mod.InferInput("sampling_parameters", [1], "BYTES")
                p.set_data_from_numpy(np.array([b'{"max_tokens": 6, "temperature": 0}'],
                                               dtype=np.object_))
                result = c.infer("smol", [t, p], headers={**auth, "x-user-id": u})
                response = result.get_response()
                version = response["model_version"] if mod is httpclient else \
                    response.model_version
                assert f"smol:{version}" == split[u], (mod.__name__, u)
                text = result.as_numpy("text_output")[0].decode()
                assert text == PROMPT + want[version]
        pinned = g.infer("smol", [t, p], model_version="1", headers=auth)
        assert pinned.get_response().model_version == "1"
        index = {(m.name, m.version): m.state for m in g.get_model_repository_index(
            headers=auth).models}
        assert index == {("smol", "1"): "READY", ("smol", "2"): "READY"}

        # `kvserve models`: ramp to version 2 only, then unload it after moving traffic back
        def models(*args):
            return subprocess.run([sys.executable, "-m", "server.cli", "models", "--url", base,
                                   "--admin-key", ADMIN, *args], capture_output=True, text=True,
                                  timeout=120)
        assert models("traffic", "smol", "2=100").returncode == 0
        assert set(openai_split(base).values()) == {"smol:2"}
        out = models("traffic", "smol", "2=-1")
        assert out.returncode != 0 and "400" in out.stderr
        bad_key = subprocess.run([sys.executable, "-m", "server.cli", "models", "--url", base,
                                  "--admin-key", USER, "index"], capture_output=True, text=True)
        assert bad_key.returncode == 0  # the index is readable with the user key...
        out = subprocess.run([sys.executable, "-m", "server.cli", "models", "--url", base,
                              "--admin-key", USER, "unload", "smol", "--version", "2"],
                             capture_output=True, text=True)
        assert out.returncode != 0 and "401" in out.stderr  # ...nothing else is
        assert models("traffic", "smol", "1=100").returncode == 0
        assert models("unload", "smol", "--version", "2").returncode == 0
        listing = models("index").stdout
        assert "UNLOADED" in listing and "READY" in listing
        assert {m.id for m in client.models.list().data} == {"smol", "smol:1"}

        # the stock clients' load_model over HTTP and gRPC: the admin key, and only it
        admin = {"authorization": f"Bearer {ADMIN}"}
        adapter = str(root / "adapter")
        h.load_model("smol", headers=admin, config=json.dumps(
            {"version": "3", "lora": adapter, "base": "1"}))
        g.load_model("smol", headers=admin, config=json.dumps(
            {"version": "4", "lora": adapter, "base": "1"}))
        for c in (h, g):
            with pytest.raises(InferenceServerException, match="admin key"):
                c.load_model("smol", headers=auth, config=json.dumps(
                    {"version": "5", "lora": adapter, "base": "1"}))
        with pytest.raises(InferenceServerException, match="failed to load"):
            g.load_model("smol", headers=admin, config=json.dumps(
                {"version": "6", "lora": adapter + "-gone", "base": "1"}))
        states = {(m.name, m.version): m.state for m in g.get_model_repository_index(
            headers=auth).models}
        assert states[("smol", "3")] == states[("smol", "4")] == "READY"
        assert states[("smol", "6")] == "FAILED" and ("smol", "5") not in states
        r = client.completions.create(model="smol:4", prompt=PROMPT, max_tokens=6,
                                      temperature=0)
        assert r.choices[0].text == want["2"]  # the same adapter, as another version
        assert set(openai_split(base).values()) == {"smol:1"}  # new versions start at 0
    finally:
        stop_server(proc)
        log.close()

    # a restart keeps every user on the same version
    proc, base, *_, log = serve(root, config, "registry-2")
    try:
        assert openai_split(base) == split
    finally:
        stop_server(proc)
        log.close()
