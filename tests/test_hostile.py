"""Hostile input against a live `kvserve serve` (issue: "one request can kill the engine").

Every case must get the right 4xx in the protocol's error shape and leave the server
healthy (/health 200), idle (no running or waiting sequence, no KV block held, the engine
thread off the CPU) and exact (a greedy reference request answers as before). Heavy cases
run while another client streams, whose inter-token gaps must stay near one engine step.
A separate server with an injected fatal fault shows the loop dying cleanly."""
from __future__ import annotations

import json
import os
import socket
import threading
import time

import httpx
import pytest
from live_server import start_server, stop_server
from test_server import metric

MODEL = "SmolLM2-135M-Instruct"
FAULTY_SEED = 777001  # KVSERVE_FAULTS: sampling raises for this seed
FATAL_SEED = 777002  # KVSERVE_FAULTS: the step raises EngineFatalError for this seed
REF = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
HELLO = [{"role": "user", "content": "Hello!"}]


@pytest.fixture(scope="module")
def live(smol_llm, tmp_path_factory):  # smol_llm: the GGUF conversion is cached first
    proc, base, port, log = start_server(
        tmp_path_factory.mktemp("hostile"), "hostile", "--request-timeout", "15",
        "--body-read-timeout", "2", "--header-read-timeout", "2",
        "--max-waiting-requests", "256", faults=f"sample:{FAULTY_SEED}")
    ref_text = httpx.post(base + "/v1/completions", json=REF, timeout=60).json()["choices"][0]["text"]
    yield {"base": base, "port": port, "pid": proc.pid, "ref": ref_text}
    stop_server(proc)
    assert proc.returncode is not None


def post(base: str, path: str, body=None, raw: bytes | None = None, timeout: float = 60):
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(base + path, content=content, timeout=timeout,
                      headers={"Content-Type": "application/json"})


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def assert_healthy_idle_exact(live) -> None:
    base = live["base"]
    assert httpx.get(base + "/health").status_code == 200
    deadline = time.monotonic() + 10
    names = ("kvserve_num_requests_running", "kvserve_num_requests_waiting",
             "kvserve_kv_cache_blocks_in_use")
    while time.monotonic() < deadline and any(metric(base, n) for n in names):
        time.sleep(0.1)
    assert [metric(base, n) for n in names] == [0, 0, 0]
    r = httpx.post(base + "/v1/completions", json=REF, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == live["ref"]


def assert_error_shape(r, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text[:500]
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


def triton(path_tail: str = "generate") -> str:
    return f"/v2/models/{MODEL}/{path_tail}"


CHAT = "/v1/chat/completions"
CMPL = "/v1/completions"
NESTED_LOOPS = ("{% for i in range(10000) %}{% for j in range(10000) %}x{% endfor %}"
                "{% endfor %}")
# (case id, route, JSON body or raw bytes, status, param)
CASES = [
    ("top_k_2^63", CMPL, {"prompt": "hi", "temperature": 1, "top_k": 2**63}, 400, "top_k"),
    ("top_k_over_vocab", CMPL, {"prompt": "hi", "temperature": 1, "top_k": 10**6}, 400, "top_k"),
    ("temperature_huge_int", CMPL, {"prompt": "hi", "temperature": 10**400}, 400, "temperature"),
    ("repetition_penalty_1e400", CMPL, b'{"prompt": "hi", "repetition_penalty": 1e400}', 400,
     "repetition_penalty"),
    ("triton_parameters_top_k", triton(), {"text_input": "hi", "parameters": {"top_k": 2**63}},
     400, "top_k"),
    ("triton_parameters_temperature", triton(),
     {"text_input": "hi", "parameters": {"temperature": 10**400}}, 400, "temperature"),
    ("seed_2^64", CMPL, {"prompt": "hi", "seed": 2**64}, 400, "seed"),
    ("seed_plus_index_overflows", CMPL, {"prompt": "hi", "seed": 2**64 - 1, "n": 2}, 400, "seed"),
    ("n_1500", CMPL, {"prompt": "hi", "n": 1500, "max_tokens": 1}, 400, "n"),
    ("stop_10000x800", CMPL, {"prompt": "hi", "stop": ["s" * 799 + str(i % 10) for i in range(10000)]},
     400, "stop"),
    ("stop_too_long", CMPL, {"prompt": "hi", "stop": ["s" * 1025]}, 400, "stop"),
    ("temperature_nan", CMPL, b'{"prompt": "hi", "temperature": NaN}', 400, None),
    ("repetition_penalty_nan", CMPL, b'{"prompt": "hi", "repetition_penalty": NaN}', 400, None),
    ("temperature_infinity", CMPL, b'{"prompt": "hi", "temperature": Infinity}', 400, None),
    ("json_nested_1e5", CMPL, b'{"prompt": ' + b"[" * 100000 + b"]" * 100000 + b"}", 400, None),
    ("surrogate_prompt", CMPL, b'{"prompt": "\\ud800"}', 400, None),
    ("surrogate_echo", CMPL, b'{"prompt": "a\\udfff", "echo": true}', 400, None),
    ("surrogate_text_input", triton(), b'{"text_input": "\\ud800"}', 400, None),
    ("surrogate_model", CMPL, b'{"model": "\\ud800", "prompt": "hi"}', 400, None),
    ("user_without_content", CHAT, {"messages": [{"role": "user"}]}, 400, "messages"),
    ("content_part_without_text", CHAT, {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
     400, "messages"),
    ("chat_template_in_kwargs", CHAT, {"messages": HELLO,
                                       "chat_template_kwargs": {"chat_template": NESTED_LOOPS}},
     400, "chat_template"),
    ("chat_template_top_level", CHAT, {"messages": HELLO, "chat_template": NESTED_LOOPS}, 400,
     "chat_template"),
    ("template_kwarg_tokenize", CHAT, {"messages": HELLO, "chat_template_kwargs": {"tokenize": True}},
     400, "chat_template_kwargs"),
    ("prompt_7M_chars", CMPL, {"prompt": "x" * 7_000_000}, 400, "prompt"),
    ("chat_7M_chars", CHAT, {"messages": [{"role": "user", "content": "x" * 7_000_000}]}, 400,
     "messages"),
    ("triton_generate_n_3", triton(), {"text_input": "hi", "parameters": {"n": 3}}, 400, "n"),
    ("logprobs_21", CMPL, {"prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    ("max_tokens_2^63", CMPL, {"prompt": "hi", "max_tokens": 2**63}, 400, "max_tokens"),
    ("stop_token_ids_negative", CMPL, {"prompt": "hi", "stop_token_ids": [-1]}, 400,
     "stop_token_ids"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hostile_case(live, case):
    _, path, body, status, param = case
    if isinstance(body, dict) and path != triton():
        body = {"model": MODEL, "max_tokens": 4, **body}
    raw = body if isinstance(body, bytes) else None
    r = post(live["base"], path, None if raw else body, raw)
    assert_error_shape(r, status, param)
    assert_healthy_idle_exact(live)


def test_tiny_temperature_is_greedy(live):
    for t in (1e-50, 1e-6):
        r = post(live["base"], CMPL, {**REF, "temperature": t})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == live["ref"]


def test_unknown_routes_and_methods_are_json(live):
    assert_error_shape(httpx.get(live["base"] + "/v1/nothing"), 404)
    assert_error_shape(httpx.get(live["base"] + CMPL), 405)


def test_heavy_cases_do_not_stall_a_streaming_client(live):
    """A client streams while the heaviest cases arrive; its inter-token gaps are compared
    with its own median (one engine step): before the fixes an 8 MB prompt froze it ~5 s."""
    arrivals: list[float] = []
    reasons: list = []
    done = threading.Event()

    def stream():
        body = {"model": MODEL, "prompt": "Count to one hundred:", "max_tokens": 80,
                "temperature": 0, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", live["base"] + CMPL, json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data:") and not line.endswith("[DONE]"):
                    arrivals.append(time.monotonic())
                    reasons.append(json.loads(line[5:])["choices"][0]["finish_reason"])
        done.set()

    t = threading.Thread(target=stream)
    t.start()
    while len(arrivals) < 5:
        time.sleep(0.01)
    heavy = [c for c in CASES if c[0] in ("stop_10000x800", "prompt_7M_chars", "chat_7M_chars",
                                          "json_nested_1e5", "chat_template_in_kwargs",
                                          "n_1500")]
    for _, path, body, status, _ in heavy:
        raw = body if isinstance(body, bytes) else None
        assert post(live["base"], path, None if raw else {"model": MODEL, **body}, raw).status_code == status
    t.join(60)
    # (a late reader may get a few deltas merged into one chunk, so fewer than 80 chunks)
    assert done.is_set() and reasons[-1] == "length" and len(arrivals) > 40
    gaps = sorted(b - a for a, b in zip(arrivals, arrivals[1:]))
    median, worst = gaps[len(gaps) // 2], gaps[-1]
    print(f"streaming client: median gap {median * 1000:.0f} ms, worst {worst * 1000:.0f} ms")
    assert worst < max(1.0, 10 * median), (median, worst)
    assert_healthy_idle_exact(live)


def test_many_long_stop_strings_cost_other_sequences_nothing(live):
    """The most stop text a request may send (64 x 1024 chars, n=8) beside a plain request:
    both finish, and the plain one answers exactly."""
    stops = [f"{i:02d}" + "q" * 1022 for i in range(64)]
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 24, "n": 8,
            "temperature": 1.0, "seed": 3, "stop": stops}
    r = post(live["base"], CMPL, body)
    assert r.status_code == 200 and len(r.json()["choices"]) == 8
    assert_healthy_idle_exact(live)


def test_injected_sampling_fault_fails_alone(live):
    """One request made to fail inside the sampler: a 500 in JSON (or an error event when
    streamed); the requests sharing its steps answer exactly as they would alone."""
    prompts = ["The capital of France is", "One, two, three,", "Water boils at"]
    alone = [post(live["base"], CMPL, {**REF, "prompt": p}).json()["choices"][0]["text"]
             for p in prompts]
    results: dict = {}

    def good(i):
        results[i] = post(live["base"], CMPL, {**REF, "prompt": prompts[i], "max_tokens": 8})

    def bad():
        results["bad"] = post(live["base"], CMPL, {**REF, "seed": FAULTY_SEED, "max_tokens": 8})

    def bad_stream():
        body = {**REF, "seed": FAULTY_SEED, "stream": True}
        with httpx.stream("POST", live["base"] + CMPL, json=body, timeout=60) as r:
            results["bad_stream"] = (r.status_code, [line for line in r.iter_lines() if line])

    threads = [threading.Thread(target=good, args=(i,)) for i in range(3)]
    threads += [threading.Thread(target=bad), threading.Thread(target=bad_stream)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [results[i].json()["choices"][0]["text"] for i in range(3)] == alone
    err = assert_error_shape(results["bad"], 500)
    assert err["type"] == "internal_error" and "injected sampling fault" in err["message"]
    status, lines = results["bad_stream"]
    assert status == 200 and lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][5:])["error"]["type"] == "internal_error"
    assert_healthy_idle_exact(live)


def test_triton_stream_honours_the_deadline(live):
    body = {"text_input": "Count forever:", "parameters": {"max_tokens": 1000, "ignore_eos": True,
                                                             "temperature": 0}}
    t0 = time.monotonic()
    with httpx.stream("POST", live["base"] + triton("generate_stream"), json=body, timeout=60) as r:
        events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
    elapsed = time.monotonic() - t0
    assert elapsed < 45  # --request-timeout 15, where it used to stream past 60 s
    assert "deadline" in events[-1]["error"] and "text_output" in events[0]
    assert_healthy_idle_exact(live)


def test_slow_clients_get_408(live):
    # a body shorter than its Content-Length: answered 408 after --body-read-timeout (2 s)
    with socket.create_connection(("127.0.0.1", live["port"]), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"prompt\":")
        reply = s.recv(4096)
    assert reply.startswith(b"HTTP/1.1 408")
    # headers that never finish: cut after --header-read-timeout (2 s)
    with socket.create_connection(("127.0.0.1", live["port"]), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        t0 = time.monotonic()
        reply = s.recv(4096)
        assert time.monotonic() - t0 < 8 and (reply == b"" or reply.startswith(b"HTTP/1.1 408"))
    assert_healthy_idle_exact(live)


def test_engine_idle_after_everything(live):
    """Last in the module: after all of the above the engine thread is off the CPU (a leaked
    request used to keep it busy-looping at 60-100% forever)."""
    time.sleep(0.5)
    before = cpu_seconds(live["pid"])
    time.sleep(2.0)
    used = cpu_seconds(live["pid"]) - before
    assert used < 0.2, f"server used {used:.2f} s of CPU in 2 s while idle"


def test_fatal_fault_kills_the_loop_cleanly(smol_llm, tmp_path):
    """The loop dies: /health goes 503 within 1 s, the open stream ends with an error event,
    and the process exits non-zero within the grace period."""
    proc, base, _, log = start_server(tmp_path, "fatal", "--engine-death-grace", "1",
                                      faults=f"fatal:{FATAL_SEED}")
    try:
        lines: list[str] = []
        started = threading.Event()

        def stream():
            body = {**REF, "max_tokens": 500, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", base + CMPL, json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line:
                        lines.append(line)
                        started.set()

        t = threading.Thread(target=stream)
        t.start()
        assert started.wait(60)
        r = post(base, CMPL, {**REF, "seed": FATAL_SEED})
        died = time.monotonic()
        assert_error_shape(r, 503)
        health = httpx.get(base + "/health", timeout=5)
        assert health.status_code == 503 and time.monotonic() - died < 1.0
        t.join(30)
        assert lines[-1] == "data: [DONE]" and json.loads(lines[-2][5:])["error"]["type"] == "engine_dead"
        assert proc.wait(timeout=15) == 1  # a failure status, for supervisors to restart
    finally:
        if proc.poll() is None:
            stop_server(proc)
        log.seek(0)
        assert "injected fatal fault" in log.read()


def test_request_chat_template_only_when_trusted(smol_llm):
    from server import protocol as P

    body = {"messages": HELLO, "chat_template": "{{ messages[0]['content'] }}!"}
    with pytest.raises(P.APIError) as err:
        P.parse_chat(body, smol_llm.tokenizer)
    assert err.value.status == 400 and err.value.param == "chat_template"
    render = P.parse_chat(body, smol_llm.tokenizer, trust_request_template=True).prompts[0]
    assert render()["prompt"] == "Hello!!"
    long = {"messages": [{"role": "user", "content": "x" * 5000}]}
    with pytest.raises(P.APIError, match="max_prompt_chars"):
        P.parse_chat(long, smol_llm.tokenizer, max_chars=4000)
