"""Start real llama-cpp-python servers and an NTONIX gateway in front of them.

Shared by the fixtures (conftest.py) and the timing script (measure.py). The real
server runs from its own virtual environment (.real/venv, made by `make test-real`);
the gateway runs from the interpreter that runs the tests (the project's .venv).
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

REPO = Path(__file__).resolve().parent.parent
REAL = REPO / ".real"
REAL_PYTHON = Path(os.environ.get("NTONIX_REAL_PYTHON", REAL / "venv" / "bin" / "python"))
MODEL = Path(os.environ.get("NTONIX_REAL_MODEL", REAL / "model" / "tiny.gguf"))
MODEL_A = "tiny-a"
MODEL_B = "tiny-b"
EOS_TOKEN_ID = 2  # </s> in the llama-spm vocab the model is built with


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll `predicate` until it returns something truthy, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as err:  # the thing polled may not be up yet
            last = err
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}: {last}")


@dataclass
class Proc:
    """A started subprocess with its URL and its combined output in a file."""

    name: str
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

    def cpu_seconds(self) -> float:
        """User + system CPU time the process has used so far (Linux /proc)."""
        fields = Path(f"/proc/{self.popen.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def kill(self) -> None:
        if self.alive():
            self.popen.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)


class Cluster:
    """Owns every process it starts and kills them all (by PID) in `close`."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[Proc] = []

    def _spawn(self, name: str, argv: list[str], port: int) -> Proc:
        log_path = self.workdir / f"{name}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(log_path, "wb") as log_file:
            popen = subprocess.Popen(
                argv, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=self.workdir
            )
        proc = Proc(name, popen, port, log_path)
        self.procs.append(proc)
        return proc

    def llama_server(self, alias: str, *extra: str, interrupt: bool = False, timeout: float = 120.0) -> Proc:
        """A llama_cpp.server on a free port serving MODEL as `alias`; ready when /v1/models answers.

        It has no /health, so readiness is its model list. `interrupt=False` passes
        `--interrupt_requests false` so that a second request waits for the first instead of
        cutting its stream short (the server's default, True, does that).
        """
        for path, what in ((REAL_PYTHON, "real-server interpreter"), (MODEL, "model")):
            if not path.exists():
                raise AssertionError(f"no {what} at {path}: run `make test-real`")
        port = free_port()
        argv = [
            str(REAL_PYTHON), "-m", "llama_cpp.server",
            "--model", str(MODEL), "--model_alias", alias,
            "--host", "127.0.0.1", "--port", str(port),
            "--n_ctx", "2048", "--n_threads", "1", "--n_threads_batch", "1",
            "--interrupt_requests", "true" if interrupt else "false", "--cache", "false",
            *extra,
        ]  # fmt: skip
        proc = self._spawn(f"llama-{alias}", argv, port)

        def ready() -> bool:
            if not proc.alive():
                raise AssertionError(f"{proc.name} exited ({proc.popen.returncode}):\n{proc.log()[-4000:]}")
            return httpx.get(proc.url + "/v1/models", timeout=2.0).status_code == 200

        wait_for(ready, timeout, f"{proc.name} /v1/models")
        return proc

    def gateway(self, backends: list[str], config: dict[str, Any] | None = None, timeout: float = 30) -> Proc:
        """`python -m ntonix run` on a free port with a JSON config whose backends are `url` entries."""
        port = free_port()
        document: dict[str, Any] = {
            "server": {"threads": 2},
            "logging": {"level": os.environ.get("NTONIX_REAL_GATEWAY_LOG", "info"), "enable_colors": False},
            "health_check": {"interval_seconds": 1, "timeout_seconds": 2},
            "backends": [{"url": url} for url in backends],
        }
        for section, values in (config or {}).items():
            if isinstance(values, dict):
                document.setdefault(section, {}).update(values)
            else:
                document[section] = values
        config_path = self.workdir / f"gateway-{port}.json"
        config_path.write_text(json.dumps(document, indent=2))
        argv = [
            sys.executable, "-m", "ntonix", "run",
            "--config", str(config_path), "--port", str(port), "--bind", "127.0.0.1",
        ]  # fmt: skip
        proc = self._spawn(f"gateway-{port}", argv, port)

        def up() -> bool:
            if not proc.alive():
                raise AssertionError(f"gateway exited ({proc.popen.returncode}):\n{proc.log()[-4000:]}")
            return httpx.get(proc.url + "/health", timeout=1.0).status_code == 200

        wait_for(up, timeout, "gateway /health")
        return proc

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.kill()

    def dump_logs(self) -> str:
        return "".join(f"\n----- {p.name} ({p.url}) -----\n{p.log()[-5000:]}\n" for p in self.procs)


@dataclass
class Real:
    """The session's cluster: two llama servers and the gateway in front of them."""

    cluster: Cluster
    a: Proc  # llama_cpp.server serving MODEL_A
    b: Proc  # llama_cpp.server serving MODEL_B
    gateway: Proc  # NTONIX in front of both, models learnt from their /v1/models


def sse_events(lines: Iterator[str]) -> Iterator[str]:
    """The `data:` payloads of an SSE stream (comments such as sse-starlette's pings skipped)."""
    for line in lines:
        line = line.rstrip("\r")
        if line.startswith("data:"):
            yield line[5:].strip()


def chat_body(model: str, content: str = "hello there", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


# The vocab's 256 byte-fallback tokens <0x00>..<0xFF> (token type BYTE).
BYTE_TOKEN_IDS = range(3, 259)


def no_eos(**extra: Any) -> dict[str, Any]:
    """Sampling options that keep a random model generating until max_tokens, in whole characters.

    Without the byte-fallback tokens banned, the random model soon emits a byte that is not valid
    UTF-8 on its own; llama-cpp-python 0.3.16 then holds every later token back (it streams text only
    once it decodes) and re-decodes the growing tail at each token, so a 600-token stream sent nothing
    for 114-147 s after its 9th event and then the rest in one burst (eval time 5.5 s) — measured
    directly against the server, no gateway involved (docs/real-servers.md)."""
    bias = {str(EOS_TOKEN_ID): -100, **{str(token): -100 for token in BYTE_TOKEN_IDS}}
    return {"logit_bias": bias, "seed": 1, **extra}
