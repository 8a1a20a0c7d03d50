"""Active health checks and model discovery, on the gateway's event loop.

Every `interval_seconds` each backend is probed at its health path
(`backends[].health_path`, else `health_check.path`) and `Backend.healthy`
flips after the configured number of consecutive failures or successes. A
backend whose default health path answers 404 (llama-cpp-python has none) is
probed at `GET /v1/models` from then on, logged once.

Rule for busy servers: a backend with requests in flight is not probed at all:
on a single-slot server (llama-cpp-python) a probe cuts the running stream short
or waits behind it, and a hung request is judged by its own timeouts and the
circuit breaker. A probe that *times out* while the backend is visibly making
progress (an answer or chunk within the last interval plus timeout) does not
count against it; a single-slot server busy
generating is slow to answer a probe, not down. Refused connections and error
statuses always count: passive evidence only excuses slowness.

Discovery: a backend without configured `models` has its `GET /v1/models` read
on the same schedule; its list replaces what was known, and a backend whose
list cannot be read (an error status or a body that is not a model list) becomes eligible for any
model again; a probe that merely times out keeps the list already known. A change rebuilds the
model pools (`on_models_changed`). Kept apart from the passive circuit breaker
(`breaker.py`) on purpose, as envoy keeps active checking apart from ejection.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import msgspec

from ntonix.config import HealthCheckConfig

if TYPE_CHECKING:
    from ntonix._core import Forwarder
    from ntonix.upstream.backend import Backend

log = logging.getLogger("ntonix.health")

MODELS_PATH = "/v1/models"


class _Model(msgspec.Struct):
    id: str


class _ModelList(msgspec.Struct):
    data: list[_Model]


_decode_models = msgspec.json.Decoder(_ModelList).decode


class _Probe(msgspec.Struct):
    status: int = 0
    body: bytes = b""
    timed_out: bool = False
    error: str = ""


class HealthChecker:
    """Polls every backend's health path and model list; flips `healthy` by thresholds."""

    def __init__(
        self,
        config: HealthCheckConfig,
        forwarder: Forwarder,
        backends: Callable[[], Sequence[Backend]],
        on_models_changed: Callable[[], None] = lambda: None,
        on_unhealthy: Callable[[Backend], None] = lambda backend: None,
    ) -> None:
        self.config = config
        self.forwarder = forwarder
        self.backends = backends
        self.on_models_changed = on_models_changed
        self.on_unhealthy = on_unhealthy
        self.checks = 0
        self.fallback: dict[int, str] = {}  # backend id -> path used after its default answered 404

    async def run(self) -> None:
        """Check all backends every `interval_seconds`, forever (cancel to stop)."""
        while True:
            await self.check_all()
            await asyncio.sleep(self.config.interval_seconds)

    async def check_all(self) -> None:
        results = await asyncio.gather(*(self.check(backend) for backend in self.backends()))
        self.checks += 1
        if any(results):
            self.on_models_changed()

    async def _get(self, backend: Backend, path: str) -> _Probe:
        headers = [("accept", "application/json")]
        if backend.api_key is not None:
            headers.append(("authorization", f"Bearer {backend.api_key}"))
        pending = self.forwarder.request("GET", backend.url + path, headers, b"", True)
        try:
            response = await asyncio.wait_for(pending, self.config.timeout_seconds)
        except TimeoutError:
            pending.cancel()
            return _Probe(timed_out=True, error=f"no answer within {self.config.timeout_seconds}s")
        except Exception as exc:  # any failure of the probe counts against the backend
            return _Probe(error=str(exc) or type(exc).__name__)
        return _Probe(status=response.status, body=response.body or b"")

    def _path(self, backend: Backend) -> str:
        return backend.health_path or self.fallback.get(backend.id) or self.config.path

    async def check(self, backend: Backend) -> bool:
        """Probe one backend once and apply the thresholds; True when its model list changed."""
        if backend.in_flight > 0:
            # Passive evidence first: a backend answering real traffic right now is alive, and on a
            # single-slot server (llama-cpp-python) a probe would cut the running stream short or
            # wait behind it. Probing resumes once it is idle or stops making progress.
            log.debug("backend %s: serving traffic; probe skipped", backend.key)
            return False
        path = self._path(backend)
        probe = await self._get(backend, path)
        if probe.status == 404 and backend.health_path is None and path != MODELS_PATH:
            self.fallback[backend.id] = path = MODELS_PATH
            log.info("backend %s has no %s (404): probing %s instead", backend.key, self.config.path, path)
            probe = await self._get(backend, path)
        self._apply(backend, probe)
        if backend.configured_models is not None:
            return False
        models_probe = probe if path == MODELS_PATH else await self._get(backend, MODELS_PATH)
        return self._learn_models(backend, models_probe)

    def _apply(self, backend: Backend, probe: _Probe) -> None:
        ok = 200 <= probe.status < 300
        if not ok and probe.timed_out and self._busy(backend):
            log.debug("backend %s: probe timed out while it is serving traffic; not counted", backend.key)
            return
        if ok:
            backend.consecutive_check_failures = 0
            backend.consecutive_check_successes += 1
            if not backend.healthy and backend.consecutive_check_successes >= self.config.healthy_threshold:
                backend.healthy = True
                # Passing the active checks again also closes a circuit the same outage opened (envoy's
                # `successful_active_health_check_uneject_host`): else it would wait out open_seconds.
                backend.breaker.reset()
                log.info("backend %s is healthy again", backend.key)
            return
        reason = probe.error or f"status {probe.status}"
        backend.consecutive_check_successes = 0
        backend.consecutive_check_failures += 1
        log.debug("backend %s: health probe failed (%s)", backend.key, reason)
        if backend.healthy and backend.consecutive_check_failures >= self.config.unhealthy_threshold:
            backend.healthy = False
            log.warning("backend %s marked unhealthy: %s", backend.key, reason)
            self.on_unhealthy(backend)

    def _busy(self, backend: Backend) -> bool:
        """Visible progress on real traffic within the last interval plus timeout."""
        window = self.config.interval_seconds + self.config.timeout_seconds
        recent = max(backend.last_progress, backend.last_sent)
        return backend.in_flight > 0 and time.monotonic() - recent < window

    def _learn_models(self, backend: Backend, probe: _Probe) -> bool:
        models: frozenset[str] | None = None
        if 200 <= probe.status < 300:
            try:
                models = frozenset(m.id for m in _decode_models(probe.body).data)
            except (msgspec.DecodeError, msgspec.ValidationError):
                models = None
        elif probe.timed_out:
            return False  # slow, not wrong: keep what is known (a flapping list would rebuild every pool)
        if models == backend.discovered_models:
            return False
        if models is None:
            log.info("backend %s: model list unreadable; eligible for any model", backend.key)
        else:
            log.info("backend %s serves %s", backend.key, ", ".join(sorted(models)) or "no model")
        backend.discovered_models = models
        return True
