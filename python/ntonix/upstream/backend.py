"""One upstream server: its identity, weight, live counters and availability.

`Backend` holds what is true of the server (address, weight, requests, errors,
in-flight, health flag, circuit breaker), not any policy's bookkeeping.
"""

from __future__ import annotations

from collections.abc import Iterable

from ntonix.config import BackendConfig, CircuitBreakerConfig
from ntonix.observe.histogram import Histogram
from ntonix.upstream.breaker import CircuitBreaker


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
