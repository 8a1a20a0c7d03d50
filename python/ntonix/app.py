"""The RSGI application `ntonix.app:app` that Granian serves.

`App` owns the process-wide parts: one `Forwarder` (the Rust client and its
pools), one response cache, the backends and their balancer, the health checker
and the metrics. Granian calls `__rsgi_init__(loop)` once per server it runs
(twice with TLS: plain and HTTPS share this one app), so start-up and tear-down
are reference-counted. Routing is a dict lookup on the path; the chat route is
handed to `Proxy`, the rest answer from the gateway's own state.

Served by `granian --interface rsgi ntonix.app`, the module-level `app` reads its
configuration from the `NTONIX_*` environment (and `NTONIX_CONFIG`) at start-up.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

import msgspec

from ntonix import __version__
from ntonix._core import Forwarder, ResponseCache, init_runtime
from ntonix.balance.round_robin import SmoothWeightedRoundRobin
from ntonix.config import BackendConfig, ConfigError, Settings, load_settings
from ntonix.errors import error_body
from ntonix.observe.metrics import Metrics
from ntonix.pipeline.proxy import CHAT_ROUTE, Proxy
from ntonix.upstream.backend import Backend, build_backends
from ntonix.upstream.health import HealthChecker

log = logging.getLogger("ntonix")

JSON_HEADERS = [("content-type", "application/json")]
_encode = msgspec.json.Encoder().encode

INDEX = _encode(
    {
        "name": "NTONIX",
        "version": __version__,
        "description": "OpenAI-compatible inference gateway for local LLM clusters",
        "endpoints": {
            "health": "/health",
            "metrics": "/metrics",
            "cache_stats": "/cache/stats",
            "chat_completions": CHAT_ROUTE,
        },
    }
)
HEALTHY = _encode({"status": "healthy"})
_EMPTY_CACHE_STATS = {
    "hits": 0,
    "misses": 0,
    "evictions": 0,
    "expired": 0,
    "entries": 0,
    "size_bytes": 0,
    "max_size_bytes": 0,
}


class App:
    """One gateway process: routing plus the shared state every request uses."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings
        self._users = 0
        self.started = False
        self._health_task: asyncio.Task[None] | None = None
        self._requests: set[asyncio.Task[Any]] = set()

    # -- lifecycle --------------------------------------------------------------------------

    def __rsgi_init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._users += 1
        if not self.started:
            self.start(loop)

    def __rsgi_del__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._users -= 1
        if self._users <= 0:
            self.stop()

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Build the shared parts and start health checks on `loop`."""
        if self.settings is None:
            self.settings = _settings_from_env()
        settings = self.settings
        init_runtime(settings.server.threads)
        proxy = settings.proxy
        self.forwarder = Forwarder(
            loop,
            connect_timeout=proxy.connect_timeout_seconds,
            first_byte_timeout=proxy.ttfb_timeout_seconds,
            idle_timeout=proxy.stream_idle_timeout_seconds,
            total_timeout=proxy.request_timeout_seconds,
        )
        loop.add_reader(self.forwarder.wake_fd, self.forwarder.drain)
        self._loop = loop
        cache_cfg = settings.cache
        self.cache = (
            ResponseCache(int(cache_cfg.max_size_mb * 1024 * 1024), float(cache_cfg.ttl_seconds))
            if cache_cfg.enabled
            else None
        )
        self.metrics = Metrics()
        self.backends: list[Backend] = build_backends(settings.backends, settings.circuit_breaker)
        self.balancer = SmoothWeightedRoundRobin(self.backends)
        self.proxy = Proxy(settings, self.forwarder, self.cache, self.metrics, lambda: self.balancer)
        self.health = HealthChecker(settings.health_check, self.forwarder, lambda: self.backends)
        self._health_task = loop.create_task(self.health.run())
        self._routes = {
            "/": self._index,
            "/health": self._health,
            "/metrics": self._metrics,
            "/metrics/prometheus": self._prometheus,
            "/cache/stats": self._cache_stats,
            "/dashboard": __import__("ntonix.admin.dashboard", fromlist=["serve"]).serve,  # interim (#15)
        }
        self.started = True
        _tune_gc()
        log.info("gateway ready with %d backend(s)", len(self.backends))

    def stop(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            self._health_task = None
        if self.started:
            self.proxy.slow.close()
            self._loop.remove_reader(self.forwarder.wake_fd)
        self.started = False

    def update_backends(self, configs: Sequence[BackendConfig]) -> None:
        """Apply a new backend list (add, remove, re-weight); requests in flight keep theirs."""
        assert self.settings is not None
        self.backends = build_backends(configs, self.settings.circuit_breaker, self.backends)
        self.balancer = SmoothWeightedRoundRobin(self.backends)
        self.settings = msgspec.structs.replace(self.settings, backends=tuple(configs))
        log.warning("backends reloaded: %s", ", ".join(f"{b.key} (weight {b.weight})" for b in self.backends))

    def cancel_requests(self) -> int:
        """Cancel every chat request in flight (shutdown after the grace period); answers how many."""
        tasks = list(self._requests)
        for task in tasks:
            task.cancel()
        return len(tasks)

    # -- routing ----------------------------------------------------------------------------

    async def __rsgi__(self, scope: Any, proto: Any) -> None:
        if scope.proto != "http":
            return
        path = scope.path
        if path == CHAT_ROUTE:
            if scope.method == "POST":
                task = asyncio.current_task()
                if task is None:  # Granian's Rust task implementation: not cancellable at shutdown
                    await self.proxy.handle(scope, proto)
                    return
                self._requests.add(task)
                try:
                    await self.proxy.handle(scope, proto)
                finally:
                    self._requests.discard(task)
            else:
                self._fail(proto, 405, "method_not_allowed", f"{scope.method} is not allowed on {path}")
            return
        route = self._routes.get(path)
        if route is None:
            self._fail(proto, 404, "not_found", f"no route for {path}")
        elif scope.method not in ("GET", "HEAD"):
            self._fail(proto, 405, "method_not_allowed", f"{scope.method} is not allowed on {path}")
        else:
            route(scope, proto)

    def _fail(self, proto: Any, status: int, code: str, message: str) -> None:
        proto.response_bytes(status, JSON_HEADERS, error_body(status, message, code))

    def _index(self, scope: Any, proto: Any) -> None:
        proto.response_bytes(200, JSON_HEADERS, INDEX)

    def _health(self, scope: Any, proto: Any) -> None:
        proto.response_bytes(200, JSON_HEADERS, HEALTHY)

    def cache_stats(self) -> dict[str, Any]:
        stats = self.cache.stats() if self.cache is not None else dict(_EMPTY_CACHE_STATS)
        lookups = stats["hits"] + stats["misses"]
        return {
            "enabled": self.cache is not None,
            **stats,
            "hit_rate": stats["hits"] / lookups if lookups else 0.0,
        }

    def _cache_stats(self, scope: Any, proto: Any) -> None:
        proto.response_bytes(200, JSON_HEADERS, _encode(self.cache_stats()))

    def _metrics(self, scope: Any, proto: Any) -> None:
        accept = scope.headers.get("accept") or ""
        if "text/plain" in accept or "openmetrics" in accept:
            self._prometheus(scope, proto)
            return
        stats = self.cache.stats() if self.cache is not None else _EMPTY_CACHE_STATS
        proto.response_bytes(200, JSON_HEADERS, _encode(self.metrics.snapshot(self.backends, stats)))

    def _prometheus(self, scope: Any, proto: Any) -> None:
        stats = self.cache.stats() if self.cache is not None else _EMPTY_CACHE_STATS
        text = self.metrics.prometheus(self.backends, stats, self.cache is not None)
        proto.response_str(200, [("content-type", "text/plain; version=0.0.4; charset=utf-8")], text)


def _tune_gc() -> None:
    """Keep the cyclic GC off the hot path.

    NOTE: each request allocates a few hundred container objects that die young; with the default
    gen-0 threshold (700) the collector ran every few requests and cost ~4% of the CPU under load.
    Start-up objects are frozen so collections never walk them.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 50)


def _settings_from_env() -> Settings:
    """Settings for `granian --interface rsgi ntonix.app`: environment and NTONIX_CONFIG only."""
    try:
        settings = load_settings(None, os.environ, None)
    except ConfigError as err:
        print(f"ntonix: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    from ntonix.logs import setup_logging

    setup_logging(settings.logging)
    return settings


app = App()
