"""Shared fixtures: free ports, real gateway and mock-backend subprocesses, polling helpers.

Every subprocess is started on a free port, killed by PID in a finaliser, and
its stderr is printed when the test fails (pytest shows captured output then).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO = Path(__file__).resolve().parent.parent
# One client for the fixtures' polls and helpers: a new httpx client builds an SSL context each time,
# which costs a few hundred milliseconds on a loaded machine.
HTTP = httpx.Client(timeout=10.0)
# A loaded 2-core machine (the CI box, shared with builds) can stall a process for a second or more.
# Bounds that check an order of magnitude (a timeout fired, a cancel reached the backend, a health
# check noticed) add this; each stays well below what the bound tells apart (the slow path it rules out).
LOAD_SLACK = 1.5


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(
    predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02, what: str = ""
) -> Any:
    """Poll `predicate` until it returns a truthy value or `timeout` passes."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as err:  # the thing polled may not be up yet
            last_error = err
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}: {last_error}")


@dataclass
class Proc:
    """A subprocess started by a test, with its port and captured stderr file."""

    popen: subprocess.Popen[bytes]
    port: int
    log_path: Path
    health_path: str = "/health"
    url: str = field(init=False)

    def __post_init__(self) -> None:
        self.url = f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.popen.pid, sig)

    def kill(self) -> None:
        if self.alive():
            self.popen.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)


class Processes:
    """Starts gateway and mock subprocesses; kills them all at teardown."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.procs: list[Proc] = []
        self._count = 0

    def spawn(self, args: list[str], port: int, env: dict[str, str] | None = None) -> Proc:
        self._count += 1
        log_path = self.tmp_path / f"proc-{self._count}.log"
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        with open(log_path, "wb") as log_file:
            popen = subprocess.Popen(
                [sys.executable, "-m", "ntonix", *args],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=full_env,
                cwd=self.tmp_path,
            )
        proc = Proc(popen, port, log_path)
        self.procs.append(proc)
        return proc

    def wait_healthy(self, proc: Proc, timeout: float = 20.0) -> Proc:
        def up() -> bool:
            if not proc.alive():
                raise AssertionError(f"process exited early ({proc.popen.returncode}):\n{proc.log()}")
            return HTTP.get(proc.url + proc.health_path, timeout=1.0).status_code == 200

        wait_for(up, timeout, what=f"{proc.url}{proc.health_path}")
        return proc

    def mock(self, *extra: str, port: int | None = None, name: str | None = None, wait: bool = True) -> Proc:
        port = port or free_port()
        args = ["mock", "--host", "127.0.0.1", "--port", str(port), *extra]
        if name:
            args += ["--name", name]
        proc = self.spawn(args, port)
        if "--prefix" in extra:
            proc.health_path = extra[extra.index("--prefix") + 1] + "/health"
        return self.wait_healthy(proc) if wait else proc

    def mock_serving(
        self, *models: str, extra: tuple[str, ...] = (), name: str | None = None, wait: bool = True
    ) -> Proc:
        """A mock that lists and answers exactly `models` (any other model gets 404 model_not_found).

        With `wait=False` it is only started: start several, then `wait_healthy` each (they boot in parallel).
        """
        flags = [arg for model in models for arg in ("--model", model)]
        return self.mock(*flags, *extra, name=name, wait=wait)

    def gateway_for(
        self, backends: list[dict[str, Any]], config: dict[str, Any] | None = None, **kwargs: Any
    ) -> Proc:
        """A gateway whose config file lists `backends` (dicts as in the file) over `config`.

        Its probes may take 3 s (`config` may say otherwise): on a loaded machine a probe that times out
        makes a discovered backend eligible for any model until the next one, which rebuilds the pools.
        """
        document: dict[str, Any] = {"health_check": {"timeout_seconds": 3}}
        for section, values in (config or {}).items():
            if isinstance(values, dict) and isinstance(document.get(section), dict):
                document[section] = {**document[section], **values}
            else:
                document[section] = values
        return self.gateway(config={**document, "backends": backends}, **kwargs)

    def gateway(
        self,
        backends: list[str] | None = None,
        config: dict[str, Any] | None = None,
        extra: list[str] | None = None,
        env: dict[str, str] | None = None,
        wait: bool = True,
    ) -> Proc:
        """Start `ntonix run` on a free port with `config` (merged over quiet test defaults)."""
        port = free_port()
        document: dict[str, Any] = {
            "server": {"threads": 2, "shutdown_grace_seconds": 10},
            "logging": {"level": "info", "enable_colors": False},
            "health_check": {"interval_seconds": 0.2, "timeout_seconds": 1},
        }
        for section, values in (config or {}).items():
            if isinstance(values, dict):
                document.setdefault(section, {}).update(values)
            else:
                document[section] = values
        self._count += 1
        config_path = self.tmp_path / f"gateway-{self._count}.json"
        config_path.write_text(json.dumps(document))
        args = ["run", "--config", str(config_path), "--port", str(port), "--bind", "127.0.0.1"]
        for backend in backends or []:
            args += ["--backend", backend]
        proc = self.spawn(args + (extra or []), port, env)
        proc.config_path = config_path  # type: ignore[attr-defined]
        return self.wait_healthy(proc) if wait else proc

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()


@pytest.fixture
def procs(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Processes]:
    processes = Processes(tmp_path)
    yield processes
    processes.close()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for proc in processes.procs:
            sys.stderr.write(f"\n----- output of {proc.popen.args} -----\n{proc.log()[-6000:]}\n")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report = yield
    setattr(item, "rep_" + report.when, report)
    return report


def chat_body(content: str = "hello", stream: bool = False, **extra: Any) -> dict[str, Any]:
    return {
        "model": "mock-model",
        "messages": [{"role": "user", "content": content}],
        "stream": stream,
        **extra,
    }


def backend_addr(server: Any) -> str:
    """`host:port` of a pytest-httpserver instance."""
    return f"127.0.0.1:{server.port}"


def backend_entry(mock: Proc, **fields: Any) -> dict[str, Any]:
    """A config-file backend entry for `mock`, by URL."""
    return {"url": mock.url, **fields}


def mock_requests(mock: Proc, path: str | None = None) -> list[dict[str, Any]]:
    """What `mock` received (oldest first), optionally only requests for `path`."""
    items = HTTP.get(mock.url + "/mock/requests", timeout=5.0).json()["requests"]
    return [item for item in items if path is None or item["path"] == path]


def mock_reset(mock: Proc) -> None:
    assert HTTP.post(mock.url + "/mock/reset", timeout=5.0).status_code == 200


def listed_models(gateway: Proc) -> list[str]:
    return [entry["id"] for entry in HTTP.get(gateway.url + "/v1/models", timeout=5.0).json()["data"]]


def wait_models(gateway: Proc, expected: set[str], timeout: float = 10.0) -> None:
    """Poll until the gateway's GET /v1/models lists exactly `expected` (discovery is asynchronous)."""
    wait_for(lambda: set(listed_models(gateway)) == expected, timeout, what=f"/v1/models == {expected}")
