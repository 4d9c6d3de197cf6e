"""Prometheus metrics of the runtime, on an explicit registry created at startup.

Names are the contract in DESIGN.md (prefix `distserve_`, base units, bounded labels). The engine
code calls the small methods here with plain numbers; nothing else touches prometheus_client.
"""

from __future__ import annotations

from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TOKEN_BUCKETS = (1, 4, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
QUEUE_WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# Recent forwards kept for `/forwards` (`distserve profile --in-stack` fits a profile to them).
RECENT_FORWARDS = 8192


class RuntimeMetrics:
    def __init__(self, role: str, model: str, instance: str = "") -> None:
        self.registry = CollectorRegistry()
        self.labels = {"role": role, "model": model, "instance": instance}
        names = list(self.labels)
        reg = self.registry

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, names, buckets=buckets, registry=reg)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, names, registry=reg)

        self.requests = Counter("distserve_requests", "Requests handled", [*names, "status"], registry=reg)
        self.prompt_tokens = histogram(
            "distserve_request_prompt_tokens", "Prompt tokens per request", TOKEN_BUCKETS
        )
        self.output_tokens = histogram(
            "distserve_request_output_tokens", "Output tokens per request", TOKEN_BUCKETS
        )
        self.ttft = histogram("distserve_ttft_seconds", "Time to first token", LATENCY_BUCKETS)
        self.tpot = histogram(
            "distserve_tpot_seconds", "Time per output token after the first", LATENCY_BUCKETS
        )
        self.slo_attained = counter("distserve_slo_attained", "Requests meeting both SLOs")
        self.slo_missed = counter("distserve_slo_missed", "Requests missing an SLO")
        self.queue = Gauge("distserve_queue_requests", "Requests waiting", names, registry=reg)
        # Router only, `role` being the role waited for (router/admission.py).
        self.router_queue = Gauge(
            "distserve_router_queue_requests",
            "Requests waiting in the router for an instance of the role (all saturated or none ready)",
            names,
            registry=reg,
        )
        self.router_queue_wait = histogram(
            "distserve_router_queue_wait_seconds",
            "Time a request waited in the router for an instance of the role (0 when one had room)",
            QUEUE_WAIT_BUCKETS,
        )
        self.kv_bytes = counter("distserve_kv_transfer_bytes", "KV cache bytes transferred")
        self.kv_seconds = histogram(
            "distserve_kv_transfer_seconds", "Time to transfer one KV cache", LATENCY_BUCKETS
        )
        self.batch_size = histogram("distserve_batch_size", "Requests per forward", BATCH_BUCKETS)
        self.forward_seconds = histogram(
            "distserve_forward_seconds",
            "Wall time of one batched forward (prefill batch or decode step)",
            LATENCY_BUCKETS,
        )
        self.draining = Gauge(
            "distserve_draining", "1 while the instance drains (SIGTERM) before it exits", names, registry=reg
        )
        # (rows, width, milliseconds): width is the longest prompt of a prefill batch, or the
        # context a decode step attends to (the longest row's, new token included).
        self.recent: deque[tuple[int, int, float]] = deque(maxlen=RECENT_FORWARDS)

    def request(self, status: str) -> None:
        self.requests.labels(**self.labels, status=status).inc()

    def set_queue(self, n: int) -> None:
        self.queue.labels(**self.labels).set(n)

    def set_draining(self, on: bool) -> None:
        self.draining.labels(**self.labels).set(1 if on else 0)

    def set_router_queue(self, role: str, n: int) -> None:
        self.router_queue.labels(**(self.labels | {"role": role})).set(n)

    def router_waited(self, role: str, seconds: float) -> None:
        self.router_queue_wait.labels(**(self.labels | {"role": role})).observe(seconds)

    def batch(self, n: int) -> None:
        self.batch_size.labels(**self.labels).observe(n)

    def forward(self, rows: int, width: int, seconds: float) -> None:
        self.forward_seconds.labels(**self.labels).observe(seconds)
        self.recent.append((rows, width, round(seconds * 1e3, 3)))

    def forwards(self) -> dict[str, object]:
        """The recent forwards, for `GET /forwards`."""
        return {"role": self.labels["role"], "forwards": [list(f) for f in self.recent]}

    def kv_transfer(self, nbytes: int, seconds: float | None) -> None:
        self.kv_bytes.labels(**self.labels).inc(nbytes)
        if seconds is not None:
            self.kv_seconds.labels(**self.labels).observe(seconds)

    def finished(
        self, prompt: int, output: int, ttft: float, tpot: float | None, slo: tuple[float, float] | None
    ) -> bool | None:
        """Record a finished request; returns whether it met the SLO (TTFT, TPOT in seconds), if one is set."""
        self.prompt_tokens.labels(**self.labels).observe(prompt)
        self.output_tokens.labels(**self.labels).observe(output)
        self.ttft.labels(**self.labels).observe(ttft)
        if tpot is not None:
            self.tpot.labels(**self.labels).observe(tpot)
        if slo is None:
            return None
        met = ttft <= slo[0] and (tpot is None or tpot <= slo[1])
        (self.slo_attained if met else self.slo_missed).labels(**self.labels).inc()
        return met

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
