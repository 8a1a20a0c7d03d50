"""Gateway counters and their two views: the seed's JSON and Prometheus text.

Counters are plain attributes bumped on the event loop (one thread, so no
locks). `snapshot()` renders the JSON of SPEC §4 `/metrics`; `prometheus()`
renders the same figures, plus latency histograms per backend, the
time-to-first-token histogram, cache counters and circuit states, in the
Prometheus text exposition format (version 0.0.4).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ntonix.observe.histogram import BUCKETS_MS, Histogram

if TYPE_CHECKING:
    from ntonix.upstream.backend import Backend


class Metrics:
    """Process-wide counters of the gateway."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.requests_total = 0
        self.requests_active = 0
        self.requests_success = 0
        self.requests_error = 0
        self.cache_hits = 0
        self.cache_misses = 0
        self.coalesced = 0
        self.retries = 0
        self.client_disconnects = 0
        self.stream_errors = 0
        self.streams_active = 0
        self.request_latency = Histogram()
        self.ttft = Histogram()

    def finish(self, status: int, latency_ms: float) -> None:
        """Count one answered request."""
        self.requests_active -= 1
        if status < 400:
            self.requests_success += 1
        else:
            self.requests_error += 1
        self.request_latency.observe(latency_ms)

    def snapshot(self, backends: Sequence[Backend], cache: Mapping[str, int]) -> dict[str, Any]:
        """The `/metrics` JSON document."""
        lookups = self.cache_hits + self.cache_misses
        return {
            "requests_total": self.requests_total,
            "requests_active": self.requests_active,
            "requests_success": self.requests_success,
            "requests_error": self.requests_error,
            "cache_hits": self.cache_hits,
            "cache_misses": self.cache_misses,
            "cache_hit_rate": self.cache_hits / lookups if lookups else 0.0,
            "cache_coalesced": self.coalesced,
            "uptime_seconds": time.monotonic() - self.started,
            "connections_active": self.requests_active,
            "connections_total": self.requests_total,
            "streams_active": self.streams_active,
            "client_disconnects": self.client_disconnects,
            "retries": self.retries,
            "stream_errors": self.stream_errors,
            "memory_cache_bytes": cache.get("size_bytes", 0),
            "backends": [_backend_json(b) for b in backends],
        }

    def prometheus(self, backends: Sequence[Backend], cache: Mapping[str, int], enabled: bool) -> str:
        """The same figures in the Prometheus text exposition format."""
        out: list[str] = []
        counter = _family(out, "counter")
        gauge = _family(out, "gauge")
        counter("ntonix_requests_total", "Client requests received.", [((), self.requests_total)])
        counter("ntonix_requests_success_total", "Answers with status < 400.", [((), self.requests_success)])
        counter("ntonix_requests_error_total", "Answers with status >= 400.", [((), self.requests_error)])
        gauge("ntonix_requests_active", "Requests being answered now.", [((), self.requests_active)])
        gauge("ntonix_streams_active", "SSE streams open now.", [((), self.streams_active)])
        counter("ntonix_cache_hits_total", "Answers served from the cache.", [((), self.cache_hits)])
        counter(
            "ntonix_cache_misses_total", "Cacheable requests not in the cache.", [((), self.cache_misses)]
        )
        counter(
            "ntonix_cache_coalesced_total",
            "Requests that waited for an identical one.",
            [((), self.coalesced)],
        )
        counter("ntonix_retries_total", "Attempts retried on another backend.", [((), self.retries)])
        counter(
            "ntonix_client_disconnects_total",
            "Clients that left before the answer ended.",
            [((), self.client_disconnects)],
        )
        counter(
            "ntonix_stream_errors_total",
            "Streams ended early by a backend failure.",
            [((), self.stream_errors)],
        )
        gauge("ntonix_uptime_seconds", "Seconds since start.", [((), time.monotonic() - self.started)])
        gauge("ntonix_cache_enabled", "1 when the response cache is on.", [((), 1 if enabled else 0)])
        counter(
            "ntonix_cache_evictions_total",
            "Cache entries evicted to make room.",
            [((), cache.get("evictions", 0))],
        )
        counter(
            "ntonix_cache_expired_total",
            "Cache entries dropped after their TTL.",
            [((), cache.get("expired", 0))],
        )
        for key in ("entries", "size_bytes", "max_size_bytes"):
            gauge(f"ntonix_cache_{key}", f"Cache {key.replace('_', ' ')}.", [((), cache.get(key, 0))])
        labels = [(("backend", b.key),) for b in backends]
        counter(
            "ntonix_backend_requests_total",
            "Requests sent to the backend.",
            [(lb, b.requests) for lb, b in zip(labels, backends, strict=True)],
        )
        counter(
            "ntonix_backend_errors_total",
            "Failed requests to the backend.",
            [(lb, b.errors) for lb, b in zip(labels, backends, strict=True)],
        )
        gauge(
            "ntonix_backend_healthy",
            "1 when the active health check passes.",
            [(lb, 1 if b.healthy else 0) for lb, b in zip(labels, backends, strict=True)],
        )
        gauge(
            "ntonix_backend_circuit_open",
            "Circuit state: 0 closed, 1 open, 0.5 half-open.",
            [(lb, _CIRCUIT_VALUE[b.breaker.state]) for lb, b in zip(labels, backends, strict=True)],
        )
        gauge(
            "ntonix_backend_in_flight",
            "Requests in flight to the backend.",
            [(lb, b.in_flight) for lb, b in zip(labels, backends, strict=True)],
        )
        _histogram(
            out,
            "ntonix_request_duration_milliseconds",
            "Time to answer a client request.",
            [((), self.request_latency)],
        )
        _histogram(out, "ntonix_ttft_milliseconds", "Time to first streamed byte.", [((), self.ttft)])
        _histogram(
            out,
            "ntonix_backend_latency_milliseconds",
            "Backend request latency.",
            [(lb, b.latency) for lb, b in zip(labels, backends, strict=True)],
        )
        out.append("")
        return "\n".join(out)


_CIRCUIT_VALUE = {"closed": 0.0, "open": 1.0, "half_open": 0.5}

Labels = tuple[tuple[str, str], ...]


def _labels(labels: Labels, extra: tuple[tuple[str, str], ...] = ()) -> str:
    pairs = labels + extra
    if not pairs:
        return ""
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in pairs)
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _family(out: list[str], kind: str) -> Any:
    def emit(name: str, help_text: str, samples: Sequence[tuple[Labels, float]]) -> None:
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            out.append(f"{name}{_labels(labels)} {_number(value)}")

    return emit


def _histogram(
    out: list[str], name: str, help_text: str, samples: Sequence[tuple[Labels, Histogram]]
) -> None:
    out.append(f"# HELP {name} {help_text}")
    out.append(f"# TYPE {name} histogram")
    for labels, hist in samples:
        running = 0
        for bound, count in zip(BUCKETS_MS, hist.counts, strict=False):
            running += count
            out.append(f"{name}_bucket{_labels(labels, (('le', _number(bound)),))} {running}")
        out.append(f"{name}_bucket{_labels(labels, (('le', '+Inf'),))} {hist.count}")
        out.append(f"{name}_sum{_labels(labels)} {_number(hist.total)}")
        out.append(f"{name}_count{_labels(labels)} {hist.count}")


def _number(value: float) -> str:
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def _backend_json(backend: Backend) -> dict[str, Any]:
    requests = backend.requests
    return {
        "host": backend.host,
        "port": backend.port,
        "weight": backend.weight,
        "requests": requests,
        "errors": backend.errors,
        "in_flight": backend.in_flight,
        "latency_avg_ms": backend.latency_total_ms / requests if requests else 0.0,
        "error_rate": backend.errors / requests if requests else 0.0,
        "healthy": backend.healthy,
        "circuit_state": backend.breaker.state,
        "consecutive_failures": backend.breaker.failures,
        "consecutive_check_failures": backend.consecutive_check_failures,
    }
