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
            return httpx.get(proc.url + "/health", timeout=1.0).status_code == 200

        wait_for(up, timeout, what=f"{proc.url}/health")
        return proc

    def mock(self, *extra: str, port: int | None = None, name: str | None = None) -> Proc:
        port = port or free_port()
        args = ["mock", "--host", "127.0.0.1", "--port", str(port), *extra]
        if name:
            args += ["--name", name]
        return self.wait_healthy(self.spawn(args, port))

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
