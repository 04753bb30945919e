"""Prometheus metrics of the server, `oiv2_` prefixed, in a registry of their own (one per app).

The scheduler's worker reports through the `Observer` calls (admitted, token, finished, step); the
HTTP layer counts the requests it refuses (`reject`).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Seconds, from a fraction of a millisecond (a tiny model's step) to minutes (a long queue).
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_E2E_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)

# Finish reasons that are not a completed request.
_FAILED_REASONS = ("error", "cancelled")


class Metrics:
    def __init__(self, max_slots: int) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram(
            "oiv2_time_to_first_token_seconds", "From arrival to the first token.", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "oiv2_inter_token_latency_seconds",
            "Between consecutive tokens of a request.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "oiv2_e2e_request_latency_seconds", "From arrival to the last token.", buckets=_E2E_BUCKETS, registry=r
        )
        self.queue = Histogram(
            "oiv2_queue_time_seconds", "From arrival to the start of prefill.", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.running = Gauge("oiv2_requests_running", "Requests holding a KV-cache slot.", registry=r)
        self.waiting = Gauge("oiv2_requests_waiting", "Requests waiting for a KV-cache slot.", registry=r)
        self.slots_in_use = Gauge("oiv2_kv_cache_slots_in_use", "KV-cache rows held by sequences.", registry=r)
        slots_total = Gauge("oiv2_kv_cache_slots", "KV-cache rows in all (the artifact's max_batch_size).", registry=r)
        slots_total.set(max_slots)
        self.prompt_tokens = Counter("oiv2_prompt_tokens", "Prompt tokens prefilled.", registry=r)
        self.generated_tokens = Counter("oiv2_generation_tokens", "Tokens generated.", registry=r)
        self.finished_requests = Counter(
            "oiv2_requests_finished", "Requests that completed, by finish reason.", ["finish_reason"], registry=r
        )
        self.failed = Counter("oiv2_requests_failed", "Requests that failed, by reason.", ["reason"], registry=r)

    # ---- the scheduler's Observer ---------------------------------------------------------------

    def admitted(self, queue_s: float, prompt_tokens: int) -> None:
        self.queue.observe(queue_s)
        self.prompt_tokens.inc(prompt_tokens)

    def token(self, first: bool, seconds: float) -> None:
        (self.ttft if first else self.itl).observe(seconds)
        self.generated_tokens.inc()

    def finished(self, reason: str, e2e_s: float) -> None:
        if reason in _FAILED_REASONS:
            self.failed.labels(reason=reason).inc()
        else:
            self.finished_requests.labels(finish_reason=reason).inc()
            self.e2e.observe(e2e_s)

    def step(self, running: int, waiting: int, slots_in_use: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)
        self.slots_in_use.set(slots_in_use)

    # ---- the HTTP layer -------------------------------------------------------------------------

    def reject(self, reason: str) -> None:
        """A request refused before it was queued: invalid_request, queue_full, not_ready."""
        self.failed.labels(reason=reason).inc()
