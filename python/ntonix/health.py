"""Backend health: the passive circuit breaker and the active health checker.

The two are kept apart on purpose (as envoy keeps active health checking apart
from outlier ejection). `CircuitBreaker` counts failures seen on real traffic
(connect errors, timeouts, 5xx): after `failure_threshold` consecutive ones it
opens and the backend leaves rotation; after `open_seconds` it half-opens and
lets exactly one probe request through; that request's success closes it and
its failure opens it again. `HealthChecker` polls each backend's health path on
the gateway's event loop and flips `Backend.healthy` after the configured number
of consecutive failures or successes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ntonix.config import HealthCheckConfig

if TYPE_CHECKING:
    from ntonix._core import Forwarder
    from ntonix.balancer import Backend

log = logging.getLogger("ntonix.health")

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"


class CircuitBreaker:
    """Per-backend breaker fed by the outcome of real requests."""

    __slots__ = ("failures", "open_seconds", "opened_at", "probe_in_flight", "state", "threshold")

    def __init__(self, threshold: int, open_seconds: float) -> None:
        self.threshold = threshold
        self.open_seconds = open_seconds
        self.state = CLOSED
        self.failures = 0
        self.opened_at = 0.0
        self.probe_in_flight = False

    def allows(self, now: float) -> bool:
        """Whether a request may be sent now."""
        if self.state == CLOSED:
            return True
        if self.state == OPEN:
            return now - self.opened_at >= self.open_seconds
        return not self.probe_in_flight

    def on_selected(self, now: float) -> None:
        """A request was just sent through: in half-open state it is the one probe."""
        if self.state == OPEN and now - self.opened_at >= self.open_seconds:
            self.state = HALF_OPEN
        if self.state == HALF_OPEN:
            self.probe_in_flight = True

    def on_success(self) -> None:
        if self.state != CLOSED:
            log.info("circuit closed after a successful probe")
        self.state = CLOSED
        self.failures = 0
        self.probe_in_flight = False

    def on_failure(self, now: float) -> bool:
        """Count a failure; answers True when this failure opened the circuit."""
        self.failures += 1
        self.probe_in_flight = False
        if self.state == HALF_OPEN or (self.state == CLOSED and self.failures >= self.threshold):
            self.state = OPEN
            self.opened_at = now
            return True
        return False

    def reset(self) -> None:
        """Close the circuit without a probe (the backend passed its active checks again)."""
        self.state = CLOSED
        self.failures = 0
        self.probe_in_flight = False

    def on_release(self) -> None:
        """The request ended with no verdict (the client left): free the half-open slot."""
        self.probe_in_flight = False


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
