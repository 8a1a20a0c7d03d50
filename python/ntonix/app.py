"""The RSGI application `ntonix.app:app` that Granian serves: lifecycle only.

`App` builds one `Gateway` (the composition root) when Granian starts it and
hands every request to the `Router`. Granian calls `__rsgi_init__(loop)` once
per server it runs (twice with TLS: plain and HTTPS share this one app), so
start-up and tear-down are reference-counted.

Served by `granian --interface rsgi ntonix.app`, the module-level `app` reads its
configuration from the `NTONIX_*` environment (and `NTONIX_CONFIG`) at start-up.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import sys
from typing import Any

from ntonix.config import ConfigError, Settings, load_settings
from ntonix.gateway import Gateway
from ntonix.http.router import Router

log = logging.getLogger("ntonix")


class App:
    """One gateway process: lifecycle around the shared `Gateway` and its `Router`."""

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
        self.gateway = Gateway(self.settings, loop)
        self.router = Router(self.gateway)
        loop.add_reader(self.gateway.forwarder.wake_fd, self.gateway.forwarder.drain)
        self._loop = loop
        self._health_task = loop.create_task(self.gateway.health.run())
        self.started = True
        _tune_gc()
        log.info(
            "gateway ready with %d backend(s), policy %s",
            len(self.gateway.backends),
            self.settings.routing.policy,
        )

    def stop(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            self._health_task = None
        if self.started:
            self.gateway.proxy.slow.close()
            self._loop.remove_reader(self.gateway.forwarder.wake_fd)
        self.started = False

    def reload(self, fresh: Settings) -> None:
        """Apply a re-read configuration (backends, models, aliases)."""
        self.gateway.reload(fresh)
        self.settings = self.gateway.settings

    def cancel_requests(self) -> int:
        """Cancel every proxied request in flight (shutdown after the grace period); answers how many."""
        tasks = list(self._requests)
        for task in tasks:
            task.cancel()
        return len(tasks)

    async def __rsgi__(self, scope: Any, proto: Any) -> None:
        if scope.proto != "http":
            return
        # NOTE: the loop given, asyncio does not look the running one up (a getpid(2) each, Python 3.11)
        task = asyncio.current_task(self._loop)
        if task is None:  # Granian's Rust task implementation: not cancellable at shutdown
            await self.router(scope, proto)
            return
        self._requests.add(task)
        try:
            await self.router(scope, proto)
        finally:
            self._requests.discard(task)


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
