"""Backends and the smooth weighted round-robin policy that picks one per request.

`Backend` holds one upstream's address, weight, counters and availability
(active health plus circuit breaker, see `health.py`). `SmoothWeightedRoundRobin`
is nginx's algorithm: each pick adds every candidate's weight to its running
score, takes the highest and subtracts the total, so a weight-2 backend gets
twice the picks of a weight-1 one, interleaved rather than in bursts. A policy is
one verb, `select(exclude)`, so another policy is another small class.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable, Sequence
from typing import Protocol

from ntonix.config import BackendConfig, CircuitBreakerConfig
from ntonix.health import CircuitBreaker
from ntonix.metrics import Histogram


class Backend:
    """One upstream server with its live state and counters."""

    __slots__ = (
        "breaker",
        "chat_url",
        "consecutive_check_failures",
        "consecutive_check_successes",
        "current_weight",
        "errors",
        "healthy",
        "host",
        "in_flight",
        "key",
        "latency",
        "latency_total_ms",
        "port",
        "requests",
        "url",
        "weight",
    )

    def __init__(self, config: BackendConfig, breaker: CircuitBreakerConfig) -> None:
        self.host = config.host
        self.port = config.port
        self.weight = config.weight
        self.key = f"{config.host}:{config.port}"
        authority = f"[{config.host}]:{config.port}" if ":" in config.host else self.key
        self.url = f"http://{authority}"
        self.chat_url = f"{self.url}/v1/chat/completions"
        self.current_weight = 0
        self.requests = 0
        self.errors = 0
        self.in_flight = 0
        self.latency_total_ms = 0.0
        self.healthy = True
        self.consecutive_check_failures = 0
        self.consecutive_check_successes = 0
        self.breaker = CircuitBreaker(breaker.failure_threshold, breaker.open_seconds)
        self.latency = Histogram()

    def available(self, now: float) -> bool:
        """Whether the backend may take a request now (healthy and its circuit lets it through)."""
        return self.healthy and self.breaker.allows(now)

    def record(self, latency_ms: float, failed: bool) -> None:
        """Count one finished backend request."""
        self.requests += 1
        self.latency_total_ms += latency_ms
        self.latency.observe(latency_ms)
        if failed:
            self.errors += 1


class SelectionPolicy(Protocol):
    """Picks the backend for the next attempt, never one in `exclude`."""

    def select(self, exclude: Collection[Backend] = ()) -> Backend | None: ...


class SmoothWeightedRoundRobin:
    """nginx's smooth weighted round-robin over the available backends."""

    def __init__(self, backends: Sequence[Backend]) -> None:
        self.backends: tuple[Backend, ...] = tuple(backends)

    def select(self, exclude: Collection[Backend] = ()) -> Backend | None:
        now = time.monotonic()
        best: Backend | None = None
        total = 0
        for backend in self.backends:
            if backend in exclude or not backend.available(now):
                continue
            backend.current_weight += backend.weight
            total += backend.weight
            if best is None or backend.current_weight > best.current_weight:
                best = backend
        if best is None:
            return None
        best.current_weight -= total
        best.breaker.on_selected(now)
        return best


def build_backends(
    configs: Iterable[BackendConfig],
    breaker: CircuitBreakerConfig,
    previous: Iterable[Backend] = (),
) -> list[Backend]:
    """Backends for `configs`, keeping the live state of those already known by address."""
    known = {backend.key: backend for backend in previous}
    result: list[Backend] = []
    for config in configs:
        backend = known.get(f"{config.host}:{config.port}")
        if backend is None:
            backend = Backend(config, breaker)
        else:
            backend.weight = config.weight
            backend.current_weight = 0
        result.append(backend)
    return result
