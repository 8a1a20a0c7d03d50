"""The passive circuit breaker of one backend, fed by the outcome of real requests.

After `failure_threshold` consecutive failures (connect errors, timeouts, 5xx)
it opens and the backend leaves rotation; after `open_seconds` it half-opens and
lets exactly one probe request through; that request's success closes it and its
failure opens it again. A leaf module: it imports nothing of the gateway.
"""

from __future__ import annotations

import logging

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

    def on_selected(self, now: float) -> bool:
        """A request was just sent through; True when it is the one half-open probe."""
        if self.state == OPEN and now - self.opened_at >= self.open_seconds:
            self.state = HALF_OPEN
        if self.state == HALF_OPEN and not self.probe_in_flight:
            self.probe_in_flight = True
            return True
        return False

    def on_success(self, probe: bool = False) -> None:
        """A request succeeded. Only the probe closes a half-open circuit; a stale success (a request
        placed before the circuit opened) neither closes an open one nor frees the probe's slot."""
        if self.state == CLOSED:
            self.failures = 0
        elif self.state == HALF_OPEN and probe:
            log.info("circuit closed after a successful probe")
            self.state = CLOSED
            self.failures = 0
            self.probe_in_flight = False

    def on_failure(self, now: float, probe: bool = False) -> bool:
        """Count a failure; answers True when this failure opened the circuit."""
        self.failures += 1
        if self.state == HALF_OPEN and probe:
            self.probe_in_flight = False
            self.state = OPEN
            self.opened_at = now
            return True
        if self.state == CLOSED and self.failures >= self.threshold:
            self.state = OPEN
            self.opened_at = now
            return True
        return False

    def reset(self) -> None:
        """Close the circuit without a probe (the backend passed its active checks again)."""
        self.state = CLOSED
        self.failures = 0
        self.probe_in_flight = False

    def on_release(self, probe: bool) -> None:
        """The request ended with no verdict (the client left): the probe frees the half-open slot."""
        if probe:
            self.probe_in_flight = False
