"""Prometheus metrics: latency histograms observed per request, engine gauges read at scrape."""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0)


class Metrics:
    def __init__(self, async_engine) -> None:
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
        r.register(_EngineCollector(async_engine))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def timer(self, protocol: str = "openai", adapter: str | None = None) -> "RequestTimer":
        return RequestTimer(self, protocol, adapter)


class RequestTimer:
    """Observes one request's TTFT, inter-token latencies, queue time and e2e latency."""

    def __init__(self, metrics: Metrics, protocol: str, adapter: str | None = None) -> None:
        self.metrics, self.protocol, self.adapter = metrics, protocol, adapter
        self.start = time.monotonic()
        self.last_token: float | None = None
        self.queue_seen = False

    def on_output(self, out, new_tokens: int) -> None:
        if not self.queue_seen and out.first_scheduled_time is not None and out.arrival_time:
            self.metrics.queue_time.observe(max(out.first_scheduled_time - out.arrival_time, 0.0))
            self.queue_seen = True
        if new_tokens <= 0:
            return
        t = time.monotonic()
        if self.last_token is None:
            self.metrics.ttft.observe(t - self.start)
        else:
            self.metrics.itl.observe((t - self.last_token) / new_tokens)
        self.last_token = t

    def finish(self, outcome: str, prompt_tokens: int = 0, generated: int = 0) -> None:
        self.metrics.e2e.observe(time.monotonic() - self.start)
        self.metrics.prompt_tokens.inc(prompt_tokens)
        self.metrics.generation_tokens.inc(generated)
        self.metrics.requests.labels(outcome, self.protocol).inc()
        if self.adapter is not None:
            self.metrics.lora_requests.labels(self.adapter).inc()
            self.metrics.lora_tokens.labels(self.adapter).inc(generated)


class _EngineCollector:
    def __init__(self, async_engine) -> None:
        self.async_engine = async_engine

    def collect(self):
        s = self.async_engine.stats
        yield GaugeMetricFamily("kvserve_num_requests_running", "Requests being generated.",
                                value=s["num_running"])
        yield GaugeMetricFamily("kvserve_num_requests_waiting", "Requests queued.",
                                value=self.async_engine.num_waiting)
        yield GaugeMetricFamily("kvserve_kv_cache_usage_perc", "Fraction of KV blocks in use.",
                                value=s["kv_cache_usage"])
        yield GaugeMetricFamily("kvserve_kv_cache_blocks_in_use", "KV blocks referenced.",
                                value=s["num_blocks"] - s["num_free_blocks"])
        queries = s["prefix_cache_queries"]
        yield GaugeMetricFamily("kvserve_prefix_cache_hit_rate", "Prefix-cache block hit rate.",
                                value=s["prefix_cache_hits"] / queries if queries else 0.0)
        yield CounterMetricFamily("kvserve_num_preemptions", "Requests preempted.",
                                  value=s["num_preemptions"])
        yield GaugeMetricFamily("kvserve_lora_slots_in_use", "LoRA slots held by running "
                                "requests.", value=s.get("lora_slots_in_use", 0))
        yield GaugeMetricFamily("kvserve_engine_alive", "1 while the engine loop runs.",
                                value=1.0 if self.async_engine.is_running else 0.0)
