"""Property-based fuzzing of a live `kvserve serve`, on a fixed budget.

(a) schemathesis, from the server's own /openapi.json, over every operation;
(b) hypothesis, hostile raw JSON bodies for /v1/completions, /v1/chat/completions and
    /v2/models/{model}/generate (NaN, 1e999, 2**64, lone surrogates, deep nesting, wrong types).

Properties: no status >= 500, every request answered within REQUEST_DEADLINE (streams read to
the end), and every non-2xx answer of /v1 and /v2 routes is OpenAI's error JSON. Afterwards the
server is healthy and idle (no running requests, every KV block free) and a greedy request
answers as it did before the fuzzing.

Replay: KVSERVE_FUZZ_SEED (default 20240611) and KVSERVE_FUZZ_EXAMPLES (examples per
schemathesis operation and mode; each raw-body endpoint gets RAW_FACTOR times as many).
Failures are collected (not shrunk) and reported per test, one line per distinct failure.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import httpx
import pytest

hypothesis = pytest.importorskip("hypothesis")
schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, example, given, settings  # noqa: E402
from hypothesis import seed as hypothesis_seed  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("KVSERVE_FUZZ_SEED", "20240611"))
EXAMPLES = int(os.environ.get("KVSERVE_FUZZ_EXAMPLES", "20"))
RAW_FACTOR = 10
REQUEST_DEADLINE = 30.0  # seconds per request, streams included; the server's own is 20 s
MEMORY_HEADROOM = 4 << 30  # server RSS above its start-up RSS that kills it (runaway allocation)
MAX_TOKENS = 8
KEY = "sk-fuzz-key"
MODEL = "SmolLM2-135M-Instruct"
AUTH = {"Authorization": f"Bearer {KEY}"}
REPLAY = f"replay with KVSERVE_FUZZ_SEED={SEED} KVSERVE_FUZZ_EXAMPLES={EXAMPLES}"
REFERENCE = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 8,
             "temperature": 0}


def _operations(doc: dict) -> tuple[list[str], set[str]]:
    """Every operation, as 'METHOD /path', and those with a body or parameters."""
    ops, with_inputs = [], set()
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method != "parameters":
                ops.append(f"{method.upper()} {path}")
                if "parameters" in item or "parameters" in op or "requestBody" in op:
                    with_inputs.add(ops[-1])
    return ops, with_inputs


def _documented() -> tuple[list[str], set[str]]:
    from server.openapi import openapi_document  # the live document is checked to match

    return _operations(openapi_document(MODEL, "0"))


OPERATIONS, WITH_INPUTS = _documented()
# negative mode (schema-violating cases) only where there is a body or a parameter to violate
SCHEMATHESIS_CASES = [(op, "positive") for op in OPERATIONS] + [
    (op, "negative") for op in OPERATIONS if op in WITH_INPUTS]


# ---- the live server ---------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    base: str
    proc: subprocess.Popen
    log_path: str
    reference_text: str = ""
    dead: str = ""  # set once the server died, hangs or was killed: the fuzzing stops

    def log_size(self) -> int:
        return os.path.getsize(self.log_path)

    def log_since(self, offset: int) -> str:
        with open(self.log_path, errors="replace") as f:
            f.seek(offset)
            return f.read()

    def alive(self) -> bool:
        """Running, healthy, and a 1-token completion answers within 10 s."""
        if self.proc.poll() is not None:
            return False
        try:
            return (httpx.get(self.base + "/health", timeout=10).status_code == 200
                    and httpx.post(self.base + "/v1/completions", headers=AUTH, timeout=10,
                                   json={"prompt": "Hi", "max_tokens": 1}).status_code == 200)
        except httpx.HTTPError:
            return False

    def check(self) -> None:
        if self.dead:
            pytest.fail(f"server unusable since an earlier request: {self.dead}", pytrace=False)


def _rss(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) << 10
    except OSError:
        pass
    return None


def _children(pid: int) -> list[int]:
    """Direct children of pid (Linux /proc; empty elsewhere)."""
    out = []
    for stat in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not stat.isdigit():
            continue
        try:
            with open(f"/proc/{stat}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[1] == str(pid):
            out.append(int(stat))
    return out


def _memory_watchdog(srv: Server, limit: int, stop: threading.Event) -> None:
    """Kill a server whose memory runs away (say, a request for 2**64 sequences) before it
    takes the machine down with it; the fuzzing then fails with the reason."""
    while not stop.wait(0.2):
        rss = _rss(srv.proc.pid)
        if rss is None:
            return
        if rss > limit:
            srv.dead = (f"killed by the test's watchdog: server RSS {rss / 2 ** 30:.1f} GiB over "
                        f"its {limit / 2 ** 30:.1f} GiB limit (runaway allocation)")
            srv.proc.kill()
            return


@pytest.fixture(scope="module")
def server(smol_llm, tmp_path_factory, request):  # smol_llm: the GGUF conversion is cached first
    budget = (f"kvserve fuzz: seed={SEED}, {EXAMPLES} examples per schemathesis operation and "
              f"mode, {RAW_FACTOR * EXAMPLES} per raw-body endpoint, max_tokens <= {MAX_TOKENS} "
              f"(KVSERVE_FUZZ_SEED / KVSERVE_FUZZ_EXAMPLES)")
    terminal = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if terminal is not None and capture is not None:  # shown even when output is captured
        with capture.global_and_fixture_disabled():
            terminal.write_line("\n" + budget)
    else:
        print(budget)
    port = free_port()
    log_path = str(tmp_path_factory.mktemp("fuzz") / "server.log")
    # One OpenMP thread (unless set): the fuzzing checks input handling, not kernel speed, and
    # two spinning OpenMP threads on a busy 2-core machine make a request 5-10x slower.
    env = {"OMP_NUM_THREADS": "1", **os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--api-key", KEY,
             "--log-level", "warning", "--max-num-seqs", "16", "--dtype", "float32",
             "--max-model-len", "512", "--request-timeout", "20", "--grpc-port", "0"],
            stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
    srv = Server(f"http://127.0.0.1:{port}", proc, log_path)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited: {srv.log_since(0)[-4000:]}")
        try:
            if httpx.get(srv.base + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    else:
        proc.kill()
        proc.wait()
        pytest.fail("server did not become healthy")
    srv.reference_text = greedy_reference(srv.base)
    stop = threading.Event()
    rss = _rss(proc.pid)
    if rss is not None:  # Linux: RSS after start-up plus MEMORY_HEADROOM
        threading.Thread(target=_memory_watchdog, args=(srv, rss + MEMORY_HEADROOM, stop),
                         daemon=True).start()
    yield srv
    stop.set()
    children = _children(proc.pid)
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail("server did not exit within 30 s of SIGTERM (killed)")
    deadline = time.monotonic() + 10
    while (left := [c for c in children if os.path.exists(f"/proc/{c}")]) and \
            time.monotonic() < deadline:
        time.sleep(0.2)
    for c in left:
        os.kill(c, 9)
    assert not left, f"server child processes outlived it: {left}"


def greedy_reference(base: str) -> str:
    r = httpx.post(base + "/v1/completions", json=REFERENCE, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def metrics(base: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(base + "/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


# ---- sending one request and checking the properties ---------------------------------------
@dataclass
class Failure:
    key: tuple
    route: str
    problem: str
    request: str
    status: int | None
    excerpt: str
    server_error: str
    size: int = 0  # length of the whole request, to keep the shortest example
    count: int = 1
    first: str = ""  # the first request that showed it (later ones may be knock-on effects)

    def line(self) -> str:
        status = "" if self.problem.startswith("status") else f" (status {self.status})"
        where = f"\n    server:   {self.server_error}" if self.server_error else ""
        first = f"\n    first:    {self.first}" if self.first and self.first != self.request else ""
        return (f"[{self.count}x] {self.route}: {self.problem}{status}\n"
                f"    request:  {self.request}{first}\n    response: {self.excerpt}{where}")


@dataclass
class Failures:
    """Distinct failures, keyed by route, problem and the server's exception; keeps the
    shortest request that showed each."""
    items: dict = field(default_factory=dict)

    def add(self, f: Failure) -> None:
        old = self.items.get(f.key)
        if old is None:
            self.items[f.key] = f
            f.first = f.request
            return
        old.count += 1
        if f.size < old.size:
            old.request, old.excerpt, old.status, old.size = f.request, f.excerpt, f.status, f.size

    def report(self, title: str) -> str:
        lines = [f"{title}: {len(self.items)} distinct failure(s); {REPLAY}"]
        lines += [f.line() for f in self.items.values()]
        return "\n".join(lines)


ALL_FAILURES = Failures()  # every test's failures, for the summary at the end
STATS: dict = {}  # route -> status -> [seconds], printed at the end


def server_exception(log: str) -> str:
    """'File ..., line N, in f: ExcType: message' of the last traceback in a log excerpt."""
    last, where, in_tb = "", "", False
    for line in log.splitlines():
        if line.startswith("Traceback"):
            in_tb, where = True, ""
        elif in_tb and line.startswith("  File "):
            where = line.strip()
        elif in_tb and line and not line.startswith(" ") and not line.startswith(
                ("During handling", "The above exception")):
            last = f"{where}: {line.strip()}"[:300]
            in_tb = False
    return last


def _error_message(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body[:120].decode("utf-8", "replace")


def _kserve_route(route: str) -> bool:
    """KServe v2 routes answer errors as {"error": "message"}; the generate extension as
    OpenAI does."""
    return route.startswith("/v2") and not route.endswith(("/generate", "/generate_stream"))


def _v2_shape_problem(body: bytes) -> str | None:
    try:
        data = json.loads(body)
    except ValueError:
        return "error body is not JSON"
    if not isinstance(data, dict) or not isinstance(data.get("error"), str) or len(data) != 1:
        return "error body is not {\"error\": message}"
    return None


def _shape_problem(body: bytes) -> str | None:
    try:
        data = json.loads(body)
    except ValueError:
        return "error body is not JSON"
    err = data.get("error") if isinstance(data, dict) else None
    if not isinstance(err, dict):
        return "error body lacks an 'error' object"
    if not isinstance(err.get("message"), str) or not isinstance(err.get("type"), str):
        return "error.message / error.type not strings"
    for k in ("param", "code"):
        if k not in err or not (err[k] is None or isinstance(err[k], str)):
            return f"error.{k} missing or not string|null"
    return None


# error types that mean a 5xx (the server's fault or state), wherever they show up
SERVER_SIDE_ERRORS = {"internal_error", "server_error", "timeout_error", "engine_dead",
                      "server_overloaded"}


def _stream_problem(route: str, body: bytes) -> str | None:
    """SSE body of a 200: every data event JSON (or [DONE]); /v1 streams end with [DONE];
    an error event must be the error shape and no 5xx-kind error (timeout, dead engine)."""
    events = [line[5:].strip() for line in body.decode("utf-8", "replace").splitlines()
              if line.startswith("data:")]
    for data in events:
        if data == "[DONE]":
            continue
        try:
            chunk = json.loads(data)
        except ValueError:
            return "stream event is not JSON"
        if isinstance(chunk, dict) and "error" in chunk:
            problem = _shape_problem(data.encode())
            if problem:
                return "stream " + problem
            if chunk["error"]["type"] in SERVER_SIDE_ERRORS:
                return f"stream error event of type {chunk['error']['type']}"
    if route.startswith("/v1/") and (not events or events[-1] != "[DONE]"):
        return "stream does not end with [DONE]"
    return None


def _abbrev(request: str, limit: int = 400) -> str:
    return request if len(request) <= limit else request[:limit] + f"... ({len(request)} chars)"


def send(srv: Server, client: httpx.Client, failures: Failures, route: str, method: str,
         url: str, *, headers: dict, content: bytes | None, shown: str) -> int | None:
    """One request, read to the end within REQUEST_DEADLINE; records any broken property.
    Returns the status (None when no response came, or the server is gone)."""
    if srv.dead:
        return None
    offset = srv.log_size()
    start = time.monotonic()
    status, problem, chunks, ctype = None, None, [], ""
    try:
        with client.stream(method, url, headers=headers, content=content,
                           timeout=httpx.Timeout(REQUEST_DEADLINE)) as r:
            status, ctype = r.status_code, r.headers.get("content-type", "")
            for chunk in r.iter_bytes():
                chunks.append(chunk)
                if time.monotonic() - start > REQUEST_DEADLINE:
                    problem = f"no complete answer within {REQUEST_DEADLINE:.0f} s"
                    break
    except (httpx.LocalProtocolError, httpx.UnsupportedProtocol, httpx.InvalidURL,
            UnicodeEncodeError) as e:
        if status is None:  # the client could not even send it: not the server's doing
            return None
        problem = f"response broken: {type(e).__name__}: {e}"
    except httpx.TimeoutException:
        problem = f"no complete answer within {REQUEST_DEADLINE:.0f} s"
    except httpx.HTTPError as e:
        problem = f"response broken: {type(e).__name__}: {e}"
    body = b"".join(chunks)
    STATS.setdefault(route, {}).setdefault(status, []).append(time.monotonic() - start)
    if os.environ.get("KVSERVE_FUZZ_VERBOSE"):
        print(f"{status} {time.monotonic() - start:6.2f}s {method} {_abbrev(shown, 300)}")
    if problem is None and status is not None:
        if status >= 500:
            problem = f"status {status}"
        elif status >= 400 and route.startswith(("/v1/", "/v2")):
            problem = (_v2_shape_problem(body) if _kserve_route(route) else _shape_problem(body))
        elif status < 300 and "text/event-stream" in ctype:
            problem = _stream_problem(route, body)
    if problem is None:
        return status
    time.sleep(0.05)  # let the server finish logging the exception
    exc = server_exception(srv.log_since(offset))
    detail = exc.split(": ", 1)[-1] if exc else _error_message(body)
    key = (route, re.sub(r"\d+", "N", problem),
           re.sub(r"\d+", "N", detail)[:120])  # digits: positions, sizes
    failure = Failure(key, route, problem, _abbrev(shown), status,
                      body[:300].decode("utf-8", "replace"), exc, len(shown))
    failures.add(failure)
    ALL_FAILURES.add(Failure(**{**failure.__dict__, "count": 1}))
    if (status in (None, 503, 504) or problem.startswith("no complete")) and not srv.alive():
        srv.dead = srv.dead or (f"the server died or stopped answering after {method} {url} "
                                f"{_abbrev(shown)}; exit status {srv.proc.poll()}")
    return status


def cap_body(body):
    """Keep generation cheap whatever the generator made: max_tokens <= MAX_TOKENS and always
    set (chat's default is the rest of the context), max_completion_tokens likewise."""
    if not isinstance(body, dict):
        return body
    body = dict(body)
    for name in ("max_tokens", "max_completion_tokens"):
        v = body.get(name)
        if isinstance(v, int) and not isinstance(v, bool) and v > MAX_TOKENS:
            body[name] = MAX_TOKENS
    if body.get("max_tokens") is None:
        body["max_tokens"] = MAX_TOKENS
    params = body.get("parameters")
    if "inputs" in body and isinstance(params, dict):  # KServe v2 infer: sampling lives here
        v = params.get("max_tokens")
        if not isinstance(v, int) or isinstance(v, bool) or v > MAX_TOKENS:
            body["parameters"] = {**params, "max_tokens": MAX_TOKENS}
    return body


FUZZ_SETTINGS = dict(database=None, deadline=None, derandomize=False, print_blob=False,
                     phases=[Phase.explicit, Phase.generate],  # failures are collected, not shrunk
                     suppress_health_check=list(HealthCheck))


# ---- (a) schemathesis, from the live /openapi.json ---------------------------------------
def fuzz_schema(doc: dict) -> dict:
    """The live document, narrowed for speed and focus (the served document is not changed):
    request objects flattened (allOf) and closed, so generation spends its budget on fields the
    server reads; max_tokens/max_completion_tokens/min_tokens <= 8 and n <= 4; prompts and
    messages at most 4 entries; `model` (body and path) fixed to the served model. Negative
    mode still generates values outside all of these."""
    schemas = doc["components"]["schemas"]

    def resolve(s: dict) -> dict:
        return schemas[s["$ref"].rsplit("/", 1)[1]] if "$ref" in s else s

    for name in ("CompletionRequest", "ChatRequest", "TritonGenerateRequest"):
        parts = [resolve(p) for p in schemas[name]["allOf"]]
        props, required = {}, []
        for p in parts:
            props.update(json.loads(json.dumps(p.get("properties", {}))))
            required += p.get("required", [])
        for prop, limit in (("max_tokens", MAX_TOKENS), ("max_completion_tokens", MAX_TOKENS),
                            ("min_tokens", MAX_TOKENS), ("n", 4)):
            if prop in props:
                props[prop]["maximum"] = limit
        if "model" in props:
            props["model"] = {"type": "string", "enum": [MODEL]}
        if "messages" in props:
            props["messages"]["maxItems"] = 4
        schemas[name] = {"type": "object", "required": required, "properties": props,
                         "additionalProperties": False}
    schemas["ChatMessage"]["additionalProperties"] = False
    for variant in schemas["Prompt"]["oneOf"]:
        if variant["type"] == "array":
            variant["maxItems"] = 4
    for path in doc["paths"].values():
        for param in path.get("parameters", []):
            if param["name"] == "model":
                param["schema"] = {"type": "string", "enum": [MODEL]}
            if param["name"] == "version":
                param["schema"] = {"type": "string", "enum": ["1"]}
    return doc


@pytest.fixture(scope="module")
def live_schema(server):
    r = httpx.get(server.base + "/openapi.json", timeout=10)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["openapi"].startswith("3.0")
    served, with_inputs = _operations(doc)
    assert (served, with_inputs) == (OPERATIONS, WITH_INPUTS)
    assert sorted(served) == sorted([  # every route of server/app.py, documented
        "POST /v1/completions", "POST /v1/chat/completions", "GET /v1/models", "GET /health",
        "POST /tokenize", "POST /detokenize", "POST /v1/load_lora_adapter",
        "POST /v1/unload_lora_adapter",
        "GET /metrics", "GET /version", "GET /v2", "GET /v2/health/live",
        "GET /v2/health/ready", "POST /v2/repository/index",
        *(f"{method} {base}{tail}" for base in ("/v2/models/{model}",
                                                "/v2/models/{model}/versions/{version}")
          for method, tail in (("GET", ""), ("GET", "/ready"), ("GET", "/config"),
                               ("GET", "/stats"), ("POST", "/infer"))),
        "GET /v2/models/stats",
        "POST /v2/models/{model}/generate", "POST /v2/models/{model}/generate_stream",
        "POST /v2/models/{model}/versions/{version}/generate",
        "POST /v2/models/{model}/versions/{version}/generate_stream",
        "POST /v2/repository/models/{model}/load", "POST /v2/repository/models/{model}/unload",
        "GET /v2/repository/models/{model}/traffic", "PUT /v2/repository/models/{model}/traffic",
        "GET /openapi.json"])
    schema = schemathesis.openapi.from_dict(fuzz_schema(doc))
    schema.validate()  # the narrowed copy is still valid OpenAPI
    schemathesis.openapi.from_dict(r.json()).validate()  # and so is the served document
    return schema


@pytest.mark.parametrize(("label", "mode"), SCHEMATHESIS_CASES)
def test_schemathesis(server, live_schema, label, mode):
    from schemathesis import GenerationMode

    method, path = label.split(" ", 1)
    operation = live_schema[path][method]
    server.check()
    failures = Failures()
    client = httpx.Client()
    count = [0]

    @hypothesis_seed(SEED)
    @settings(max_examples=EXAMPLES, **FUZZ_SETTINGS)
    @given(case=operation.as_strategy(generation_mode=GenerationMode(mode)))
    def run(case):
        kwargs = case.as_transport_kwargs(base_url=server.base, headers=AUTH)
        headers = {**kwargs.get("headers", {}), **AUTH}
        headers.pop("X-Schemathesis-TestCaseId", None)
        if "json" in kwargs:
            body = cap_body(kwargs["json"])
            content = json.dumps(body).encode()  # NaN/Infinity pass as JSON's relaxed spelling
            headers["Content-Type"] = "application/json"
            shown = json.dumps(body, ensure_ascii=True)
        elif kwargs.get("data") is not None:
            data = kwargs["data"]
            content = data if isinstance(data, bytes) else str(data).encode()
            shown = repr(content)
        else:
            content, shown = None, ""
        url = kwargs["url"]
        if kwargs.get("params"):
            url = str(httpx.URL(url).copy_merge_params(kwargs["params"]))
        if server.dead:
            return
        count[0] += 1
        send(server, client, failures, path, method, url, headers=headers, content=content,
             shown=f"{url} {shown}")

    try:
        run()
    finally:
        client.close()
    if failures.items or server.dead:
        pytest.fail(f"{server.dead}\n" * bool(server.dead)
                    + failures.report(f"{label} ({mode}, {count[0]} requests)"), pytrace=False)


# ---- (b) hostile raw JSON, straight from hypothesis ---------------------------------------
HUGE_INTS = [2 ** 31, 2 ** 53 + 1, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1, 2 ** 64, 2 ** 100,
             -2 ** 63, -2 ** 63 - 1, -2 ** 64, 10 ** 400, -1, 0, 1, 129, 1025, 49152]
RAW_NUMBERS = ["NaN", "Infinity", "-Infinity", "1e308", "-1e308", "1e999", "-1e999", "-0.0",
               "-0", "5e-324", "1e-400", "1e-5", "0.000009", "1.0", "0.5", "100.0", "100.5",
               "1E400", "123456789012345678901234567890", "2.0", "-2.0000001"]
RAW_STRINGS = ['"\\ud800"', '"\\udfff"', '"a\\ud800b"', '"\\udbff\\udbff"', '"\\u0000"',
               '"\\ufffe"', '""', '" "', '"\\n"', '"text"', '"</s>"', '"<|im_end|>"',
               '"<|im_start|>"', '"NaN"', '"1"', '"' + "x" * 5000 + '"',
               '"' + "\\ud83d\\ude00" * 50 + '"']
KNOWN_FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens",
                "temperature", "top_p", "top_k", "min_p", "n", "seed", "presence_penalty",
                "frequency_penalty", "repetition_penalty", "stop", "stop_token_ids", "ignore_eos",
                "min_tokens", "logprobs", "top_logprobs", "echo", "stream", "stream_options",
                "skip_special_tokens", "include_stop_str_in_output", "add_generation_prompt",
                "chat_template_kwargs", "text_input", "parameters", "stop_words",
                "include_usage", "role", "content", "type", "text", "prompt_logprobs"]


def _array(items: list[str]) -> str:
    return "[" + ",".join(items) + "]"


def _object(pairs: dict[str, str]) -> str:
    return "{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in pairs.items()) + "}"


def _nested(depth: int, inner: str = "") -> str:
    return "[" * depth + inner + "]" * depth


_any_chars = st.characters(codec=None, exclude_categories=())  # lone surrogates included
DEEP = [_nested(d) for d in (100, 999, 1001, 5000, 100_000)] + [
    '{"a":' * d + "1" + "}" * d for d in (1000, 100_000)] + [_nested(5000, '"x"')]
raw_leaf = st.one_of(
    st.sampled_from(RAW_NUMBERS + RAW_STRINGS + DEEP + ["null", "true", "false", "[]", "{}",
                                                        "[[]]"]),
    st.sampled_from(HUGE_INTS).map(str),
    st.integers().map(str),
    st.floats().map(json.dumps),  # json.dumps spells nan/inf as NaN/Infinity
    st.text(_any_chars, max_size=20).map(json.dumps),  # surrogates as \udXXX escapes
)
raw_value = st.recursive(
    raw_leaf,
    lambda kids: st.one_of(
        st.lists(kids, max_size=4).map(_array),
        st.dictionaries(st.one_of(st.sampled_from(KNOWN_FIELDS), st.text(_any_chars, max_size=8)),
                        kids, max_size=4).map(_object)),
    max_leaves=8)


def _ints(*extra) -> st.SearchStrategy[str]:
    return st.one_of(st.integers(-3, 40), st.sampled_from(HUGE_INTS + list(extra))).map(str)


_small_ids = st.one_of(st.integers(0, 49151), st.sampled_from(HUGE_INTS)).map(str)
_token_ids = st.lists(_small_ids, max_size=6).map(_array)
_text = st.one_of(st.sampled_from(RAW_STRINGS), st.text(_any_chars, max_size=30).map(json.dumps))
_message = st.dictionaries(
    st.sampled_from(["role", "content", "name"]),
    st.one_of(st.sampled_from(['"user"', '"system"', '"assistant"', '"tool"', '"developer"']),
              _text,
              st.lists(st.dictionaries(st.sampled_from(["type", "text"]),
                                       st.one_of(st.just('"text"'), _text, raw_value),
                                       max_size=2).map(_object), max_size=3).map(_array),
              raw_value),
    max_size=3).map(_object)

# field -> plausible-but-hostile raw JSON values (mixed with fully arbitrary ones below)
FIELD_VALUES: dict[str, st.SearchStrategy[str]] = {
    "prompt": st.one_of(_text, st.lists(_text, max_size=4).map(_array), _token_ids,
                        st.lists(_token_ids, max_size=3).map(_array)),
    "messages": st.one_of(st.lists(_message, max_size=3).map(_array),
                          st.just('[{"role":"user","content":"Hi"}]')),
    "temperature": st.one_of(st.sampled_from(RAW_NUMBERS), st.floats(-1, 200).map(json.dumps)),
    "top_p": st.sampled_from(RAW_NUMBERS),
    "min_p": st.sampled_from(RAW_NUMBERS),
    "presence_penalty": st.sampled_from(RAW_NUMBERS),
    "frequency_penalty": st.sampled_from(RAW_NUMBERS),
    "repetition_penalty": st.one_of(st.sampled_from(RAW_NUMBERS + ["0.01", "0.009"]),
                                    st.floats(0, 200).map(json.dumps)),
    "top_k": _ints(49153, 10 ** 9),
    "n": _ints(128),
    "seed": _ints(2 ** 64 - 1, 2 ** 64),
    "min_tokens": _ints(),
    "logprobs": st.one_of(_ints(20, 21), st.sampled_from(["true", "false"])),
    "top_logprobs": _ints(20, 21),
    "stop": st.one_of(_text, st.lists(_text, max_size=4).map(_array),
                      st.integers(1, 80).map(lambda k: _array(['"s"'] * k)),
                      st.just(json.dumps("x" * 1025))),
    "stop_token_ids": st.one_of(_token_ids, st.integers(0, 1100).map(lambda k: _array(["2"] * k))),
    "stream_options": st.one_of(st.just('{"include_usage":true}'), raw_value),
    "chat_template_kwargs": st.one_of(
        st.sampled_from(['{"add_generation_prompt":"x"}', '{"tokenize":true}',
                         '{"messages":1}', '{"return_dict":true}', '{"enable_thinking":false}',
                         '{"tools":[{"x":1}]}', '{"continue_final_message":true}']),
        raw_value),
    "parameters": st.dictionaries(st.sampled_from(KNOWN_FIELDS), raw_value,
                                  max_size=5).map(_object),
    "model": st.one_of(st.just(json.dumps(MODEL)), _text),
    "text_input": _text,
}
_bool_fields = ["ignore_eos", "echo", "stream", "skip_special_tokens",
                "include_stop_str_in_output", "add_generation_prompt", "stop_words"]
_small_max = st.one_of(st.integers(-2, MAX_TOKENS).map(str),
                       st.sampled_from(["null", "1.5", '"8"', "true", "NaN", "[]"]))


def _field_value(name: str) -> st.SearchStrategy[str]:
    plausible = FIELD_VALUES.get(name)
    if plausible is None and name in _bool_fields:
        plausible = st.sampled_from(["true", "false"])
    return raw_value if plausible is None else st.one_of(plausible, plausible, raw_value)


@st.composite
def hostile_body(draw, required: dict[str, str], optional: list[str]) -> bytes:
    """A JSON object text: the required fields (usually plausible), a random subset of the
    known fields with hostile values, and max_tokens always a small int (generation stays
    cheap); sometimes a non-object or broken body instead."""
    if draw(st.integers(0, 15)) == 0:
        return draw(st.one_of(
            st.one_of(raw_value, st.sampled_from(
                ["", "{", "{}", "[]", "null", "NaN", '"x"', "\ufeff{}", '{"prompt": "a" "b"}',
                 "{'prompt': 'x'}"])).map(lambda t: t.encode("utf-8", "surrogatepass")),
            st.binary(max_size=40),
            st.just(b'{"prompt": "\xff\xfe", "text_input": "\xc3"}')))
    pairs = {}
    for name, value in required.items():  # mostly plausible, so requests get past them
        roll = draw(st.integers(0, 19))
        if roll:
            pairs[name] = draw(value if roll > 3 else _field_value(name))
    for name in draw(st.lists(st.sampled_from(optional), unique=True, max_size=8)):
        pairs[name] = draw(_field_value(name))
    if "max_completion_tokens" in pairs:
        pairs["max_completion_tokens"] = draw(_small_max)
    pairs["max_tokens"] = str(draw(st.integers(1, MAX_TOKENS)))
    return _object(pairs).encode("utf-8", "surrogatepass")


_sampling = ["temperature", "top_p", "top_k", "min_p", "n", "seed", "presence_penalty",
             "frequency_penalty", "repetition_penalty", "stop", "stop_token_ids", "ignore_eos",
             "min_tokens", "skip_special_tokens", "include_stop_str_in_output", "stream",
             "stream_options", "prompt_logprobs", "model"]
RAW_ENDPOINTS = {
    "/v1/completions": (
        {"model": st.just(json.dumps(MODEL)), "prompt": FIELD_VALUES["prompt"]},
        _sampling + ["logprobs", "echo"]),
    "/v1/chat/completions": (
        {"model": st.just(json.dumps(MODEL)), "messages": FIELD_VALUES["messages"]},
        _sampling + ["logprobs", "top_logprobs", "max_completion_tokens",
                     "add_generation_prompt", "chat_template_kwargs", "echo"]),
    "/v2/models/{model}/generate": (
        {"text_input": FIELD_VALUES["text_input"]},
        _sampling + ["parameters", "stop_words"]),
}


def known_hostile(route: str) -> list[bytes]:
    """Bodies always sent (hypothesis' explicit phase), whatever the seed."""
    base = {"/v1/completions": '"prompt":"Hi"',
            "/v1/chat/completions": '"messages":[{"role":"user","content":"Hi"}]',
            "/v2/models/{model}/generate": '"text_input":"Hi"'}[route]
    text_field = {"/v1/completions": "prompt", "/v1/chat/completions": "messages",
                  "/v2/models/{model}/generate": "text_input"}[route]
    lone = ('[{"role":"user","content":"\\ud800"}]' if text_field == "messages"
            else '"\\ud800"')
    bodies = [_nested(100_000), '{"a":' * 100_000 + "1" + "}" * 100_000,
              "{" + base + ',"max_tokens":1,"seed":' + _nested(100_000) + "}",
              f'{{"{text_field}":{lone},"max_tokens":1}}',
              "{" + base + ',"model":"\\ud800","max_tokens":1}',
              "{" + base + ',"max_tokens":1,"stop":"\\ud800"}',
              "{" + base + ',"max_tokens":1,"temperature":NaN}',
              "{" + base + ',"max_tokens":1,"top_p":Infinity,"min_p":-Infinity}',
              "{" + base + ',"max_tokens":1,"temperature":1e999}',
              "{" + base + ',"max_tokens":1,"n":18446744073709551616}',
              "{" + base + ',"max_tokens":1,"seed":18446744073709551616}',
              "{" + base + ',"max_tokens":1,"top_k":1000000000}',
              "{" + base + ',"max_tokens":1,"stop":' + _array(['"s"'] * 65) + "}",
              "{" + base + ',"max_tokens":1,"stop_token_ids":[18446744073709551616]}',
              "{" + base + ',"max_tokens":1,"pad":"' + "x" * (9 << 20) + '"}']  # > 8 MiB
    return [body.encode() for body in bodies]


@pytest.mark.parametrize("route", list(RAW_ENDPOINTS))
def test_hostile_json(server, route):
    required, optional = RAW_ENDPOINTS[route]
    url = server.base + route.replace("{model}", MODEL)
    server.check()
    failures = Failures()
    client = httpx.Client()
    count = [0]

    @hypothesis_seed(SEED)
    @settings(max_examples=RAW_FACTOR * EXAMPLES, **FUZZ_SETTINGS)
    @given(body=hostile_body(required, optional),
           auth=st.sampled_from([AUTH] * 12 + [{}, {"Authorization": "Bearer"},
                                               {"Authorization": "bearer " + KEY + "x"}]))
    def run(body, auth):
        if server.dead:
            return
        count[0] += 1
        send(server, client, failures, route, "POST", url,
             headers={**auth, "Content-Type": "application/json"}, content=body,
             shown=body.decode("utf-8", "surrogateescape"))

    for body in known_hostile(route):
        run = example(body=body, auth=AUTH)(run)
    try:
        run()
    finally:
        client.close()
    if failures.items or server.dead:
        pytest.fail(f"{server.dead}\n" * bool(server.dead)
                    + failures.report(f"POST {route} ({count[0]} raw bodies)"), pytrace=False)


# ---- afterwards: healthy, idle, unchanged ------------------------------------------------
def test_server_healthy_idle_and_unchanged_after_fuzzing(server):
    print(f"\nkvserve fuzz: requests by route and status ({REPLAY}):")
    for route, by_status in STATS.items():
        counts = {s: len(t) for s, t in sorted(by_status.items(), key=lambda kv: str(kv[0]))}
        slowest = max(t for ts in by_status.values() for t in ts)
        print(f"  {route}: {counts}, slowest {slowest:.2f} s")
    server.check()
    assert server.proc.poll() is None, "server died during the fuzzing"
    assert httpx.get(server.base + "/health", timeout=10).status_code == 200
    deadline = time.monotonic() + 30  # aborted requests wind down within a step or two
    while True:
        m = metrics(server.base)
        idle = (m.get("kvserve_num_requests_running") == 0
                and m.get("kvserve_num_requests_waiting") == 0
                and m.get("kvserve_kv_cache_blocks_in_use") == 0)
        if idle or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert m.get("kvserve_engine_alive") == 1
    assert m.get("kvserve_num_requests_running") == 0, m
    assert m.get("kvserve_num_requests_waiting") == 0, m
    assert m.get("kvserve_kv_cache_blocks_in_use") == 0, "KV blocks not all free after fuzzing"
    assert m.get("kvserve_kv_cache_usage_perc") == 0
    assert greedy_reference(server.base) == server.reference_text


def test_server_log_has_no_unhandled_exceptions(server):
    """Every exception the fuzzing provoked in the server (500s and broken streams alike)."""
    records = re.split(r"(?m)^(?=\d{4}-\d\d-\d\d |[A-Z]+: )", server.log_since(0))
    errors = sorted({server_exception(r) for r in records if "Traceback" in r})
    if errors:
        summary = ALL_FAILURES.report("all fuzz tests") if ALL_FAILURES.items else ""
        pytest.fail(f"{len(errors)} distinct server exception(s) ({REPLAY}):\n  "
                    + "\n  ".join(errors) + "\n\n" + summary, pytrace=False)
