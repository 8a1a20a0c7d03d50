"""Active health checks: polls each backend's health path and flips `Backend.healthy` by thresholds.

Kept apart from the passive circuit breaker (`breaker.py`) on purpose, as envoy
keeps active health checking apart from outlier ejection.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ntonix.config import HealthCheckConfig

if TYPE_CHECKING:
    from ntonix._core import Forwarder
    from ntonix.upstream.backend import Backend

log = logging.getLogger("ntonix.health")


class HealthChecker:
    """Polls every backend's health path and flips its `healthy` flag by thresholds."""

    def __init__(
        self,
        config: HealthCheckConfig,
        forwarder: Forwarder,
        backends: Callable[[], Sequence[Backend]],
    ) -> None:
        self.config = config
        self.forwarder = forwarder
        self.backends = backends
        self.checks = 0

    async def run(self) -> None:
        """Check all backends every `interval_seconds`, forever (cancel to stop)."""
        while True:
            await asyncio.gather(*(self.check(backend) for backend in self.backends()))
            self.checks += 1
            await asyncio.sleep(self.config.interval_seconds)

    async def check(self, backend: Backend) -> None:
        """Probe one backend once and apply the thresholds."""
        url = backend.url + self.config.path
        try:
            status = await self.forwarder.probe(url, self.config.timeout_seconds)
            ok = 200 <= status < 300
            reason = f"status {status}"
        except Exception as exc:  # any failure of the probe counts against the backend
            ok = False
            reason = str(exc)
        if ok:
            backend.consecutive_check_failures = 0
            backend.consecutive_check_successes += 1
            if not backend.healthy and backend.consecutive_check_successes >= self.config.healthy_threshold:
                backend.healthy = True
                # Passing the active checks again also closes a circuit the same outage opened (envoy's
                # `successful_active_health_check_uneject_host`): else it would wait out open_seconds.
                backend.breaker.reset()
                log.warning("backend %s is healthy again", backend.key)
        else:
            backend.consecutive_check_successes = 0
            backend.consecutive_check_failures += 1
            if backend.healthy and backend.consecutive_check_failures >= self.config.unhealthy_threshold:
                backend.healthy = False
                log.warning("backend %s marked unhealthy: %s", backend.key, reason)
