"""Runs the gateway: Granian's embedded servers in one process, signals, reload.

One asyncio loop hosts one `App` behind one or two embedded Granian servers
(plain HTTP on `server.port`, HTTPS on `server.ssl_port` when `ssl.enabled`), so
both share one cache, one balancer and one set of upstream pools. Granian's
runtime threads and the forwarder's tokio threads both follow `server.threads`.

Signals: SIGHUP re-reads the configuration through `reload` and applies a
changed backend list (a bad file is logged and the old configuration kept).
SIGTERM/SIGINT stop accepting new connections, let requests in flight finish
for up to `server.shutdown_grace_seconds`, then exit 0.

With `server.workers` > 1, `serve` hands over to `ntonix.workers`: a supervisor
that runs this single-process gateway that many times on the same ports.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import socket
import ssl
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from granian.constants import HTTPModes, Interfaces, SSLProtocols
from granian.server.embed import Server

from ntonix.app import App
from ntonix.config import ConfigError, Settings
from ntonix.system import raise_open_files_limit

log = logging.getLogger("ntonix.server")

Reload = Callable[[], Settings]
# After the grace period, how long the cancelled requests get to unwind before the servers are dropped.
FORCED_STOP_SECONDS = 2.0


def check_tls(settings: Settings) -> None:
    """Fail start-up with one line when the certificate or key is missing, unreadable or mismatched."""
    cert, key = settings.ssl.cert_file, settings.ssl.key_file
    try:
        with open(key, "rb") as fh:
            encrypted = b"ENCRYPTED" in fh.read()
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=cert)
    except ssl.SSLError as err:  # before OSError, its base class
        raise ConfigError(f"ssl: cert_file {cert!r}: no PEM certificate found ({err.reason})") from None
    except OSError as err:
        raise ConfigError(f"ssl: cannot read {err.filename or cert}: {err.strerror or err}") from None
    try:
        # A callback that supplies no password: OpenSSL would otherwise prompt on the terminal.
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key, password=lambda: b"")
    except ssl.SSLError as err:
        if err.reason == "KEY_VALUES_MISMATCH":
            problem = f"cert_file {cert!r} and key_file {key!r} do not match (not the certificate's key)"
        elif encrypted:
            problem = f"key_file {key!r}: encrypted private keys are not supported"
        else:
            problem = f"key_file {key!r}: no PEM private key found"
        raise ConfigError(f"ssl: {problem}") from None
    except OSError as err:
        raise ConfigError(f"ssl: cannot read {err.filename or cert}: {err.strerror or err}") from None


def check_ports_free(settings: Settings) -> None:
    """Fail start-up with one line when a listening port is taken, by another NTONIX or anything else.

    NOTE: Granian binds with SO_REUSEPORT, so a second gateway on the same port would start and take
    a share of the traffic with its own (stale) configuration. A trial bind without SO_REUSEPORT
    fails while any socket listens there; SO_REUSEADDR keeps a restart free of TIME_WAIT leftovers.
    """
    ports = [settings.server.port]
    if settings.ssl.enabled:
        ports.append(settings.server.ssl_port)
    address = settings.server.bind_address
    for port in ports:
        try:
            infos = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except socket.gaierror as err:
            raise ConfigError(f"cannot listen on {address}:{port}: {err.strerror or err}") from None
        family, kind, proto, _, sockaddr = infos[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
            except OSError as err:
                reason = err.strerror or str(err)
                if err.errno == errno.EADDRINUSE:
                    reason = "port already in use (another NTONIX or another server holds it)"
                raise ConfigError(f"cannot listen on {address}:{port}: {reason}") from None


def build_servers(app: App, settings: Settings) -> list[Server]:
    """The embedded Granian servers for `settings` (HTTP, plus HTTPS when enabled)."""
    common = {
        "address": settings.server.bind_address,
        "interface": Interfaces.RSGI,
        "runtime_threads": settings.server.threads,
        "backlog": 2048,
        # NOTE: Granian caps requests in flight at `backpressure` (default: the backlog); LLM streams
        # stay open for minutes, so the cap is the open-files limit, not 2,048.
        "backpressure": 65536,
        "log_enabled": False,
        "websockets": False,
    }
    servers = [Server(app, port=settings.server.port, http=HTTPModes.http1, **common)]  # type: ignore[arg-type]
    if settings.ssl.enabled:
        servers.append(
            Server(
                app,
                port=settings.server.ssl_port,
                http=HTTPModes.auto,
                ssl_cert=Path(settings.ssl.cert_file),
                ssl_key=Path(settings.ssl.key_file),
                # Granian's default minimum is TLS 1.3; nginx habits (and older clients) expect 1.2 too.
                ssl_protocol_min=SSLProtocols.tls12,
                **common,  # type: ignore[arg-type]
            )
        )
    return servers


async def _shutdown(
    app: App, servers: list[Server], serving: Sequence[asyncio.Future[Any]], grace: float
) -> None:
    """Stop accepting, let the requests in flight finish for up to `grace` seconds, cancel the rest.

    NOTE: Granian's embedded `Server.stop()` closes the listening socket at once (new connections are
    refused), closes idle keep-alive connections, and its `serve()` returns only once every connection
    in flight has finished: it has no time limit of its own, so a long stream would hold the process
    forever. The grace period is enforced here by cancelling the requests still running when it ends
    (their clients see the answer cut short); Granian then finishes at once.
    """
    for server in servers:
        server.stop()  # type: ignore[no-untyped-call]
    _, pending = await asyncio.wait(serving, timeout=grace)
    if not pending:
        return
    log.warning("grace period over: cancelling %d request(s) still in flight", app.cancel_requests())
    _, pending = await asyncio.wait(pending, timeout=FORCED_STOP_SECONDS)
    for task in pending:
        task.cancel()


async def main(settings: Settings, reload: Reload | None, first_bind: bool = True) -> None:
    """One gateway process; `first_bind` is False in a worker, whose supervisor checked the ports."""
    if first_bind:  # a worker's supervisor checked both, and its siblings hold the ports
        if settings.ssl.enabled:
            check_tls(settings)
        check_ports_free(settings)
    app = App(settings)
    servers = build_servers(app, settings)
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()

    def on_reload() -> None:
        if reload is None:
            log.warning("SIGHUP ignored: no configuration source to re-read")
            return
        try:
            fresh = reload()
        except ConfigError as err:
            log.error("reload failed, keeping the old configuration: %s", err)
            return
        app.reload(fresh)

    loop.add_signal_handler(signal.SIGHUP, on_reload)
    loop.add_signal_handler(signal.SIGTERM, stopping.set)
    loop.add_signal_handler(signal.SIGINT, stopping.set)

    serving = [asyncio.ensure_future(s.serve()) for s in servers]
    # Each server binds its socket in the first step of its task: one turn of the loop later the
    # bind has either succeeded or ended the task with the error (reported below, not "listening").
    await asyncio.sleep(0)
    if not any(task.done() for task in serving):
        log.info(
            "NTONIX listening on http://%s:%d%s",
            settings.server.bind_address,
            settings.server.port,
            f" and https://{settings.server.bind_address}:{settings.server.ssl_port}"
            if settings.ssl.enabled
            else "",
        )
    stop_wait = asyncio.ensure_future(stopping.wait())
    done, _ = await asyncio.wait([*serving, stop_wait], return_when=asyncio.FIRST_COMPLETED)
    if stop_wait in done:
        log.info(
            "shutting down: draining requests in flight (grace %.1fs)", settings.server.shutdown_grace_seconds
        )
        await _shutdown(app, servers, serving, settings.server.shutdown_grace_seconds)
    else:
        stop_wait.cancel()
        # A listener failed (port in use...): stop the other one, the gateway must not half-run.
        for server, task in zip(servers, serving, strict=True):
            if not task.done():
                server.stop()  # type: ignore[no-untyped-call]
    results = await asyncio.gather(*serving, return_exceptions=True)
    ports = (settings.server.port, settings.server.ssl_port)
    for port, result in zip(ports, results, strict=False):
        if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
            # Granian's errors end with a Rust backtrace when RUST_BACKTRACE is set: first line only.
            reason = (str(result).strip().splitlines() or [type(result).__name__])[0]
            raise ConfigError(f"cannot listen on {settings.server.bind_address}:{port}: {reason}")


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop `server.loop` names; None: asyncio's own.

    NOTE: uvloop wakes the loop from Granian's threads (`call_soon_threadsafe`, once or twice per
    request) and runs its callbacks with less work per turn than asyncio's selector loop; measured
    in docs/benchmarks.md ("Where the time goes").
    """
    if name == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if name == "uvloop":
            raise ConfigError(
                "server.loop is uvloop, but uvloop is not installed (pip install uvloop)"
            ) from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def serve(settings: Settings, reload: Reload | None = None, first_bind: bool = True) -> None:
    """Run the gateway (or its `server.workers` processes) until SIGTERM/SIGINT."""
    if settings.server.workers > 1:
        from ntonix.workers import supervise

        if settings.ssl.enabled:
            check_tls(settings)
        supervise(settings, reload)
        return
    limit = raise_open_files_limit()
    if limit < 4096:
        log.warning(
            "open-files limit is %d: at most ~%d concurrent streams (raise `ulimit -n`)", limit, limit // 2
        )
    try:
        with asyncio.Runner(loop_factory=loop_factory(settings.server.loop)) as runner:
            runner.run(main(settings, reload, first_bind))
    except OSError as err:
        raise ConfigError(f"cannot listen on {settings.server.bind_address}: {err}") from None
