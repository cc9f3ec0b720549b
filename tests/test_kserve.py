"""KServe v2 / Triton inference protocol against a live `kvserve serve`, through the stock
`tritonclient` over HTTP (binary and pure JSON) and gRPC (unary and decoupled streaming).
The oracle is the server's own greedy /v1/completions for the same prompt."""
from __future__ import annotations

import json
import queue
import socket
import time

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from live_server import free_port, start_server, stop_server
from test_server import metric
from tritonclient.utils import InferenceServerException

MODEL = "SmolLM2-135M-Instruct"
PROMPTS = ["The capital of France is", "Water boils at", "My favourite colour is"]
GREEDY = {"temperature": 0, "max_tokens": 8}


@pytest.fixture(scope="module")
def live(smol_llm, tmp_path_factory):  # smol_llm: the GGUF conversion is cached first
    grpc_port = free_port()
    proc, base, port, log = start_server(tmp_path_factory.mktemp("kserve"), "kserve",
                                         grpc_port=grpc_port)
    refs = {}
    for p in PROMPTS:
        body = httpx.post(base + "/v1/completions", json={"prompt": p, **GREEDY}, timeout=60).json()
        refs[p] = (body["choices"][0]["text"], body["usage"], body["choices"][0]["finish_reason"])
    yield {"base": base, "http": f"127.0.0.1:{port}", "grpc": f"127.0.0.1:{grpc_port}",
           "refs": refs}
    stop_server(proc)
    with pytest.raises(OSError):  # the gRPC listener went with the process
        socket.create_connection(("127.0.0.1", grpc_port), timeout=2).close()


def inputs(mod, prompts, params=GREEDY, binary=True, **flags):
    """text_input (+ sampling_parameters as JSON, + BOOL flags) for either client module."""
    def tensor(name, dtype, values):
        t = mod.InferInput(name, [len(values)], dtype)
        arr = np.array(values, dtype=np.object_ if dtype == "BYTES" else bool)
        if mod is httpclient:
            t.set_data_from_numpy(arr, binary_data=binary)
        else:
            t.set_data_from_numpy(arr)
        return t
    out = [tensor("text_input", "BYTES", [p.encode() for p in prompts])]
    if params is not None:
        out.append(tensor("sampling_parameters", "BYTES", [json.dumps(params).encode()]))
    out += [tensor(k, "BOOL", [v]) for k, v in flags.items()]
    return out


def texts(result) -> list[str]:
    return [t.decode() for t in result.as_numpy("text_output").reshape(-1)]


def idle(base: str, timeout: float = 15.0) -> None:
    """Nothing running or waiting and no KV block referenced, within ``timeout``."""
    deadline = time.monotonic() + timeout
    names = ("kvserve_num_requests_running", "kvserve_num_requests_waiting",
             "kvserve_kv_cache_blocks_in_use")
    while time.monotonic() < deadline:
        values = [metric(base, n) for n in names]
        if values == [0, 0, 0]:
            return
        time.sleep(0.1)
    raise AssertionError(f"server not idle: {dict(zip(names, values))}")


# ---- 1. the brief's snippet and every way in give the same greedy text -------------------
def test_brief_snippet_http_binary(live):
    client = httpclient.InferenceServerClient(url=live["http"])
    prompt = PROMPTS[0]
    result = client.infer(MODEL, inputs(httpclient, [prompt]))
    assert texts(result) == [prompt + live["refs"][prompt][0]]
    # tritonclient sent binary inputs and asked for binary outputs: they came back binary
    assert result.get_response()["outputs"][0]["parameters"]["binary_data_size"] > 0


def test_http_pure_json_grpc_and_a_batch_agree(live):
    refs = live["refs"]
    client = httpclient.InferenceServerClient(url=live["http"])
    result = client.infer(MODEL, inputs(httpclient, [PROMPTS[1]], binary=False),
                          outputs=[httpclient.InferRequestedOutput("text_output", binary_data=False)])
    assert result.get_response()["outputs"][0]["data"] == [PROMPTS[1] + refs[PROMPTS[1]][0]]

    g = grpcclient.InferenceServerClient(url=live["grpc"])
    assert texts(g.infer(MODEL, inputs(grpcclient, [PROMPTS[2]]))) == [PROMPTS[2] + refs[PROMPTS[2]][0]]
    expected = [p + refs[p][0] for p in PROMPTS]
    assert texts(client.infer(MODEL, inputs(httpclient, PROMPTS))) == expected
    batch = g.infer(MODEL, inputs(grpcclient, PROMPTS), request_id="batch-1")
    assert texts(batch) == expected and batch.get_response().id == "batch-1"
    assert batch.as_numpy("text_output").shape == (3,)


# ---- 2. decoupled streaming: several requests in flight on one gRPC stream ---------------
def test_grpc_stream_three_concurrent_requests(live):
    refs = live["refs"]
    got: queue.Queue = queue.Queue()
    g = grpcclient.InferenceServerClient(url=live["grpc"])
    g.start_stream(callback=lambda result, error: got.put((result, error)))
    for i, p in enumerate(PROMPTS):
        g.async_stream_infer(MODEL, inputs(grpcclient, [p], stream=True), request_id=f"s{i}")
    g.async_stream_infer(MODEL, inputs(grpcclient, [PROMPTS[0]], stream=True,
                                       return_num_output_tokens=True),
                         request_id="empty-final", enable_empty_final_response=True)
    g.async_stream_infer(MODEL, inputs(grpcclient, [PROMPTS[0]], params={"temprature": 0}),
                         request_id="bad")
    g.stop_stream()  # half-close: returns once every request on the stream is answered
    chunks: dict[str, list] = {}
    errors = []
    while not got.empty():
        result, error = got.get()
        if error is not None:
            errors.append(str(error))
            continue
        resp = result.get_response()
        final = resp.parameters["triton_final_response"].bool_param
        text = texts(result) if resp.outputs else []
        tokens = result.as_numpy("num_output_tokens")
        chunks.setdefault(resp.id, []).append((text, final, tokens))
    assert len(errors) == 1 and "unknown sampling parameter(s) temprature" in errors[0]
    for i, p in enumerate(PROMPTS):
        seq = chunks[f"s{i}"]
        assert "".join(t[0] for t, _, _ in seq) == refs[p][0]
        assert [f for _, f, _ in seq].count(True) == 1 and seq[-1][1] is True
        assert len(seq) > 1  # streamed, not one response
    seq = chunks["empty-final"]
    assert seq[-1] == ([], True, None) and all(not f for _, f, _ in seq[:-1])
    assert "".join(t[0] for t, _, _ in seq[:-1]) == refs[PROMPTS[0]][0]
    assert sum(int(n[0]) for _, _, n in seq[:-1]) == refs[PROMPTS[0]][1]["completion_tokens"]


# ---- 3. metadata and readiness through the client ----------------------------------------
def test_metadata_and_readiness(live):
    client = httpclient.InferenceServerClient(url=live["http"])
    g = grpcclient.InferenceServerClient(url=live["grpc"])
    for c in (client, g):
        assert c.is_server_live() and c.is_server_ready()
        assert c.is_model_ready(MODEL) and c.is_model_ready(MODEL, "1")
        assert not c.is_model_ready("nope")
    meta = client.get_server_metadata()
    assert meta["name"] == "kvserve" and "binary_tensor_data" in meta["extensions"]
    assert g.get_server_metadata().name == "kvserve"
    for version in ("", "1"):
        m = client.get_model_metadata(MODEL, version)
        assert m["versions"] == ["1"]
        assert {i["name"]: i["datatype"] for i in m["inputs"]}["text_input"] == "BYTES"
        gm = g.get_model_metadata(MODEL, version)
        assert [o.name for o in gm.outputs] == [o["name"] for o in m["outputs"]]
    with pytest.raises(InferenceServerException, match="version 2 is not found"):
        client.get_model_metadata(MODEL, "2")
    config = g.get_model_config(MODEL).config
    assert config.model_transaction_policy.decoupled and config.max_batch_size == 0
    assert client.get_model_config(MODEL)["input"][0]["name"] == "text_input"
    assert client.get_model_config(MODEL)["parameters"]["max_model_len"]["string_value"] == "1024"
    assert [m.name for m in g.get_model_repository_index().models] == [MODEL]
    assert client.get_model_repository_index()[0]["state"] == "READY"


# ---- 4. bad requests: a clear 4xx / status naming the problem, then business as usual ----
def raw_infer(live, body: dict, model: str = MODEL):
    return httpx.post(f"{live['base']}/v2/models/{model}/infer", json=body, timeout=60)


def test_http_errors_are_v2_shaped(live):
    text = {"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["hi"]}
    sp = {"name": "sampling_parameters", "datatype": "BYTES", "shape": [1], "data": ["{oops"]}
    # binary extension with a BYTES length prefix (9) longer than the data after it (2)
    head = json.dumps({"inputs": [{**text, "data": None, "parameters": {"binary_data_size": 6}}]})
    cases = [
        (raw_infer(live, {"inputs": [text]}, "nope"), 404, "unknown model: 'nope'"),
        (raw_infer(live, {"inputs": [{**text, "name": "prompt"}]}), 400, "unexpected input 'prompt'"),
        (raw_infer(live, {"inputs": [{**sp, "data": ["{}"]}]}), 400, "'text_input' is required"),
        (raw_infer(live, {"inputs": [text, sp]}), 400, "'sampling_parameters' is not valid JSON"),
        (raw_infer(live, {"inputs": [{**text, "datatype": "INT32", "data": [1]}]}), 400,
         "must be BYTES, got INT32"),
        (raw_infer(live, {"inputs": [{**text, "data": ["word " * 2000]}]}), 400,
         "more than max_model_len (1024)"),
        (httpx.post(f"{live['base']}/v2/models/{MODEL}/infer", timeout=60,
                    headers={"Inference-Header-Content-Length": str(len(head))},
                    content=head.encode() + b"\x09\x00\x00\x00hi"), 400, "claims 9 bytes"),
    ]
    for response, status, message in cases:
        assert response.status_code == status, response.text
        assert set(response.json()) == {"error"}
        if message:
            assert message in response.json()["error"]
    ok = raw_infer(live, {"inputs": [{**text, "data": [PROMPTS[0]]}], "parameters": GREEDY})
    assert ok.json()["outputs"][0]["data"] == [PROMPTS[0] + live["refs"][PROMPTS[0]][0]]


def test_grpc_errors_are_status_codes(live):
    g = grpcclient.InferenceServerClient(url=live["grpc"])

    def status(model, ins):
        with pytest.raises(InferenceServerException) as e:
            g.infer(model, ins)
        return e.value.status(), e.value.message()

    bad_dtype = grpcclient.InferInput("text_input", [1], "INT32")
    bad_dtype.set_data_from_numpy(np.array([1], dtype=np.int32))
    assert status("nope", inputs(grpcclient, ["hi"]))[0] == "StatusCode.NOT_FOUND"
    code, msg = status(MODEL, [bad_dtype])
    assert code == "StatusCode.INVALID_ARGUMENT" and "must be BYTES" in msg
    code, msg = status(MODEL, inputs(grpcclient, ["hi"])[1:])  # sampling_parameters only
    assert code == "StatusCode.INVALID_ARGUMENT" and "'text_input' is required" in msg
    code, msg = status(MODEL, inputs(grpcclient, ["hi"], params={"top_k": "x"}))
    assert code == "StatusCode.INVALID_ARGUMENT" and "'top_k' must be int" in msg
    code, msg = status(MODEL, inputs(grpcclient, ["word " * 2000]))
    assert code == "StatusCode.INVALID_ARGUMENT" and "max_model_len (1024)" in msg
    # several MB: past gRPC's stock 4 MB limit, still the engine's own clear answer
    code, msg = status(MODEL, inputs(grpcclient, ["x" * (6 << 20)]))
    assert code == "StatusCode.INVALID_ARGUMENT" and "max_prompt_chars" in msg
    code, msg = status(MODEL, inputs(grpcclient, ["hi"], stream=True))
    assert code == "StatusCode.INVALID_ARGUMENT" and "streaming call" in msg
    assert texts(g.infer(MODEL, inputs(grpcclient, [PROMPTS[1]]))) == [
        PROMPTS[1] + live["refs"][PROMPTS[1]][0]]
    idle(live["base"])


def test_grpc_bytes_that_are_not_protobuf_are_invalid_argument(live):
    import grpc

    method = "/inference.GRPCInferenceService/"
    junk = b"\xff\xff\xff"  # a truncated varint tag: not a message of any type
    with grpc.insecure_channel(live["grpc"]) as channel:
        with pytest.raises(grpc.RpcError) as e:
            channel.unary_unary(method + "ModelInfer")(junk, timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value
        assert "not a valid inference.ModelInferRequest" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            list(channel.stream_stream(method + "ModelStreamInfer")(iter([junk]), timeout=30))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value
        with pytest.raises(grpc.RpcError) as e:  # methods we do not serve say so plainly
            channel.unary_unary(method + "SystemSharedMemoryStatus")(b"", timeout=30)
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED, e.value
        assert "not supported" in e.value.details()
    g = grpcclient.InferenceServerClient(url=live["grpc"])  # and the server goes on
    assert texts(g.infer(MODEL, inputs(grpcclient, [PROMPTS[2]]))) == [
        PROMPTS[2] + live["refs"][PROMPTS[2]][0]]
    idle(live["base"])


# ---- 5. cancellation frees everything at once --------------------------------------------
LONG = {"temperature": 0, "max_tokens": 400, "ignore_eos": True}


def test_cancelling_a_grpc_stream_aborts_its_requests(live):
    got: queue.Queue = queue.Queue()
    g = grpcclient.InferenceServerClient(url=live["grpc"])
    g.start_stream(callback=lambda result, error: got.put(error))
    for i in range(2):
        g.async_stream_infer(MODEL, inputs(grpcclient, [PROMPTS[i]], params=LONG, stream=True),
                             request_id=f"long{i}")
    for _ in range(6):  # generation is under way
        assert got.get(timeout=60) is None
    assert metric(live["base"], "kvserve_num_requests_running") == 2
    g.stop_stream(cancel_requests=True)
    idle(live["base"])
    assert got.qsize() < 2 * 400


def test_grpc_deadline_and_http_disconnect_abort(live):
    g = grpcclient.InferenceServerClient(url=live["grpc"])
    with pytest.raises(InferenceServerException) as e:
        g.infer(MODEL, inputs(grpcclient, [PROMPTS[0]], params=LONG), client_timeout=1.0)
    assert e.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    idle(live["base"])
    body = {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1],
                        "data": [PROMPTS[0]]}], "parameters": LONG}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{live['base']}/v2/models/{MODEL}/infer", json=body, timeout=1.0)
    idle(live["base"])


# ---- 6. the vLLM backend's meanings --------------------------------------------------------
def test_outputs_mean_what_the_vllm_backend_means(live):
    g = grpcclient.InferenceServerClient(url=live["grpc"])
    prompt = PROMPTS[0]
    text, usage, reason = live["refs"][prompt]
    r = g.infer(MODEL, inputs(grpcclient, [prompt], exclude_input_in_output=True,
                              return_finish_reason=True, return_num_input_tokens=True,
                              return_num_output_tokens=True, return_cumulative_logprob=True,
                              return_logprobs=True))
    assert texts(r) == [text]
    assert r.as_numpy("finish_reason").tolist() == [reason.encode()] == [b"length"]
    assert r.as_numpy("num_input_tokens").tolist() == [usage["prompt_tokens"]]
    assert r.as_numpy("num_output_tokens").tolist() == [usage["completion_tokens"]]
    assert r.as_numpy("num_output_tokens").dtype == np.uint32
    assert r.as_numpy("cumulative_logprob").dtype == np.float32
    assert r.as_numpy("cumulative_logprob")[0] < 0
    assert r.as_numpy("logprobs").tolist() == [b"null"]  # not asked for in sampling_parameters
    # a stop string ends it with "stop"; the prompt is not repeated when excluded
    stop = text.strip().split()[0]
    r = g.infer(MODEL, inputs(grpcclient, [prompt], params={**GREEDY, "stop": [stop]},
                              exclude_input_in_output=True, return_finish_reason=True))
    assert r.as_numpy("finish_reason").tolist() == [b"stop"] and stop not in texts(r)[0]
    # logprobs when asked: one JSON list per output, one entry per token
    r = g.infer(MODEL, inputs(grpcclient, [prompt], params={**GREEDY, "logprobs": 2},
                              return_logprobs=True))
    entries = json.loads(r.as_numpy("logprobs")[0])
    assert len(entries) == usage["completion_tokens"]
    assert all(1 <= len(e) <= 3 and all("decoded_token" in v for v in e.values()) for e in entries)


def test_requests_are_counted_by_protocol(live):
    lines = httpx.get(live["base"] + "/metrics").text.splitlines()

    def count(protocol, outcome):
        key = f'kvserve_requests_total{{outcome="{outcome}",protocol="{protocol}"}}'
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(key))

    assert count("openai", "ok") >= len(PROMPTS)
    assert count("kserve-http", "ok") >= 3 and count("kserve-grpc", "ok") >= 3
    assert count("kserve-grpc", "aborted") >= 2


def test_statistics_count_what_ran(live):
    """Triton's statistics extension over HTTP and gRPC (what perf_analyzer and dashboards
    read): each finished inference counts once, with its duration; both protocols report the
    same numbers; an unknown model is a 404 / NOT_FOUND."""
    h = httpclient.InferenceServerClient(url=live["http"])
    g = grpcclient.InferenceServerClient(url=live["grpc"])

    def success() -> dict:
        (row,) = h.get_inference_statistics(MODEL)["model_stats"]
        return row["inference_stats"]["success"]

    before = success()
    h.infer(MODEL, inputs(httpclient, [PROMPTS[0]]))
    g.infer(MODEL, inputs(grpcclient, [PROMPTS[1]]))
    httpx.post(live["base"] + "/v1/completions", timeout=60,
               json={"prompt": PROMPTS[2], **GREEDY})
    after = success()
    assert int(after["count"]) == int(before["count"]) + 3
    assert int(after["ns"]) > int(before["ns"])
    over_grpc = g.get_inference_statistics(MODEL, as_json=True)["model_stats"][0]
    row = h.get_inference_statistics(MODEL, "1")["model_stats"][0]
    assert row["name"] == MODEL and row["version"] == "1" and int(row["last_inference"]) > 0
    assert int(over_grpc["inference_stats"]["success"]["count"]) == int(after["count"])
    assert int(row["inference_count"]) == int(after["count"])
    everything = h.get_inference_statistics()["model_stats"]
    assert [r["name"] for r in everything] == [MODEL]
    with pytest.raises(InferenceServerException) as e:
        h.get_inference_statistics("nope")
    assert "404" in str(e.value.status()) or "unknown model" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        g.get_inference_statistics("nope")
    assert e.value.status() == "StatusCode.NOT_FOUND"


# ---- auth, in process: the same app, its gRPC server on the app's event loop ---------------
def test_grpc_and_http_auth_in_process(smol_llm):
    from starlette.testclient import TestClient

    from conftest import assert_no_leak
    from engine.async_engine import AsyncLLMEngine
    from server.app import ServerSettings, build_app

    port = free_port()
    settings = ServerSettings(MODEL, api_key="sekret", grpc_port=port)
    with TestClient(build_app(AsyncLLMEngine(smol_llm.engine), settings)) as client:
        g = grpcclient.InferenceServerClient(url=f"127.0.0.1:{port}")
        assert g.is_server_live()  # health needs no key
        with pytest.raises(InferenceServerException) as e:
            g.infer(MODEL, inputs(grpcclient, ["hi"]))
        assert e.value.status() == "StatusCode.UNAUTHENTICATED"
        with pytest.raises(InferenceServerException) as e:
            g.infer(MODEL, inputs(grpcclient, ["hi"]), headers={"authorization": "Bearer nope"})
        assert e.value.status() == "StatusCode.UNAUTHENTICATED"
        ok = g.infer(MODEL, inputs(grpcclient, [PROMPTS[0]]),
                     headers={"authorization": "Bearer sekret"})
        assert texts(ok)[0].startswith(PROMPTS[0])
        body = {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["hi"]}]}
        r = client.post(f"/v2/models/{MODEL}/infer", json=body)
        assert r.status_code == 401 and "API key" in r.json()["error"]
        r = client.post(f"/v2/models/{MODEL}/infer", json=body,
                        headers={"Authorization": "Bearer sekret"})
        assert r.status_code == 200
        assert client.get("/v2/health/live").status_code == 200
        g.close()
    with pytest.raises(OSError):  # the app's shutdown stopped its gRPC server
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    assert_no_leak(smol_llm.engine)


# ---- bench/serving.py's triton backends against the real server ---------------------------
@pytest.mark.parametrize("backend", ["triton-grpc", "triton-http"])
def test_bench_serving_triton_backends(live, tmp_path, backend):
    from test_bench_scripts import load_script

    serving = load_script("serving")
    out = tmp_path / "result.json"
    url = live["grpc"] if backend == "triton-grpc" else live["http"]
    rc = serving.main(["--backend", backend, "--base-url", url, "--model", MODEL,
                       "--num-prompts", "4", "--max-concurrency", "2", "--random-input-len", "16",
                       "--random-output-len", "6", "--tokenizer-free", "--output", str(out)])
    result = json.loads(out.read_text())
    assert rc == 0 and result["completed"] == 4 and result["failed"] == 0, result["errors"]
    assert result["total_output_tokens"] == 4 * 6  # ignore_eos reached the engine
    assert result["total_input_tokens"] >= 4 * 16  # counted by the server
    if backend == "triton-grpc":  # streamed: several chunks per request, so a real TPOT
        assert result["tpot_ms"]["median"] > 0 and result["itl_ms"]["median"] > 0
