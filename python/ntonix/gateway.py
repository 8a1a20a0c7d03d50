"""The composition root: builds the forwarder, cache, metrics, backends, model registry and health checker.

One `Gateway` per process. What a reload may change (backends, their models,
aliases) lives in one immutable `ModelRegistry` snapshot that `reload` swaps in
a single assignment: a request in flight keeps the pool it resolved, the next
request sees the new one. Backends known by address keep their live state
(counters, health, breaker) across a reload.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import msgspec

from ntonix._core import Forwarder, ResponseCache, init_runtime
from ntonix.auth.guard import Guard
from ntonix.auth.keys import KeyConfigError, KeyTable, build_table
from ntonix.balance import make_policy, make_shared_policy
from ntonix.config import Settings
from ntonix.limits.limiter import Limiter
from ntonix.limits.shared import SharedLimits
from ntonix.observe.metrics import Metrics
from ntonix.pipeline.proxy import Proxy
from ntonix.upstream.backend import Backend, build_backends
from ntonix.upstream.health import HealthChecker
from ntonix.upstream.registry import ModelRegistry

if TYPE_CHECKING:
    from ntonix.cache.redis_tier import RedisTier

log = logging.getLogger("ntonix")

_EMPTY_CACHE_STATS = {
    "hits": 0,
    "misses": 0,
    "evictions": 0,
    "expired": 0,
    "entries": 0,
    "size_bytes": 0,
    "max_size_bytes": 0,
}


class Gateway:
    """Everything one gateway process shares between requests."""

    def __init__(self, settings: Settings, loop: asyncio.AbstractEventLoop) -> None:
        self.settings = settings
        init_runtime(settings.server.threads)
        proxy = settings.proxy
        self.forwarder = Forwarder(
            loop,
            connect_timeout=proxy.connect_timeout_seconds,
            first_byte_timeout=proxy.ttfb_timeout_seconds,
            idle_timeout=proxy.stream_idle_timeout_seconds,
            total_timeout=proxy.request_timeout_seconds,
            ca_file=proxy.ca_file or None,
        )
        cache_cfg = settings.cache
        self.cache = (
            ResponseCache(int(cache_cfg.max_size_mb * 1024 * 1024), float(cache_cfg.ttl_seconds))
            if cache_cfg.enabled
            else None
        )
        self.metrics = Metrics()
        self.metrics.policy = settings.routing.policy
        self.backends: list[Backend] = build_backends(settings.backends, settings.circuit_breaker)
        self.shared_policy = make_shared_policy(settings.routing)
        self.registry = self._registry(settings, self.backends)
        self.metrics.policy_stats = self.policy_stats
        self.metrics.known_models = lambda: self.registry.known
        self.proxy = Proxy(settings, self.forwarder, self.cache, self.metrics, lambda: self.registry)
        self.limiter = Limiter()
        self.redis: RedisTier | None = None
        self.shared_limits: SharedLimits | None = None
        if self.cache is not None and cache_cfg.redis_url:
            from ntonix.cache.redis_tier import RedisTier

            self.redis = RedisTier(cache_cfg, self.cache, cache_cfg.scope)
            self.redis.start(loop)
            self.proxy.shared = self.redis
            self.shared_limits = SharedLimits(self.redis, self.limiter)
        self._set_guard(self._guard(build_table(settings.auth)))
        self.health = HealthChecker(
            settings.health_check,
            self.forwarder,
            lambda: self.backends,
            self._models_changed,
            on_unhealthy=self._backend_down,
        )

    def _registry(self, settings: Settings, backends: list[Backend]) -> ModelRegistry:
        routing = settings.routing
        shared = self.shared_policy
        return ModelRegistry(backends, dict(settings.models.aliases), lambda: make_policy(routing, shared))

    def _backend_down(self, backend: Backend) -> None:
        """A backend went unhealthy: the prefix index forgets what it believed that backend holds."""
        if self.shared_policy is not None:
            self.shared_policy.forget(backend.id)

    def _guard(self, table: KeyTable) -> Guard:
        return Guard(table, self.limiter, self.settings.cache.scope == "key", self.shared_limits)

    def _set_guard(self, guard: Guard) -> None:
        self.guard = guard
        self.proxy.guard = guard if guard.keys_on else None  # no keys: the pipeline skips the phase

    def _reload_keys(self, fresh: Settings) -> None:
        """Swap in the re-read keys; a bad keys file keeps the old ones (one log line)."""
        try:
            table = build_table(fresh.auth)
        except KeyConfigError as err:
            log.error("keys reload failed, keeping the old keys: %s", err)
            return
        self._set_guard(self._guard(table))
        self.settings = msgspec.structs.replace(self.settings, auth=fresh.auth)
        log.info("keys reloaded: %d key(s)%s", len(table.by_digest), ", admin key set" if table.admin else "")

    def _models_changed(self) -> None:
        self.registry.invalidate()

    def reload(self, fresh: Settings) -> None:
        """Apply a re-read configuration's backends, models and aliases; requests in flight keep theirs."""
        backends = build_backends(fresh.backends, self.settings.circuit_breaker, self.backends)
        kept = {b.id for b in backends}
        for gone in self.backends:
            if gone.id not in kept:
                self._backend_down(gone)
        registry = self._registry(
            msgspec.structs.replace(self.settings, models=fresh.models, routing=self.settings.routing),
            backends,
        )
        self.backends, self.registry = backends, registry
        self.settings = msgspec.structs.replace(self.settings, backends=fresh.backends, models=fresh.models)
        log.info(
            "backends reloaded: %s",
            ", ".join(f"{b.key} (weight {b.weight})" for b in backends),
        )
        self._reload_keys(fresh)

    def policy_stats(self) -> dict[str, object]:
        """`routing` in /metrics: the policy, and for `prefix` its index's size, memory and match rate."""
        stats: dict[str, object] = {"policy": self.settings.routing.policy}
        if self.shared_policy is not None:
            index = self.shared_policy.stats()
            lookups = index.get("lookups", 0)
            stats["prefix_index"] = {
                **index,
                "match_rate": index.get("matched_lookups", 0) / lookups if lookups else 0.0,
            }
        return stats

    def cache_stats(self) -> dict[str, int]:
        return self.cache.stats() if self.cache is not None else dict(_EMPTY_CACHE_STATS)

    def redis_stats(self) -> dict[str, Any] | None:
        """The shared tier's counters, or None without `cache.redis_url`."""
        return self.redis.stats() if self.redis is not None else None

    def healthy_backends(self) -> int:
        return sum(1 for b in self.backends if b.healthy)
