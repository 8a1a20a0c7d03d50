"""`BackendPool`: the backends of one model and the single place a request is placed on one.

`pick` filters what no policy may override (health, circuit breaker, backends
this request already tried), asks the pool's policy to choose among the rest,
takes the breaker's half-open slot when that is what lets the request through,
and counts the request in flight. `release` is its mirror and the only place
the count goes down. Every route and every policy goes through these two calls,
so no path can forget to count (the bug that sent all traffic to one worker in
SGLang's and vLLM's routers).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ntonix.balance.base import PickContext, SelectionPolicy
    from ntonix.upstream.backend import Backend

log = logging.getLogger("ntonix.balance")


class Lease:
    """One request placed on one backend; `probe` when it holds the breaker's half-open slot."""

    __slots__ = ("backend", "probe", "released")

    def __init__(self, backend: Backend, probe: bool) -> None:
        self.backend = backend
        self.probe = probe
        self.released = False


class BackendPool:
    """The backends eligible for one model, with that model's own balancing state."""

    __slots__ = ("backends", "model", "policy")

    def __init__(self, model: str | None, backends: Sequence[Backend], policy: SelectionPolicy) -> None:
        self.model = model
        self.backends: tuple[Backend, ...] = tuple(backends)
        self.policy = policy

    def healthy_count(self) -> int:
        now = time.monotonic()
        return sum(1 for b in self.backends if b.available(now))

    def pick(self, ctx: PickContext, tried: Collection[Backend] = ()) -> Lease | None:
        """Place the request on a backend (counted in flight), or None when no backend may take it."""
        now = time.monotonic()
        candidates = [b for b in self.backends if b not in tried and b.available(now)]
        if not candidates:
            return None
        backend = candidates[0] if len(candidates) == 1 else self.policy.select(ctx, candidates)
        probe = backend.breaker.on_selected(now)
        if probe:
            log.info("circuit half-open for backend %s: one probe request goes through", backend.key)
        backend.in_flight += 1
        backend.last_sent = now
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "picked %s for model %s (%s over %d candidate(s), in flight %d)",
                backend.key,
                self.model or "-",
                self.policy.name,
                len(candidates),
                backend.in_flight,
            )
        return Lease(backend, probe)

    def release(self, ctx: PickContext, lease: Lease, cached_tokens: int | None = None) -> None:
        """The request placed by `lease` has ended (answer read, stream over, or abandoned)."""
        if lease.released:
            return
        lease.released = True
        lease.backend.in_flight -= 1
        self.policy.on_complete(ctx, lease.backend, cached_tokens)
