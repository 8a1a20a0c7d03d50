"""One upstream server: its identity, weight, live counters and availability.

`Backend` holds what is true of the server (address, base URL, weight, the
models it serves, requests, errors, in-flight, health flag, circuit breaker),
not any policy's bookkeeping: a policy keeps its own state keyed by `Backend.id`.
A backend serving several models is one `Backend` (one pool of connections,
one health state, one breaker) however many model pools list it.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable

from ntonix.config import BackendConfig, CircuitBreakerConfig, parse_url
from ntonix.observe.histogram import Histogram
from ntonix.upstream.breaker import CircuitBreaker

_ids = itertools.count(1)
log = logging.getLogger("ntonix.backends")


def backend_key(config: BackendConfig) -> str:
    """The identity of a configured backend: `host:port`, or its URL without a trailing slash."""
    if config.url is not None:
        return config.url.strip().rstrip("/")
    return f"{config.host}:{config.port}"


class Backend:
    """One upstream server with its live state and counters."""

    __slots__ = (
        "api_key",
        "breaker",
        "configured_models",
        "consecutive_check_failures",
        "consecutive_check_successes",
        "discovered_models",
        "errors",
        "health_path",
        "healthy",
        "host",
        "id",
        "in_flight",
        "key",
        "last_progress",
        "last_sent",
        "latency",
        "latency_total_ms",
        "port",
        "requests",
        "scheme",
        "url",
        "weight",
    )

    def __init__(self, config: BackendConfig, breaker: CircuitBreakerConfig) -> None:
        self.id = next(_ids)
        self.key = backend_key(config)
        if config.url is not None:
            parts = parse_url(config.url)
            self.scheme, self.host, self.port, prefix = parts
        else:
            assert config.host is not None and config.port is not None  # validated by config
            self.scheme, self.host, self.port, prefix = "http", config.host, config.port, ""
        authority = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        # Base URL every upstream path is appended to (a path prefix such as /openai is kept).
        self.url = f"{self.scheme}://{authority}{prefix}"
        if prefix.endswith("/v1"):
            log.warning(
                "backend %s: its URL ends in /v1; requests go to %s/v1/... (give the base URL without /v1)",
                self.key,
                self.url,
            )
        self.requests = 0
        self.errors = 0
        self.in_flight = 0
        self.latency_total_ms = 0.0
        self.healthy = True
        self.consecutive_check_failures = 0
        self.consecutive_check_successes = 0
        self.breaker = CircuitBreaker(breaker.failure_threshold, breaker.open_seconds)
        self.latency = Histogram()
        # Monotonic time of the last sign of life on real traffic (an answer, a stream chunk).
        self.last_progress = 0.0
        # Monotonic time the latest request was placed on it (prefill can be long before any byte).
        self.last_sent = 0.0
        self.discovered_models: frozenset[str] | None = None
        self.configure(config)

    def configure(self, config: BackendConfig) -> None:
        """Apply the parts of a (re)loaded configuration that may change in place."""
        self.weight = config.weight
        self.configured_models = None if config.models is None else frozenset(config.models)
        self.api_key = config.api_key
        self.health_path = config.health_path

    @property
    def models(self) -> frozenset[str] | None:
        """The models it serves: configured, else discovered; None while unknown (eligible for any)."""
        return self.configured_models if self.configured_models is not None else self.discovered_models

    def serves(self, model: str) -> bool:
        models = self.models
        return models is None or model in models

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
        backend = known.pop(backend_key(config), None)
        if backend is None:
            backend = Backend(config, breaker)
        else:
            backend.configure(config)
        result.append(backend)
    return result
