"""Prometheus metrics: latency histograms observed per request, engine gauges read at scrape."""
from __future__ import annotations

import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0)


class Metrics:
    """One per server. ``versions()`` lists (model, version, state, memory bytes, traffic
    share, AsyncLLMEngine or None) for every version the registry knows, read at scrape."""

    def __init__(self, versions) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("kvserve_time_to_first_token_seconds", "Time to first token.",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("kvserve_inter_token_latency_seconds", "Time between streamed tokens.",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("kvserve_e2e_request_latency_seconds", "Request latency, end to end.",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("kvserve_request_queue_time_seconds",
                                    "Time from arrival to first scheduling.",
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("kvserve_prompt_tokens", "Prompt tokens processed.", registry=r)
        self.generation_tokens = Counter("kvserve_generation_tokens", "Tokens generated.", registry=r)
        # protocol: openai | generate (Triton's generate extension) | kserve-http | kserve-grpc
        self.requests = Counter("kvserve_requests", "Finished requests by outcome and protocol.",
                                ["outcome", "protocol"], registry=r)
        # LoRA: finished requests and generated tokens per adapter
        self.lora_requests = Counter("kvserve_lora_requests", "Finished requests per LoRA "
                                     "adapter.", ["adapter"], registry=r)
        self.lora_tokens = Counter("kvserve_lora_generation_tokens", "Tokens generated per "
                                   "LoRA adapter.", ["adapter"], registry=r)
        # Per model and version (the registry's), for autoscalers and canary dashboards
        mv = ["model_name", "version"]
        self.model_requests = Counter("kvserve_model_requests", "Finished requests per model "
                                      "version and outcome.", [*mv, "outcome"], registry=r)
        self.model_prompt_tokens = Counter("kvserve_model_prompt_tokens", "Prompt tokens per "
                                           "model version.", mv, registry=r)
        self.model_generation_tokens = Counter("kvserve_model_generation_tokens", "Tokens "
                                               "generated per model version.", mv, registry=r)
        self.model_ttft = Histogram("kvserve_model_time_to_first_token_seconds", "Time to "
                                    "first token per model version.", mv,
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.model_tpot = Histogram("kvserve_model_time_per_output_token_seconds", "Time per "
                                    "output token after the first, per model version.", mv,
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.cold_starts = Histogram("kvserve_cold_start_seconds", "Loading a model back "
                                     "after it was scaled to zero.", ["model_name"],
                                     buckets=(0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0,
                                              80.0, 160.0), registry=r)
        r.register(_EngineCollector(versions))
        # Triton's statistics extension, per (model, version): plain counters, read by
        # GET /v2/models/{m}/stats and gRPC ModelStatistics
        self.stats: dict[tuple[str, str], VersionStats] = {}

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def version_stats(self, model: str, version: str) -> "VersionStats":
        return self.stats.setdefault((model, version), VersionStats())

    def timer(self, protocol: str = "openai", adapter: str | None = None,
              model: tuple[str, str] | None = None) -> "RequestTimer":
        return RequestTimer(self, protocol, adapter, model)


@dataclass
class VersionStats:
    """What Triton's statistics extension reports for one model version (durations in ns;
    a request is one inference and one execution: continuous batching has no fixed batch)."""
    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    queue_count: int = 0
    queue_ns: int = 0
    last_inference_ms: int = 0  # wall clock, ms since the epoch

    def as_triton(self, name: str, version: str) -> dict:
        """Triton's ModelStatistics as JSON (the HTTP body; gRPC parses the same dict)."""
        def duration(count: int, ns: int) -> dict:
            return {"count": count, "ns": ns}

        return {"name": name, "version": version, "last_inference": self.last_inference_ms,
                "inference_count": self.success_count, "execution_count": self.success_count,
                "inference_stats": {
                    "success": duration(self.success_count, self.success_ns),
                    "fail": duration(self.fail_count, self.fail_ns),
                    "queue": duration(self.queue_count, self.queue_ns),
                    "compute_input": duration(0, 0),
                    "compute_infer": duration(self.success_count,
                                              max(0, self.success_ns - self.queue_ns)),
                    "compute_output": duration(0, 0),
                    "cache_hit": duration(0, 0), "cache_miss": duration(0, 0)},
                "batch_stats": []}


class RequestTimer:
    """Observes one request's TTFT, inter-token latencies, queue time and e2e latency."""

    def __init__(self, metrics: Metrics, protocol: str, adapter: str | None = None,
                 model: tuple[str, str] | None = None) -> None:
        self.metrics, self.protocol, self.adapter = metrics, protocol, adapter
        self.model = model  # (model name, version) when the registry routed it
        # the labelled children, looked up once rather than per streamed token
        self.model_ttft = metrics.model_ttft.labels(*model) if model else None
        self.model_tpot = metrics.model_tpot.labels(*model) if model else None
        self.stats = metrics.version_stats(*model) if model else None
        self.start = time.monotonic()
        self.last_token: float | None = None
        self.queue_seen = False

    def on_output(self, out, new_tokens: int) -> None:
        if not self.queue_seen and out.first_scheduled_time is not None and out.arrival_time:
            queued = max(out.first_scheduled_time - out.arrival_time, 0.0)
            self.metrics.queue_time.observe(queued)
            self.queue_seen = True
            if self.stats is not None:
                self.stats.queue_count += 1
                self.stats.queue_ns += int(queued * 1e9)
        if new_tokens <= 0:
            return
        t = time.monotonic()
        if self.last_token is None:
            self.metrics.ttft.observe(t - self.start)
            if self.model_ttft is not None:
                self.model_ttft.observe(t - self.start)
        else:
            self.metrics.itl.observe((t - self.last_token) / new_tokens)
            if self.model_tpot is not None:
                self.model_tpot.observe((t - self.last_token) / new_tokens)
        self.last_token = t

    def finish(self, outcome: str, prompt_tokens: int = 0, generated: int = 0) -> None:
        elapsed = time.monotonic() - self.start
        self.metrics.e2e.observe(elapsed)
        if self.stats is not None:
            self.stats.success_count += 1
            self.stats.success_ns += int(elapsed * 1e9)
            self.stats.last_inference_ms = int(time.time() * 1000)
        self.metrics.prompt_tokens.inc(prompt_tokens)
        self.metrics.generation_tokens.inc(generated)
        self.metrics.requests.labels(outcome, self.protocol).inc()
        if self.adapter is not None:
            self.metrics.lora_requests.labels(self.adapter).inc()
            self.metrics.lora_tokens.labels(self.adapter).inc(generated)
        if self.model is not None:
            self.metrics.model_requests.labels(*self.model, outcome).inc()
            self.metrics.model_prompt_tokens.labels(*self.model).inc(prompt_tokens)
            self.metrics.model_generation_tokens.labels(*self.model).inc(generated)


    def fail(self, outcome: str) -> None:
        """A request that ended otherwise than "ok" (timeout, error, aborted)."""
        self.metrics.requests.labels(outcome, self.protocol).inc()
        if self.model is not None:
            self.metrics.model_requests.labels(*self.model, outcome).inc()
        if self.stats is not None:
            self.stats.fail_count += 1
            self.stats.fail_ns += int((time.monotonic() - self.start) * 1e9)


class _EngineCollector:
    """Engine gauges read at scrape: the unlabelled kvserve_* ones are totals over every
    loaded engine (as on a one-model server); the labelled ones per model version use the
    names gateway routers scrape from vLLM (vllm:num_requests_waiting, ...)."""

    def __init__(self, versions) -> None:
        self.versions = versions

    def collect(self):
        rows = list(self.versions())
        engines = [(m, v, e) for m, v, _, _, _, e in rows if e is not None]
        stats = [e.stats for _, _, e in engines]

        def total(key):
            return sum(s.get(key, 0) for s in stats)
        blocks, free = total("num_blocks"), total("num_free_blocks")
        yield GaugeMetricFamily("kvserve_num_requests_running", "Requests being generated.",
                                value=total("num_running"))
        yield GaugeMetricFamily("kvserve_num_requests_waiting", "Requests queued.",
                                value=sum(e.num_waiting for _, _, e in engines))
        yield GaugeMetricFamily("kvserve_kv_cache_usage_perc", "Fraction of KV blocks in use.",
                                value=(blocks - free) / blocks if blocks else 0.0)
        yield GaugeMetricFamily("kvserve_kv_cache_blocks_in_use", "KV blocks referenced.",
                                value=blocks - free)
        queries = total("prefix_cache_queries")
        yield GaugeMetricFamily("kvserve_prefix_cache_hit_rate", "Prefix-cache block hit rate.",
                                value=total("prefix_cache_hits") / queries if queries else 0.0)
        yield CounterMetricFamily("kvserve_num_preemptions", "Requests preempted.",
                                  value=total("num_preemptions"))
        yield GaugeMetricFamily("kvserve_lora_slots_in_use", "LoRA slots held by running "
                                "requests.", value=total("lora_slots_in_use"))
        yield GaugeMetricFamily("kvserve_engine_alive", "1 while every loaded engine's loop "
                                "runs.", value=1.0 if all(e.is_running for _, _, e in engines)
                                else 0.0)
        labels = ["model_name", "version"]
        running = GaugeMetricFamily("vllm:num_requests_running", "Requests being generated, "
                                    "per model version.", labels=labels)
        waiting = GaugeMetricFamily("vllm:num_requests_waiting", "Requests queued, per model "
                                    "version.", labels=labels)
        usage = GaugeMetricFamily("vllm:kv_cache_usage_perc", "Fraction of KV blocks in use, "
                                  "per model version.", labels=labels)
        for m, v, e in engines:
            running.add_metric([m, v], e.stats["num_running"])
            waiting.add_metric([m, v], e.num_waiting)
            usage.add_metric([m, v], e.stats["kv_cache_usage"])
        state = GaugeMetricFamily("kvserve_model_state", "1 for each model version's state "
                                  "(LOADING, READY, DRAINING, IDLE, UNLOADED, FAILED).",
                                  labels=[*labels, "state"])
        memory = GaugeMetricFamily("kvserve_model_memory_bytes", "Weights and KV pool held "
                                   "per model version.", labels=labels)
        traffic = GaugeMetricFamily("kvserve_model_traffic_share", "Share of the model's "
                                    "routed traffic per version (0-1).", labels=labels)
        for m, v, st, mem, share, _ in rows:
            state.add_metric([m, v, st], 1)
            memory.add_metric([m, v], mem)
            traffic.add_metric([m, v], share)
        yield from (running, waiting, usage, state, memory, traffic)
