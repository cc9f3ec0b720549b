"""bench/serving.py against a tiny fake OpenAI server (no model), and bench/plot.py on its
results. The fake streams a fixed number of chunks with small sleeps, over real HTTP (uvicorn
in a thread): httpx's ASGITransport buffers whole responses, which would hide the timing."""
from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import socket
import sys
import threading
import time

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
MODEL = "fake-model"
TOKEN_SLEEP = 0.004


def load_script(name: str):
    """bench/ is scripts, not a package: import one by path (registered, for dataclasses)."""
    key = f"bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, os.path.join(BENCH, name + ".py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


def fake_app() -> Starlette:
    async def generate(request: Request, chat: bool):
        body = await request.json()
        if body.get("model") != MODEL:
            return JSONResponse({"error": {"message": "no such model", "type": "invalid_request_error",
                                           "param": "model", "code": "model_not_found"}},
                                status_code=404)
        n = body["max_completion_tokens" if chat else "max_tokens"]
        assert body["stream"] and body["ignore_eos"]
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]

        def chunk(choices, usage=None):
            return "data: " + json.dumps({"id": "x", "object": "chunk", "model": MODEL,
                                          "choices": choices, "usage": usage}) + "\n\n"

        async def events():
            if chat:  # OpenAI sends the role first with empty content: not a token
                yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}}])
            for i in range(n):
                await asyncio.sleep(TOKEN_SLEEP)
                text = f" t{i}"
                yield chunk([{"index": 0, "delta": {"content": text}} if chat else
                             {"index": 0, "text": text, "finish_reason": None}])
            yield ": ping\n\n"
            if body.get("stream_options", {}).get("include_usage"):
                yield chunk([], {"prompt_tokens": len(prompt.split()), "completion_tokens": n,
                                 "total_tokens": len(prompt.split()) + n})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def completions(request):
        return await generate(request, chat=False)

    async def chat(request):
        return await generate(request, chat=True)

    return Starlette(routes=[Route("/v1/completions", completions, methods=["POST"]),
                             Route("/v1/chat/completions", chat, methods=["POST"])])


@pytest.fixture(scope="module")
def fake_server():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(fake_app(), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started, "fake server did not start"
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=5)
    sock.close()


def run_bench(base: str, tmp_path, name: str, *extra: str) -> dict:
    serving = load_script("serving")
    out = tmp_path / f"{name}.json"
    rc = serving.main(["--base-url", base + "/v1", "--model", MODEL, "--num-prompts", "8",
                       "--random-input-len", "16", "--random-output-len", "6",
                       "--tokenizer-free", "--output", str(out), *extra])
    result = json.loads(out.read_text())
    assert rc == (0 if result["completed"] else 1)
    return result


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_serving_against_fake_server(fake_server, tmp_path, capsys, endpoint):
    r = run_bench(fake_server, tmp_path, endpoint, "--max-concurrency", "4", "--endpoint", endpoint)
    assert json.loads(capsys.readouterr().out) == r  # stdout carries the same JSON
    assert r["completed"] == 8 and r["failed"] == 0 and not r["interrupted"]
    assert r["total_output_tokens"] == 8 * 6 and r["output_tokens_from_usage"] == 8
    assert r["total_input_tokens"] == 8 * 16  # the fake counts words; prompts are 16 words
    assert r["settings"]["max_concurrency"] == 4 and r["settings"]["endpoint"] == endpoint
    ttft, tpot, itl, e2e = r["ttft_ms"], r["tpot_ms"], r["itl_ms"], r["e2e_ms"]
    assert ttft["median"] >= TOKEN_SLEEP * 1000 * 0.5
    assert tpot["mean"] >= TOKEN_SLEEP * 1000 * 0.5 and itl["median"] > 0
    assert 0 < ttft["median"] <= ttft["p99"] and e2e["mean"] > ttft["mean"]
    assert r["output_throughput"] > 0 and r["request_throughput"] > 0
    assert r["total_token_throughput"] > r["output_throughput"]
    assert 0 < r["duration_s"] < 30


def test_serving_counts_failures(fake_server, tmp_path):
    r = run_bench(fake_server, tmp_path, "bad", "--model", "other", "--num-prompts", "3",
                  "--warmup-requests", "0", "--request-rate", "200")
    assert r["completed"] == 0 and r["failed"] == 3
    assert any("404" in e for e in r["errors"])


def test_random_prompt_lengths():
    serving = load_script("serving")
    args = serving.parse_args(["--model", "m", "--num-prompts", "50", "--random-input-len", "100",
                               "--random-output-len", "20", "--random-range-ratio", "0.5",
                               "--tokenizer-free"])
    specs = serving.build_requests(args)
    assert all(50 <= s.prompt_len <= 150 and 10 <= s.output_len <= 30 for s in specs)
    assert all(len(s.prompt.split()) == s.prompt_len for s in specs)
    assert len({s.output_len for s in specs}) > 1


def test_plot_makes_pngs(fake_server, tmp_path):
    pytest.importorskip("matplotlib")
    files = [tmp_path / "c1.json", tmp_path / "c4.json"]
    for conc, path in zip((1, 4), files):
        r = run_bench(fake_server, tmp_path, path.stem, "--max-concurrency", str(conc))
        assert r["completed"] == 8
    plot = load_script("plot")
    out_dir = tmp_path / "plots"
    paths = plot.make_plots([str(f) for f in files], str(out_dir))
    assert len(paths) == 3
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert os.path.getsize(p) > 1000
