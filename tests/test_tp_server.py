"""`kvserve serve --tensor-parallel-size 3` (SmolLM2: 9 heads, 3 KV heads) with the openai client: the same greedy text as
one process; a worker killed with SIGKILL ends open streams with an error event and turns
/health to 503 (no hang); stopping the server leaves no worker behind."""
from __future__ import annotations

import os
import signal
import time

import httpx
import openai
from live_server import start_server, stop_server
from procs import alive, children_of

PROMPTS = ["The capital of France is", "Water boils at"]


def test_tp3_server_matches_and_survives_nothing_hangs(smol_llm, tmp_path):
    from engine import SamplingParams

    want = [o.outputs[0].text for o in smol_llm.generate(
        PROMPTS, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)]
    proc, base, _, log = start_server(tmp_path, "tp2", "--tensor-parallel-size", "3",
                                      "--no-exit-on-engine-death",
                                      "--kv-cache-memory-bytes", str(64 << 20))
    workers = children_of(proc.pid)
    try:
        assert len(workers) == 2
        client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
        got = [client.completions.create(model="SmolLM2-135M-Instruct", prompt=p, max_tokens=8,
                                         temperature=0).choices[0].text for p in PROMPTS]
        assert got == want
        # a long stream is running when the worker dies: it ends with an error event
        events = []
        with httpx.stream("POST", base + "/v1/completions", timeout=60, json={
                "prompt": PROMPTS[0], "max_tokens": 400, "ignore_eos": True, "stream": True,
                "temperature": 0}) as r:
            for i, line in enumerate(r.iter_lines()):
                if i == 4:
                    os.kill(workers[0], signal.SIGKILL)
                if line.startswith("data: "):
                    events.append(line[6:])
        assert events[-1] == "[DONE]" and "error" in events[-2], events[-3:]
        deadline = time.monotonic() + 30
        while httpx.get(base + "/health", timeout=5).status_code != 503:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        r = httpx.post(base + "/v1/completions", json={"prompt": "x", "max_tokens": 2},
                       timeout=30)
        assert r.status_code == 503
    finally:
        stop_server(proc)
        log.close()
    deadline = time.monotonic() + 10
    while any(alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(w) for w in workers)
