"""Server behaviour that needs control over the engine: a full queue, deadlines, a dead
engine loop, aborts of queued requests. In-process (starlette TestClient) on a tiny model."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest
from starlette.testclient import TestClient

from conftest import assert_no_leak
from engine import EngineConfig, LLMEngine, SamplingParams
from engine.async_engine import AsyncLLMEngine, QueueFullError
from server.app import ServerSettings, build_app

BODY = {"model": "tiny", "prompt": [1, 2, 3, 4, 5], "max_tokens": 8, "temperature": 0}


@pytest.fixture
def tiny_engine(tiny_models):
    return LLMEngine(EngineConfig(model=tiny_models("llama")[0], skip_tokenizer_init=True,
                                  num_kv_blocks=64, max_num_seqs=2))


def slow_steps(engine, seconds):
    step = engine.step

    def slow():
        time.sleep(seconds)
        return step()
    engine.step = slow


def test_queue_full_is_503_with_retry_after(tiny_engine):
    slow_steps(tiny_engine, 0.05)
    app = build_app(AsyncLLMEngine(tiny_engine, max_waiting_requests=1), ServerSettings("tiny"))
    with TestClient(app) as client:
        import concurrent.futures as cf

        body = {**BODY, "max_tokens": 40, "ignore_eos": True}
        with cf.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(client.post, "/v1/completions", json=body) for _ in range(8)]
            responses = [f.result() for f in futures]
        statuses = sorted(r.status_code for r in responses)
        assert 503 in statuses and 200 in statuses
        busy = next(r for r in responses if r.status_code == 503)
        assert busy.headers["retry-after"] == "1"
        assert busy.json()["error"]["type"] == "server_overloaded"
        assert client.post("/v1/completions", json=BODY).status_code == 200
    assert_no_leak(tiny_engine)


def test_deadline_aborts_and_frees(tiny_engine):
    slow_steps(tiny_engine, 0.05)
    app = build_app(AsyncLLMEngine(tiny_engine), ServerSettings("tiny", request_timeout=0.5))
    with TestClient(app) as client:
        t0 = time.monotonic()
        r = client.post("/v1/completions", json={**BODY, "max_tokens": 200, "ignore_eos": True})
        assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout"
        assert time.monotonic() - t0 < 3
        with client.stream("POST", "/v1/completions",
                           json={**BODY, "max_tokens": 200, "ignore_eos": True, "stream": True}) as s:
            lines = [line for line in s.iter_lines() if line.startswith("data:")]
        assert "request_timeout" in lines[-2] and lines[-1].endswith("[DONE]")
        time.sleep(0.3)  # the abort is applied by the engine thread before its next step
        # 2 tokens (3 steps of >= 50 ms) fit the 0.5 s deadline even on a loaded machine;
        # 8 (9 steps, 0.45 s of sleeps alone) did not always
        assert client.post("/v1/completions", json={**BODY, "max_tokens": 2}).status_code == 200
    assert_no_leak(tiny_engine)


def test_dead_engine_loop_fails_fast(tiny_engine):
    def broken():
        raise RuntimeError("simulated engine crash")
    app = build_app(AsyncLLMEngine(tiny_engine), ServerSettings("tiny"))
    with TestClient(app) as client:
        assert client.get("/health").status_code == 200
        tiny_engine.step = broken
        r = client.post("/v1/completions", json=BODY)
        assert r.status_code == 503
        assert client.get("/health").status_code == 503
        t0 = time.monotonic()
        r = client.post("/v1/completions", json=BODY)
        assert r.status_code == 503 and r.json()["error"]["type"] == "engine_dead"
        assert time.monotonic() - t0 < 1
        assert "kvserve_engine_alive 0.0" in client.get("/metrics").text


def test_closing_queued_streams_aborts_them(tiny_engine):
    async def main():
        ae = AsyncLLMEngine(tiny_engine)
        ae.start()
        params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
        streams = [ae.add_request(f"r{i}", {"prompt_token_ids": [1, 2, 3, i]}, params) for i in range(6)]
        first = await streams[0].__anext__()
        assert first.outputs[0].token_ids
        assert tiny_engine.get_stats()["num_waiting"] > 0  # max_num_seqs=2: the rest queue
        for s in streams[1:]:
            s.close()  # running and still-queued ones alike
        outs = [o async for o in streams[0]]
        assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 30
        streams[0].close()
        for _ in range(50):
            if not tiny_engine.has_unfinished_requests():
                break
            await asyncio.sleep(0.02)
        await ae.stop()

    asyncio.run(main())
    assert_no_leak(tiny_engine)


def test_queue_bound_in_engine(tiny_engine):
    async def main():
        ae = AsyncLLMEngine(tiny_engine, max_waiting_requests=2)
        ae.start()
        params = SamplingParams(max_tokens=4)
        a = ae.add_request("a", [1, 2], params)
        b = ae.add_request("b", [1, 2], params)
        with pytest.raises(QueueFullError):
            ae.add_request("c", [1, 2], params)
        with pytest.raises(ValueError, match="empty"):
            ae.add_request("d", [], params)
        outs = [[o async for o in s] for s in (a, b)]
        assert all(o[-1].finished for o in outs)
        await ae.stop()

    asyncio.run(main())
    assert_no_leak(tiny_engine)


def test_from_config_loads_and_steps_on_one_thread(tiny_models, monkeypatch):
    """The server builds its engine on the worker thread that steps it: a second thread
    running parallel torch ops doubles the OpenMP threads and throttles libgomp."""
    threads = {"init": set(), "step": set()}
    init, step = LLMEngine.__init__, LLMEngine.step

    def spy_init(self, *a, **k):
        threads["init"].add(threading.get_ident())
        init(self, *a, **k)

    def spy_step(self):
        threads["step"].add(threading.get_ident())
        return step(self)

    monkeypatch.setattr(LLMEngine, "__init__", spy_init)
    monkeypatch.setattr(LLMEngine, "step", spy_step)
    config = EngineConfig(model=tiny_models("llama")[0], skip_tokenizer_init=True,
                          num_kv_blocks=64)

    async def main():
        ae = AsyncLLMEngine.from_config(config)
        ae.start()
        outs = [o async for o in ae.generate("a", [1, 2, 3], SamplingParams(max_tokens=5))]
        await ae.stop()
        return ae, outs

    ae, outs = asyncio.run(main())
    assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 5
    assert len(threads["init"]) == 1 and threads["init"] == threads["step"]
    assert threading.get_ident() not in threads["init"]
    assert_no_leak(ae.engine)
    with pytest.raises(FileNotFoundError):  # a failed build reaches the caller
        AsyncLLMEngine.from_config(EngineConfig(model="/nonexistent/model"))
