"""`server.workers`: several gateway processes on the same ports, under one supervisor.

With `server.workers` > 1, `ntonix run` becomes a supervisor that serves
nothing itself. It checks once that the ports are free (a port held by another
program or another NTONIX is an error, as with one process), then starts the
workers as fresh interpreters (multiprocessing "spawn": nothing of the
supervisor, no tokio runtime, is forked). Each worker runs the ordinary
single-process gateway (`server.main`), whose Granian sockets bind with
SO_REUSEPORT, so the kernel spreads new connections over the workers. Each
worker has its own L1 cache, counters, balancer state and health checks; with
`cache.redis_url` they share the Redis tier.

Signals: SIGHUP is passed to every worker (each re-reads the configuration, as
one process does); SIGTERM/SIGINT are passed on and the supervisor waits for
every worker to drain (`server.shutdown_grace_seconds`, plus the forced stop),
then exits 0. A worker that dies is logged and started again (after a short
pause that grows while it keeps dying young); a worker that fails its start-up
with a configuration error (exit status 2) before it ever ran ends the whole
gateway with that status. Each worker dies with the supervisor (Linux
PR_SET_PDEATHSIG, and a check of its parent), so a killed supervisor never
leaves a port held by orphans.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import msgspec

from ntonix.config import ConfigError, Settings
from ntonix.system import WORKER_ENV

log = logging.getLogger("ntonix.workers")

# A worker that lived less than this is "dying young": its restarts back off.
YOUNG_SECONDS = 10.0
MAX_BACKOFF_SECONDS = 10.0
_PR_SET_PDEATHSIG = 1


class _Slot:
    """One worker position: its current process and restart bookkeeping."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: multiprocessing.process.BaseProcess | None = None
        self.started = 0.0
        self.restarts = 0
        self.ran = False  # lived past YOUNG_SECONDS at least once
        self.backoff = 0.5
        self.restart_at: float | None = None


class Supervisor:
    """Starts, watches, signals and restarts the worker processes."""

    def __init__(self, settings: Settings, reload: Callable[[], Settings] | None) -> None:
        self.settings = settings
        self.reload = reload
        self.count = settings.server.workers
        self.single = msgspec.structs.replace(
            settings, server=msgspec.structs.replace(settings.server, workers=1)
        )
        self.context = multiprocessing.get_context("spawn")
        self.slots = [_Slot(i + 1) for i in range(self.count)]
        self.stopping = False
        self.fatal: str | None = None

    def _spawn(self, slot: _Slot) -> None:
        process = self.context.Process(
            target=_worker_main,
            args=(slot.index, self.single, self.reload, os.getpid()),
            name=f"ntonix-worker-{slot.index}",
        )
        process.start()
        slot.process, slot.started, slot.restart_at = process, time.monotonic(), None
        log.info("worker %d started (pid %s)", slot.index, process.pid)

    def _signal_all(self, sig: int) -> None:
        for slot in self.slots:
            process = slot.process
            if process is not None and process.pid is not None and process.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, sig)

    def _on_hup(self, signum: int, frame: Any) -> None:
        log.info("SIGHUP: reloading %d workers", self.count)
        self._signal_all(signal.SIGHUP)

    def _on_stop(self, signum: int, frame: Any) -> None:
        if not self.stopping:
            log.warning("shutting down: draining %d workers", self.count)
        self.stopping = True
        self._signal_all(signal.SIGTERM)

    def run(self) -> None:
        from ntonix.server import check_ports_free

        check_ports_free(self.settings)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGHUP, self._on_hup)
            signal.signal(signal.SIGTERM, self._on_stop)
            signal.signal(signal.SIGINT, self._on_stop)
        for slot in self.slots:
            self._spawn(slot)
        log.warning(
            "NTONIX supervising %d workers on http://%s:%d",
            self.count,
            self.settings.server.bind_address,
            self.settings.server.port,
        )
        while not self.stopping:
            self._watch()
        self._drain()
        if self.fatal is not None:
            raise ConfigError(self.fatal)

    def _watch(self) -> None:
        sentinels = [s.process.sentinel for s in self.slots if s.process is not None]
        multiprocessing.connection.wait(sentinels, timeout=0.5)
        now = time.monotonic()
        for slot in self.slots:
            process = slot.process
            if process is not None and process.exitcode is None and now - slot.started > YOUNG_SECONDS:
                slot.ran, slot.backoff = True, 0.5
            if process is not None and process.exitcode is not None and not self.stopping:
                self._died(slot, process.exitcode, now)
            if slot.process is None and slot.restart_at is not None and now >= slot.restart_at:
                slot.restarts += 1
                self._spawn(slot)

    def _died(self, slot: _Slot, code: int, now: float) -> None:
        assert slot.process is not None
        pid = slot.process.pid
        slot.process.join()
        slot.process = None
        if code == 2 and not slot.ran and slot.restarts == 0:
            # a start-up error (the worker printed it): every worker would fail the same way
            self.fatal = f"worker {slot.index} could not start (see its message above)"
            self.stopping = True
            self._signal_all(signal.SIGTERM)
            return
        young = now - slot.started < YOUNG_SECONDS
        delay = slot.backoff if young else 0.5
        slot.backoff = min(slot.backoff * 2, MAX_BACKOFF_SECONDS) if young else 0.5
        slot.restart_at = now + delay
        how = f"signal {-code}" if code < 0 else f"status {code}"
        log.error("worker %d (pid %s) died with %s: restarting it in %.1fs", slot.index, pid, how, delay)

    def _drain(self) -> None:
        grace = self.settings.server.shutdown_grace_seconds + 2.0 + 5.0  # + forced stop + slack
        deadline = time.monotonic() + grace
        for slot in self.slots:
            process = slot.process
            if process is None:
                continue
            process.join(max(0.0, deadline - time.monotonic()))
            if process.exitcode is None:
                log.warning("worker %d did not stop in time: killing it", slot.index)
                process.kill()
                process.join(5)
        log.warning("all workers stopped")


def supervise(settings: Settings, reload: Callable[[], Settings] | None) -> None:
    """Run `settings.server.workers` gateway processes until SIGTERM/SIGINT."""
    Supervisor(settings, reload).run()


def _die_with_parent(parent: int) -> None:
    """Have the kernel send SIGTERM when the supervisor dies; exit now if it already has."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:
        raise SystemExit(0)


def _worker_main(index: int, settings: Settings, reload: Callable[[], Settings] | None, parent: int) -> None:
    """A worker process: the single-process gateway, on ports its siblings share."""
    os.environ[WORKER_ENV] = str(index)
    _die_with_parent(parent)
    from ntonix.logs import setup_logging
    from ntonix.server import serve

    setup_logging(settings.logging)
    try:
        serve(settings, reload, first_bind=False)
    except ConfigError as error:
        print(f"ntonix: worker {index}: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
