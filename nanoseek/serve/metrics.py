"""`/metrics` in Prometheus' text format: what the server answered (requests by endpoint and status,
latency, time to first token, policy decisions) and the engine's load (tokens generated, requests
running and waiting, KV-cache rows and slots in use), in a registry of the app's own so that several
apps in one process never share or clash."""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..infer.scheduler import Scheduler
from .policy import Decision

ARRIVAL = "nanoseek.arrival"  # scope key: time.monotonic() when the request arrived
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """The app's collectors. `observe_request` is called once per HTTP request (by MetricsMiddleware),
    `first_token` once per generation, `policy` per decision."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, scheduler: Scheduler):
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("nanoseek_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("nanoseek_request_duration_seconds",
                                 "Time from a request's arrival to the end of its answer (streams included)",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.ttft = Histogram("nanoseek_time_to_first_token_seconds",
                              "Time from a generation request's arrival to its first generated token",
                              ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.decisions = Counter("nanoseek_policy_decisions", "Content policy decisions, by rule, action and "
                                 "where (input or output)", ["rule", "action", "where"], registry=self.registry)
        self.registry.register(_EngineCollector(scheduler))

    def observe_request(self, endpoint: str, status: int, seconds: float):
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def first_token(self, endpoint: str, seconds: float):
        self.ttft.labels(endpoint).observe(seconds)

    def policy(self, decision: Decision):
        self.decisions.labels(decision.rule, decision.action, decision.where).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    """The engine's counters and load, read at scrape time (plain reads of the engine thread's state)."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler

    def collect(self):
        s, engine = self.scheduler, self.scheduler.engine
        stats = engine.stats
        yield CounterMetricFamily("nanoseek_generated_tokens", "Tokens generated (rate() of it: tokens/s)",
                                  value=stats["generated_tokens"])
        yield CounterMetricFamily("nanoseek_prompt_tokens", "Prompt tokens prefilled", value=stats["prompt_tokens"])
        running, in_flight = engine.num_running, s.in_flight
        yield GaugeMetricFamily("nanoseek_requests_running", "Sequences in the running batch", value=running)
        yield GaugeMetricFamily("nanoseek_queue_depth", "Sequences accepted and waiting for a batch row",
                                value=max(0, in_flight - running))
        yield GaugeMetricFamily("nanoseek_queue_capacity", "Sequences accepted at most (batch + queue)",
                                value=s.capacity)
        yield GaugeMetricFamily("nanoseek_kv_cache_rows_in_use", "KV-cache rows (batch places) in use",
                                value=len(engine.slots.rows))
        yield GaugeMetricFamily("nanoseek_kv_cache_rows", "KV-cache rows (max batch)", value=engine.max_batch)
        yield GaugeMetricFamily("nanoseek_kv_cache_slots_in_use", "KV-cache slots (positions) filled per row",
                                value=engine.slots.length)
        yield GaugeMetricFamily("nanoseek_kv_cache_slots", "KV-cache slots per row at most",
                                value=engine.slots.max_slots)
        yield GaugeMetricFamily("nanoseek_engine_up", "1 while the engine thread runs", value=int(s.alive))


class MetricsMiddleware:
    """ASGI middleware: counts every HTTP answer by endpoint (the route's path; "other" for unknown
    paths, so clients cannot grow the label set) and status, and times it to its last byte."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.monotonic(), [500]
        scope[ARRIVAL] = start  # the handlers time the first token from here

        async def send_and_see(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, send_and_see)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "other"
            self.metrics.observe_request(endpoint, status[0], time.monotonic() - start)
