"""Gateway counters and their two views: the seed's JSON and Prometheus text.

Counters are plain attributes bumped on the event loop (one thread, so no
locks). `snapshot()` renders the `/metrics` JSON (fields listed in the README); `prometheus()`
renders the same figures, plus latency histograms per backend, the
time-to-first-token histogram, cache counters and circuit states, in the
Prometheus text exposition format (version 0.0.4).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ntonix.observe.histogram import BUCKETS_MS, Histogram, percentiles

if TYPE_CHECKING:
    from ntonix.upstream.backend import Backend


class ModelStats:
    """Counters of one (route, model) pair."""

    __slots__ = ("cache_hits", "cached_tokens", "completion_tokens", "errors", "prompt_tokens", "requests")

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.cache_hits = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cached_tokens = 0


# Label of requests whose model the gateway does not list (bounds the label values).
OTHER_MODEL = "other"
NO_MODEL = "-"


class Metrics:
    """Process-wide counters of the gateway."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.created = int(time.time())  # `created` of the model objects the gateway lists
        self.requests_total = 0
        self.requests_active = 0
        self.requests_success = 0
        self.requests_error = 0
        self.coalesced = 0
        self.coalesced_streams = 0  # streaming requests that joined a live generation
        self.stream_group_peak = 0  # most clients attached to one live generation
        self.followers_dropped = 0  # followers disconnected for falling behind
        self.embedding_inputs_hit = 0  # embedding inputs answered without computing them upstream
        self.embedding_inputs_missed = 0  # embedding inputs sent upstream
        self.retries = 0
        self.client_disconnects = 0
        self.stream_errors = 0
        self.streams_active = 0
        self.requests_client_error = 0
        self.request_latency = Histogram()
        self.ttft = Histogram()
        self.models: dict[tuple[str, str], ModelStats] = {}
        self.known_models: Callable[[], frozenset[str]] = frozenset
        self.policy = "round_robin"
        self.policy_stats: Callable[[], dict[str, object]] = dict

    def finish(self, status: int, latency_ms: float, client_error: bool = False) -> None:
        """Count one answered request (`client_error`: a 4xx the gateway made for bad input)."""
        self.requests_active -= 1
        if status < 400:
            self.requests_success += 1
        else:
            self.requests_error += 1
            if client_error:
                self.requests_client_error += 1
        self.request_latency.observe(latency_ms)

    def model(self, route: str, model: str | None) -> ModelStats:
        """The counters of `model` on `route`; models the gateway does not list share one label."""
        if model is None:
            label = NO_MODEL
        elif model in self.known_models():
            label = model
        else:
            label = OTHER_MODEL
        stats = self.models.get((route, label))
        if stats is None:
            stats = self.models[(route, label)] = ModelStats()
        return stats

    def models_json(self) -> dict[str, dict[str, Any]]:
        """Per model (all routes summed), with a per-route breakdown."""
        out: dict[str, dict[str, Any]] = {}
        for (route, model), stats in sorted(self.models.items()):
            entry = out.setdefault(
                model,
                {
                    "requests": 0,
                    "errors": 0,
                    "cache_hits": 0,
                    "prompt_tokens": 0,
                    "completion_tokens": 0,
                    "cached_tokens": 0,
                    "routes": {},
                },
            )
            row = {name: getattr(stats, name) for name in ModelStats.__slots__}
            for name, value in row.items():
                entry[name] += value
            entry["routes"][route] = row
        return out

    def snapshot(self, backends: Sequence[Backend], cache: Mapping[str, int]) -> dict[str, Any]:
        """The `/metrics` JSON document."""
        hits, misses = cache.get("hits", 0), cache.get("misses", 0)
        return {
            "requests_total": self.requests_total,
            "requests_active": self.requests_active,
            "requests_success": self.requests_success,
            "requests_error": self.requests_error,
            "requests_client_error": self.requests_client_error,
            "requests_failed": self.requests_error - self.requests_client_error,
            "cache_hits": hits,
            "cache_misses": misses,
            "cache_hit_rate": hits / (hits + misses) if hits + misses else 0.0,
            "cache_coalesced": self.coalesced,
            "streams_coalesced": self.coalesced_streams,
            "stream_group_clients_max": self.stream_group_peak,
            "stream_followers_dropped": self.followers_dropped,
            "embedding_inputs_hit": self.embedding_inputs_hit,
            "embedding_inputs_missed": self.embedding_inputs_missed,
            "uptime_seconds": time.monotonic() - self.started,
            "connections_active": self.requests_active,
            "connections_total": self.requests_total,
            "streams_active": self.streams_active,
            "client_disconnects": self.client_disconnects,
            "retries": self.retries,
            "stream_errors": self.stream_errors,
            "memory_cache_bytes": cache.get("size_bytes", 0),
            "ttft_ms": percentiles(self.ttft),
            "latency_ms": percentiles(self.request_latency),
            "routing_policy": self.policy,
            "routing": self.policy_stats(),
            "models": self.models_json(),
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
        counter(
            "ntonix_cache_hits_total", "Cache lookups that found an answer.", [((), cache.get("hits", 0))]
        )
        counter(
            "ntonix_cache_misses_total", "Cache lookups that found nothing.", [((), cache.get("misses", 0))]
        )
        counter(
            "ntonix_cache_coalesced_total",
            "Requests that waited for an identical one.",
            [((), self.coalesced)],
        )
        counter(
            "ntonix_streams_coalesced_total",
            "Streaming requests that joined a live identical generation.",
            [((), self.coalesced_streams)],
        )
        gauge(
            "ntonix_stream_group_clients_max",
            "Most clients attached to one live generation.",
            [((), self.stream_group_peak)],
        )
        counter(
            "ntonix_stream_followers_dropped_total",
            "Stream followers disconnected for falling behind.",
            [((), self.followers_dropped)],
        )
        counter(
            "ntonix_embedding_inputs_hit_total",
            "Embedding inputs answered without computing them upstream.",
            [((), self.embedding_inputs_hit)],
        )
        counter(
            "ntonix_embedding_inputs_missed_total",
            "Embedding inputs sent upstream.",
            [((), self.embedding_inputs_missed)],
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
        routing = self.policy_stats()
        gauge(
            "ntonix_routing_policy_info",
            "The balancing policy (label policy), always 1.",
            [((("policy", str(routing.get("policy", self.policy))),), 1)],
        )
        index = routing.get("prefix_index")
        if isinstance(index, dict):
            for name, value in sorted(index.items()):
                if isinstance(value, int | float):
                    gauge(
                        f"ntonix_prefix_index_{name}",
                        f"Prefix index: {name.replace('_', ' ')}.",
                        [((), value)],
                    )
        counter(
            "ntonix_requests_client_error_total",
            "Answers >= 400 the gateway made for bad input.",
            [((), self.requests_client_error)],
        )
        per_model = sorted(self.models.items())
        model_labels = [(("route", route), ("model", model)) for (route, model), _ in per_model]
        for name, help_text in (
            ("requests", "Requests by route and model."),
            ("errors", "Answers >= 400 by route and model."),
            ("cache_hits", "Cache hits by route and model."),
            ("prompt_tokens", "Prompt tokens reported by backends' usage."),
            ("completion_tokens", "Completion tokens reported by backends' usage."),
            ("cached_tokens", "Prompt tokens the backend reported as served from its KV cache."),
        ):
            counter(
                f"ntonix_model_{name}_total",
                help_text,
                [(lb, getattr(st, name)) for lb, (_, st) in zip(model_labels, per_model, strict=True)],
            )
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
        "url": backend.url,
        "models": sorted(backend.models) if backend.models is not None else None,
        "healthy": backend.healthy,
        "circuit_state": backend.breaker.state,
        "consecutive_failures": backend.breaker.failures,
        "consecutive_check_failures": backend.consecutive_check_failures,
    }
