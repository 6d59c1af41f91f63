"""Prometheus metrics of the server (docs/design.md, "Server"), prefix ``ponder_``.

One ``ServerMetrics`` per server, on its own registry, so tests can run
several servers in one process. The engine records the model-side figures
(λ, chunks updated and skipped by schedule, the target update rate of each
request, TTT FLOPs, sessions, compilations); the front ends record
requests by outcome and latencies.
"""

from __future__ import annotations

import dataclasses
import time

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 1.0)
LAMBDA_BUCKETS = (0.0, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0)
RATE_BUCKETS = tuple(i / 20 for i in range(21))  # update rates, every 0.05 in [0, 1]


@dataclasses.dataclass
class ServerMetrics:
    registry: CollectorRegistry

    @classmethod
    def create(cls) -> "ServerMetrics":
        registry = CollectorRegistry()
        m = cls(registry)
        p = "ponder_"
        m.requests = Counter(p + "requests", "Requests by endpoint and outcome.", ["endpoint", "outcome"], registry=registry)
        m.ttft = Histogram(p + "time_to_first_token_seconds", "Time from arrival to the first token.", buckets=LATENCY_BUCKETS, registry=registry)
        m.inter_token = Histogram(
            p + "inter_token_latency_seconds", "Time between consecutive generated tokens.", buckets=TOKEN_LATENCY_BUCKETS, registry=registry
        )
        m.e2e = Histogram(p + "request_latency_seconds", "Time from arrival to the last event.", buckets=LATENCY_BUCKETS, registry=registry)
        m.queue_time = Histogram(p + "queue_time_seconds", "Time from arrival to a decode slot.", buckets=LATENCY_BUCKETS, registry=registry)
        m.running = Gauge(p + "requests_running", "Requests holding a decode slot.", registry=registry)
        m.waiting = Gauge(p + "requests_waiting", "Requests queued for a slot.", registry=registry)
        m.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens received.", registry=registry)
        m.prefill_tokens = Counter(p + "prefill_tokens", "Prompt tokens computed (not served from a session).", registry=registry)
        m.generated_tokens = Counter(p + "generated_tokens", "Tokens generated.", registry=registry)
        m.chunk_lambda = Histogram(p + "chunk_lambda", "λ of each chunk the fast weights processed.", buckets=LAMBDA_BUCKETS, registry=registry)
        # updated / (updated + skipped) by schedule is the realised update rate.
        m.chunks = Counter(
            p + "chunks", "Chunks by schedule and whether the fast weights were updated.", ["schedule", "action"], registry=registry
        )
        m.target_update_rate = Histogram(
            p + "target_update_rate", "Target update rate (budget) each request ran under, by schedule (budgeted schedules).",
            ["schedule"], buckets=RATE_BUCKETS, registry=registry,
        )
        m.ttt_flops = Counter(p + "ttt_update_flops", "FLOPs spent on fast-weight updates.", registry=registry)
        m.fast_weight_clips = Counter(
            p + "fast_weight_clipped_updates",
            "Fast-weight updates scaled down to the norm cap (In-Place deltas, LoRA steps).", registry=registry,
        )
        m.sessions_active = Gauge(p + "sessions_active", "Sessions held in memory.", registry=registry)
        m.session_bytes = Gauge(p + "session_memory_bytes", "Bytes held by sessions.", registry=registry)
        m.sessions_evicted = Counter(p + "sessions_evicted", "Sessions evicted under the memory cap.", registry=registry)
        m.sessions_reset = Counter(p + "sessions_reset", "Session resets by reason.", ["reason"], registry=registry)
        m.session_lookups = Counter(
            p + "session_lookups", "Session lookups: hit (state reused), miss (new or rebuilt).", ["result"], registry=registry
        )
        m.cancellations = Counter(p + "cancellations", "Requests cancelled, by reason.", ["reason"], registry=registry)
        m.compilations = Counter(p + "compilations", "XLA compilations by the engine (flat after warm-up).", registry=registry)
        m.slots = Gauge(p + "decode_slots", "Decode slots of the engine.", registry=registry)
        m.memory = Gauge(
            p + "memory_bytes",
            "Memory by part: weights (the parameters as served), slots (the decode slots' KV caches and states), "
            "warmup (resident growth while compiling: executables and their buffers).", ["part"], registry=registry,
        )
        for outcome in ("ok", "client_error", "rejected", "cancelled", "deadline", "error"):
            m.requests.labels("completions", outcome)
        return m

    def render(self) -> tuple[bytes, str]:
        """(exposition text, content type)."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestRecord:
    """One request's figures as a front end sees them: TTFT at the first token, the outcome (and
    the end-to-end latency of a completed request) recorded once, whatever ends it first."""

    def __init__(self, metrics: ServerMetrics, endpoint: str):
        self.metrics, self.endpoint = metrics, endpoint
        self.start, self.first_token, self.end, self.outcome = time.monotonic(), None, None, None

    def token(self) -> None:
        """A token reached the client side of the service."""
        if self.first_token is None:
            self.first_token = time.monotonic()
            self.metrics.ttft.observe(self.first_token - self.start)

    def done(self, outcome: str, completed: bool = False) -> None:
        """``outcome``: ok, client_error, rejected, cancelled, deadline or error; ``completed``: a
        final answer was produced (its latency goes into the end-to-end histogram)."""
        if self.outcome is None:
            self.outcome, self.end = outcome, time.monotonic()
            self.metrics.requests.labels(self.endpoint, outcome).inc()
            if completed:
                self.metrics.e2e.observe(self.end - self.start)


def finish_outcome(finish_reason: str) -> str:
    """The request outcome of a completion that ended with ``finish_reason``."""
    return {"cancelled": "cancelled", "deadline": "deadline"}.get(finish_reason, "ok")
