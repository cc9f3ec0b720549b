#!/usr/bin/env python3
"""Online serving benchmark for any OpenAI-compatible server (kvserve, vLLM, SGLang, ...).

Sends ``--num-prompts`` streaming requests to ``/v1/completions`` or ``/v1/chat/completions``,
either all at once, with Poisson arrivals (``--request-rate``), under a concurrency cap
(``--max-concurrency``), or both (as vLLM's benchmark_serving does), and reports TTFT, TPOT,
ITL, end-to-end latency and throughput as JSON (stdout, and ``--output FILE``).

``--backend triton-grpc`` sends the same workload over KServe v2 gRPC instead (one
decoupled ``ModelStreamInfer`` stream per request, ``stream`` true: TTFT/TPOT/ITL as for
SSE); ``--backend triton-http`` over KServe v2 HTTP ``infer`` (unary: one response, so
TTFT = e2e and there is no TPOT). Both use the stock ``tritonclient`` and the vLLM
backend's tensors; ``--base-url`` is then ``host:port`` of the gRPC or HTTP listener.

Only needs httpx (plus transformers when ``--tokenizer`` is given, tritonclient for the
triton backends). Examples::

    python bench/serving.py --base-url http://127.0.0.1:8000 --model SmolLM2-135M-Instruct \\
        --num-prompts 32 --max-concurrency 8 --random-input-len 128 --random-output-len 64 \\
        --tokenizer ~/.cache/kvserve/gguf-<hash> --output bench/results/c8.json

Definitions (all times measured on the client, from just before the request is sent):
  TTFT  time to the first chunk carrying non-empty content (text / delta.content).
  ITL   time between consecutive content chunks (one entry per gap, all requests pooled).
        A chunk may carry more than one token (a server may batch deltas), so ITL is per chunk.
  TPOT  per request, (e2e - TTFT) / (output_tokens - 1); requests with one token are skipped.
  e2e   time until the stream ends ([DONE] or EOF).
Output tokens come from the final ``usage`` chunk (``stream_options.include_usage``); a
server that sends none falls back to counting content chunks (noted in the result).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import httpx

# bench/ holds scripts, not modules: keep it off sys.path so a script here (bench/kernels.py)
# cannot shadow a package of the same name (kvserve's kernels, or the one transformers probes).
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))  # the repo root, for bench.common

from bench.common import emit_json  # noqa: E402

# Common English words that are one token (with their leading space) in the BPE vocabularies
# of Llama 2/3, Mistral, Qwen2/3, GPT-2 and SmolLM2: a prompt of N such words is about N
# tokens. Used only when no tokenizer is given (--tokenizer-free).
WORDS = """the of and to in is was for on are with as at be by this had not but from have
they which one you were her all she there would their we him been has when who will more
no if out so said what up its about into than them can only other new some could time these
two may then do first any my now such like our over man me even most made after also did
many before must through back years where much your way well down should because each just
those people how too little state good very make world still own see men work long get here
between both life being under never day same another know while last might us great old year
off come since against go came right used take three states himself few house use during
without again place around however home small found mrs thought went say part once general
high upon school every don does got united left number course war until always away something
fact though water less public put think almost hand enough far took head yet government system
better set told nothing night end why called didn eyes find going look asked later knew point
next program city business give group toward young days let room president side social given
present several order national possible rather second face per among form important often things
looked early white case john become large big need four within felt along children saw best
church ever least power development light thing seemed family interest want members mind
country area others done turned although open god service certain kind problem began different
door thus help sense means whole matter perhaps itself york times law human line above name
example action company hands local show whether five history gave today either act feet across
taken past quite anyone having seen death experience body word half really week field car
words already themselves information tell together college shall money period held keep sure
free real seems behind cannot miss political air question making office brought whose special
heard major problems ago became federal moment study available known result street economic
boy position reason change south board individual job areas society west close turn love
community true court force full seem wife age future voice center woman control common policy
necessary following front sometimes six girl clear further land run students provide feel
party able mother music education university child effect level stood military short town
morning total outside rate figure class art century washington north usually leave therefore
evidence million sound top black strong hard various play surface type value month private
tax""".split()


# ---------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def failures_recorded(res: "RequestResult"):
    """Every failure is a failed request (its error recorded), never a crash; a cancelled
    request is recorded and still cancels."""
    try:
        yield
    except asyncio.CancelledError:
        res.error = "cancelled"
        raise
    except Exception as e:  # noqa: BLE001
        res.error = f"{type(e).__name__}: {e}"


@dataclass
class RequestSpec:
    prompt: str | None            # completions prompt / chat user message
    prompt_len: int               # tokens (exact with a tokenizer, else approximate)
    output_len: int               # max_tokens (ignore_eos makes it exact on servers that honour it)
    messages: list | None = None  # chat messages from a dataset line, used as-is


@dataclass
class RequestResult:
    success: bool = False
    error: str = ""
    prompt_len: int = 0           # server's usage.prompt_tokens when sent, else the planned length
    output_tokens: int = 0
    output_tokens_from_usage: bool = False
    ttft: float = 0.0             # seconds
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    chunks: int = 0
    start: float = 0.0            # seconds since the benchmark started
    status: int | None = None

    def on_content(self, sent: float, last: float) -> float:
        """A chunk with content arrived: TTFT for the first, else one ITL gap. Returns now."""
        now = time.perf_counter()
        if self.chunks == 0:
            self.ttft = now - sent
        else:
            self.itl.append(now - last)
        self.chunks += 1
        return now


def sample_len(rng: random.Random, mean: int, ratio: float) -> int:
    """Uniform integer in [mean*(1-ratio), mean*(1+ratio)] (vLLM's --random-range-ratio), >= 1."""
    lo, hi = math.floor(mean * (1 - ratio)), math.ceil(mean * (1 + ratio))
    return max(1, rng.randint(lo, hi) if ratio > 0 else mean)


def word_token_ids(tokenizer) -> list[int]:
    """Token ids that are whole lowercase words with a leading-space marker (GPT-2/BPE 'Ġ',
    SentencePiece '▁'): joined, they re-tokenize to themselves almost always."""
    special = set(tokenizer.all_special_ids)
    vocab = tokenizer.get_vocab()
    for pattern in (r"[\u0120\u2581][a-z]{3,12}", r"[\u0120\u2581]?[A-Za-z]{2,}"):
        ids = [i for t, i in vocab.items() if i not in special and re.fullmatch(pattern, t)]
        if len(ids) >= 100:
            return ids
    return [i for i in vocab.values() if i not in special]


def exact_prompt(tokenizer, ids_pool: list[int], n: int, rng: random.Random) -> tuple[str, int]:
    """Text that encodes (without special tokens) to exactly n tokens: draw n word tokens,
    decode, re-encode, then trim or top up and repeat until the round trip is stable."""
    ids = [rng.choice(ids_pool) for _ in range(n)]
    text, count = "", 0
    for _ in range(20):
        text = tokenizer.decode(ids)
        enc = tokenizer.encode(text, add_special_tokens=False)
        count = len(enc)
        if count == n:
            break
        ids = enc[:n] if count > n else enc + [rng.choice(ids_pool) for _ in range(n - count)]
    return text, count


def approx_prompt(n: int, rng: random.Random) -> str:
    """Tokenizer-free: n random common words (drawn with replacement, so words repeat). Each is
    about one token with its leading space in modern BPE vocabularies (32k-150k), so the prompt
    is roughly n tokens; expect a few percent over (rarer words split in two, plus a leading
    token on some tokenizers). The server's usage.prompt_tokens gives the true count."""
    return " ".join(rng.choice(WORDS) for _ in range(n))


def load_tokenizer(path: str):
    from transformers import AutoTokenizer  # only needed for exact prompt lengths

    return AutoTokenizer.from_pretrained(os.path.expanduser(path))


def count_tokens(tokenizer, text: str) -> int:
    if tokenizer is not None:
        return len(tokenizer.encode(text, add_special_tokens=False))
    return len(text.split())  # same approximation as approx_prompt


def load_dataset(path: str) -> list[dict]:
    """.jsonl: one object per line with "prompt" (or "text", or chat "messages") and optionally
    "output_len" / "max_tokens"; anything else: one prompt per non-empty line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if path.endswith(".jsonl"):
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError(f"{path}:{lineno}: expected a JSON object")
                prompt = obj.get("prompt", obj.get("text"))
                messages = obj.get("messages")
                if prompt is None and messages is None:
                    raise ValueError(f"{path}:{lineno}: needs 'prompt', 'text' or 'messages'")
                rows.append({"prompt": prompt, "messages": messages,
                             "output_len": obj.get("output_len", obj.get("max_tokens"))})
            else:
                rows.append({"prompt": line, "messages": None, "output_len": None})
    if not rows:
        raise ValueError(f"{path}: no prompts")
    return rows


def build_requests(args, tokenizer=None) -> list[RequestSpec]:
    rng = random.Random(args.seed)
    specs = []
    if args.dataset:
        rows = load_dataset(args.dataset)
        for i in range(args.num_prompts):
            row = rows[i % len(rows)]  # cycles when the file has fewer prompts
            out_len = row["output_len"] or sample_len(rng, args.random_output_len,
                                                      args.random_range_ratio)
            text = row["prompt"] if row["prompt"] is not None else " ".join(
                str(m.get("content", "")) for m in row["messages"])
            # Completions send the text (a messages-only row: its contents joined); chat sends
            # the row's messages, or the prompt as one user message.
            specs.append(RequestSpec(text, count_tokens(tokenizer, text), int(out_len),
                                     row["messages"]))
        return specs
    pool = word_token_ids(tokenizer) if tokenizer is not None else None
    for _ in range(args.num_prompts):
        in_len = sample_len(rng, args.random_input_len, args.random_range_ratio)
        out_len = sample_len(rng, args.random_output_len, args.random_range_ratio)
        if tokenizer is not None:
            prompt, in_len = exact_prompt(tokenizer, pool, in_len, rng)
        else:
            prompt = approx_prompt(in_len, rng)
        specs.append(RequestSpec(prompt, in_len, out_len))
    return specs


# ---------------------------------------------------------------------------------------------
# One request
# ---------------------------------------------------------------------------------------------
def api_url(base_url: str, endpoint: str) -> str:
    base = base_url.rstrip("/")
    if base.endswith("/v1"):
        base = base[:-3]
    return base + ("/v1/completions" if endpoint == "completions" else "/v1/chat/completions")


def make_payload(args, spec: RequestSpec) -> dict:
    payload: dict = {"model": args.model, "stream": True,
                     "stream_options": {"include_usage": True},
                     "temperature": args.temperature}
    if args.endpoint == "completions":
        payload["prompt"] = spec.prompt
        payload["max_tokens"] = spec.output_len
    else:
        payload["messages"] = spec.messages or [{"role": "user", "content": spec.prompt}]
        payload["max_completion_tokens"] = spec.output_len
    if args.ignore_eos:
        payload["ignore_eos"] = True  # vLLM/SGLang/kvserve extension; fixes the output length
    if args.extra_body:
        payload.update(json.loads(args.extra_body))
    return payload


def content_of(chunk: dict, endpoint: str) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    c = choices[0]
    if endpoint == "completions":
        return c.get("text") or ""
    return (c.get("delta") or {}).get("content") or ""


async def send_request(client: httpx.AsyncClient, url: str, headers: dict, payload: dict,
                       spec: RequestSpec, endpoint: str, t0: float) -> RequestResult:
    res = RequestResult(prompt_len=spec.prompt_len)
    st = time.perf_counter()
    res.start = st - t0
    last = st
    usage_tokens = None
    with failures_recorded(res):
        async with client.stream("POST", url, json=payload, headers=headers) as resp:
            res.status = resp.status_code
            if resp.status_code != 200:
                body = (await resp.aread()).decode(errors="replace")
                res.error = f"HTTP {resp.status_code}: {body[:500]}"
                return res
            async for line in resp.aiter_lines():
                line = line.strip()
                if not line.startswith("data:"):
                    continue  # blank separators, ": ping" comments, event:/id: fields
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk and not chunk.get("choices"):
                    res.error = f"stream error: {json.dumps(chunk['error'])[:500]}"
                    return res
                if content_of(chunk, endpoint):
                    last = res.on_content(st, last)
                usage = chunk.get("usage")
                if usage:
                    usage_tokens = usage.get("completion_tokens")
                    if usage.get("prompt_tokens") is not None:
                        res.prompt_len = usage["prompt_tokens"]
        res.e2e = time.perf_counter() - st
        if usage_tokens is not None:
            res.output_tokens, res.output_tokens_from_usage = int(usage_tokens), True
        else:
            res.output_tokens = res.chunks
        if res.chunks == 0:
            res.error = "stream ended without any content"
        else:
            res.success = True
    return res


def triton_inputs(module, args, spec: RequestSpec, stream: bool) -> list:
    """The vLLM backend's tensors: the prompt, sampling parameters as JSON, flags."""
    import numpy as np

    params = {"max_tokens": spec.output_len, "temperature": args.temperature}
    if args.ignore_eos:
        params["ignore_eos"] = True
    if args.extra_body:
        params.update(json.loads(args.extra_body))
    values = [("text_input", "BYTES", spec.prompt.encode()),
              ("sampling_parameters", "BYTES", json.dumps(params).encode()),
              ("stream", "BOOL", stream), ("exclude_input_in_output", "BOOL", True),
              ("return_num_input_tokens", "BOOL", True),
              ("return_num_output_tokens", "BOOL", True)]
    tensors = []
    for name, dtype, value in values:
        t = module.InferInput(name, [1], dtype)
        t.set_data_from_numpy(np.array([value], dtype=np.object_ if dtype == "BYTES" else bool))
        tensors.append(t)
    return tensors


async def send_triton_grpc(client, args, spec: RequestSpec, t0: float, rid: str) -> RequestResult:
    """One request on its own decoupled gRPC stream; a response per new piece of text."""
    import tritonclient.grpc as grpcclient

    res = RequestResult(prompt_len=spec.prompt_len)
    st = time.perf_counter()
    res.start = st - t0
    last = st
    request = {"model_name": args.model, "inputs": triton_inputs(grpcclient, args, spec, True),
               "request_id": rid}

    async def one_request():
        yield request
    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else None
    with failures_recorded(res):
        responses = client.stream_infer(one_request(), headers=headers)
        if asyncio.iscoroutine(responses):
            responses = await responses
        async for result, error in responses:
            if error is not None:
                res.error = f"stream error: {error}"
                return res
            resp = result.get_response()
            if resp.outputs:
                new = int(result.as_numpy("num_output_tokens")[0])
                res.prompt_len = int(result.as_numpy("num_input_tokens")[0])
                if new and result.as_numpy("text_output")[0]:
                    last = res.on_content(st, last)
                res.output_tokens += new
            if resp.parameters["triton_final_response"].bool_param:
                break
        res.e2e = time.perf_counter() - st
        res.output_tokens_from_usage = True
        res.success = res.chunks > 0
        if not res.success:
            res.error = "stream ended without any content"
    return res


async def send_triton_http(client, args, spec: RequestSpec, t0: float, rid: str) -> RequestResult:
    """One unary KServe v2 HTTP infer: the whole text in one response (TTFT = e2e)."""
    import tritonclient.http as httpclient

    res = RequestResult(prompt_len=spec.prompt_len)
    st = time.perf_counter()
    res.start = st - t0
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
    with failures_recorded(res):
        result = await client.infer(args.model, triton_inputs(httpclient, args, spec, False),
                                    request_id=rid, headers=headers)
        res.e2e = res.ttft = time.perf_counter() - st
        res.output_tokens = int(result.as_numpy("num_output_tokens")[0])
        res.prompt_len = int(result.as_numpy("num_input_tokens")[0])
        res.output_tokens_from_usage, res.chunks, res.success = True, 1, True
    return res


def triton_sender(args):
    """(send(spec, t0) -> RequestResult, close()) for a triton backend."""
    counter = iter(range(1 << 62))
    if args.backend == "triton-grpc":
        import tritonclient.grpc.aio as grpcaio

        client = grpcaio.InferenceServerClient(url=_host_port(args.base_url))
        send = send_triton_grpc
    else:
        import tritonclient.http.aio as httpaio

        client = httpaio.InferenceServerClient(url=_host_port(args.base_url),
                                               conn_limit=max(args.max_concurrency or 0, 100),
                                               conn_timeout=args.timeout)
        send = send_triton_http
    return (lambda spec, t0: send(client, args, spec, t0, f"bench-{next(counter)}")), client.close


def _host_port(base_url: str) -> str:
    return re.sub(r"^[a-z]+://", "", base_url).rstrip("/")


# ---------------------------------------------------------------------------------------------
# Benchmark
# ---------------------------------------------------------------------------------------------
def stats_ms(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "median": None, "std": None, "p90": None, "p99": None,
                "min": None, "max": None}
    ms = sorted(v * 1000.0 for v in values)

    def pct(p: float) -> float:  # linear interpolation, like numpy.percentile
        k = (len(ms) - 1) * p / 100.0
        lo = math.floor(k)
        hi = min(lo + 1, len(ms) - 1)
        return ms[lo] + (ms[hi] - ms[lo]) * (k - lo)

    return {"mean": statistics.fmean(ms), "median": pct(50), "std": statistics.pstdev(ms),
            "p90": pct(90), "p99": pct(99), "min": ms[0], "max": ms[-1]}


def summarize(args, results: list[RequestResult], duration: float, interrupted: bool,
              tokenizer_mode: str) -> dict:
    ok = [r for r in results if r.success]
    failed = [r for r in results if not r.success]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    dur = max(duration, 1e-9)
    errors: dict[str, int] = {}
    for r in failed:
        key = r.error[:200]
        errors[key] = errors.get(key, 0) + 1
    summary = {
        "settings": {
            "base_url": args.base_url, "endpoint": args.endpoint, "model": args.model,
            "backend": getattr(args, "backend", "openai"),
            "label": args.label or args.model, "num_prompts": args.num_prompts,
            "request_rate": "inf" if math.isinf(args.request_rate) else args.request_rate,
            "max_concurrency": args.max_concurrency,
            "dataset": args.dataset, "random_input_len": args.random_input_len,
            "random_output_len": args.random_output_len,
            "random_range_ratio": args.random_range_ratio, "prompt_lengths": tokenizer_mode,
            "tokenizer": args.tokenizer, "ignore_eos": args.ignore_eos,
            "temperature": args.temperature, "seed": args.seed,
            "warmup_requests": args.warmup_requests,
        },
        "interrupted": interrupted,
        "duration_s": duration,
        "num_requests_sent": len(results),
        "completed": len(ok),
        "failed": len(failed),
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "output_tokens_from_usage": sum(r.output_tokens_from_usage for r in ok),
        "mean_output_tokens": out_tokens / len(ok) if ok else None,
        "request_throughput": len(ok) / dur,
        "output_throughput": out_tokens / dur,
        "total_token_throughput": (in_tokens + out_tokens) / dur,
        "ttft_ms": stats_ms([r.ttft for r in ok]),
        "tpot_ms": stats_ms([(r.e2e - r.ttft) / (r.output_tokens - 1)
                             for r in ok if r.output_tokens > 1]),
        "itl_ms": stats_ms([x for r in ok for x in r.itl]),
        "e2e_ms": stats_ms([r.e2e for r in ok]),
        "errors": errors,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if args.save_detailed:
        summary["requests"] = [asdict(r) for r in results]
    return summary


async def arrivals(n: int, rate: float, rng: random.Random):
    """Yield request indices, spaced by exponential gaps (Poisson process) unless rate is inf."""
    for i in range(n):
        yield i
        if not math.isinf(rate) and i + 1 < n:
            await asyncio.sleep(rng.expovariate(rate))


async def benchmark(args, specs: list[RequestSpec] | None = None,
                    client: httpx.AsyncClient | None = None, tokenizer_mode: str = "") -> dict:
    """Run the benchmark; returns the summary dict. Ctrl-C (task cancellation) stops sending,
    cancels requests in flight and summarizes what finished (``"interrupted": true``)."""
    if specs is None:
        tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
        specs = build_requests(args, tokenizer)
        tokenizer_mode = tokenizer_mode or prompt_mode(args)
    url = api_url(args.base_url, args.endpoint)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    if getattr(args, "backend", "openai") != "openai":
        send_one, close = triton_sender(args)
    else:
        send_one = close = None
    own_client = client is None and send_one is None
    if own_client:
        conns = max(args.max_concurrency or args.num_prompts, 1)
        client = httpx.AsyncClient(
            timeout=httpx.Timeout(args.timeout, connect=30.0),
            limits=httpx.Limits(max_connections=conns, max_keepalive_connections=conns),
            trust_env=False)  # never measure through an HTTP(S)_PROXY
    results: list[RequestResult] = []
    tasks: list[asyncio.Task] = []
    interrupted = False
    t0 = time.perf_counter()
    duration = 0.0
    try:
        for i in range(args.warmup_requests):  # not counted; fail fast if the server is wrong
            spec = specs[i % len(specs)]
            r = await (send_one(spec, t0) if send_one else send_request(
                client, url, headers, make_payload(args, spec), spec, args.endpoint, t0))
            if not r.success:
                raise SystemExit(f"warm-up request failed: {r.error}")
        sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
        done = 0

        started = 0

        async def send(spec: RequestSpec) -> RequestResult:
            nonlocal started
            started += 1
            if send_one is not None:
                return await send_one(spec, t0)
            return await send_request(client, url, headers, make_payload(args, spec), spec,
                                      args.endpoint, t0)

        async def one(spec: RequestSpec) -> RequestResult:
            nonlocal done
            if sem is None:
                r = await send(spec)
            else:
                async with sem:
                    r = await send(spec)
            results.append(r)
            done += 1
            if args.progress:
                print(f"\r{done}/{len(specs)} requests", end="", file=sys.stderr, flush=True)
            return r

        t0 = time.perf_counter()
        try:
            async for i in arrivals(len(specs), args.request_rate, random.Random(args.seed + 1)):
                tasks.append(asyncio.create_task(one(specs[i])))
            await asyncio.gather(*tasks)
        except asyncio.CancelledError:
            interrupted = True
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            # Requests already sent but cut short count as failed; unsent ones are not counted.
            results.extend(RequestResult(error="cancelled (interrupted)")
                           for _ in range(started - len(results)))
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()  # handled: summarize instead of propagating
        duration = time.perf_counter() - t0
        if args.progress:
            print(file=sys.stderr)
    finally:
        if own_client:
            await client.aclose()
        if close is not None:
            await close()
    return summarize(args, results, duration, interrupted, tokenizer_mode)


def prompt_mode(args) -> str:
    if args.dataset:
        return "dataset (" + ("tokenizer counts" if args.tokenizer else "approx: word counts") + ")"
    return "exact (tokenizer)" if args.tokenizer else "approximate (tokenizer-free words)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000",
                   help="server root (with or without a trailing /v1)")
    p.add_argument("--model", required=True, help="model name the server serves")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    p.add_argument("--backend", choices=("openai", "triton-grpc", "triton-http"),
                   default="openai", help="openai: SSE streaming over --endpoint; triton-grpc: "
                   "KServe v2 gRPC streaming; triton-http: KServe v2 HTTP unary infer")
    p.add_argument("--label", help="name for plots (default: the model name)")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="requests/s with Poisson arrivals; inf (default) sends all at once")
    p.add_argument("--max-concurrency", type=int,
                   help="cap on requests in flight (combines with --request-rate)")
    p.add_argument("--random-input-len", type=int, default=128)
    p.add_argument("--random-output-len", type=int, default=64)
    p.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths uniform in [len*(1-r), len*(1+r)]; 0 = fixed")
    p.add_argument("--tokenizer", help="HF tokenizer directory: random prompts of exact length")
    p.add_argument("--tokenizer-free", action="store_true",
                   help="random prompts of ~N common words (~N tokens) without a tokenizer")
    p.add_argument("--dataset", help="prompts from a .jsonl (prompt/messages[, output_len]) "
                                     "or a text file (one prompt per line)")
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="do not send ignore_eos (servers without the extension)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--extra-body", help="JSON object merged into every request body")
    p.add_argument("--warmup-requests", type=int, default=1,
                   help="sequential requests before the timed run (not counted)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=3600.0, help="per-request seconds")
    p.add_argument("--output", help="also write the JSON result here")
    p.add_argument("--save-detailed", action="store_true", help="include every request")
    p.add_argument("--progress", action="store_true", help="request counter on stderr")
    args = p.parse_args(argv)
    if args.tokenizer and args.tokenizer_free:
        p.error("--tokenizer and --tokenizer-free are exclusive")
    if args.num_prompts < 1:
        p.error("--num-prompts must be at least 1")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        p.error("--max-concurrency must be at least 1")
    if args.request_rate <= 0:
        p.error("--request-rate must be positive (inf for all at once)")
    if not 0.0 <= args.random_range_ratio < 1.0:
        p.error("--random-range-ratio must be in [0, 1)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not (args.tokenizer or args.tokenizer_free or args.dataset):
        print("note: no --tokenizer; prompt lengths are approximate (--tokenizer-free)",
              file=sys.stderr)
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    specs = build_requests(args, tokenizer)
    try:
        summary = asyncio.run(benchmark(args, specs, tokenizer_mode=prompt_mode(args)))
    except KeyboardInterrupt:  # a second Ctrl-C: give up without a summary
        print("\ninterrupted", file=sys.stderr)
        return 130
    emit_json(summary, args.output)
    if summary["interrupted"]:
        return 130
    return 0 if summary["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
