"""`granian --interface rsgi ntonix.app` serves the gateway configured from NTONIX_* variables."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
from pytest_httpserver import HTTPServer

from tests.conftest import free_port, wait_for

ANSWER = {"id": "g1", "object": "chat.completion", "choices": []}


def test_granian_cli_with_env_configuration(httpserver: HTTPServer, tmp_path: Path) -> None:
    httpserver.expect_request("/v1/chat/completions", method="POST").respond_with_json(ANSWER)
    httpserver.expect_request("/health").respond_with_json({"status": "ok"})
    port = free_port()
    config = tmp_path / "ntonix.json"
    config.write_text(json.dumps({"cache": {"enabled": False}, "logging": {"enable_colors": False}}))
    env = {
        **os.environ,
        "NTONIX_BACKENDS": f"127.0.0.1:{httpserver.port}",
        "NTONIX_CONFIG": str(config),
        "NTONIX_THREADS": "1",
    }
    granian = Path(sys.executable).parent / "granian"
    log = tmp_path / "granian.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(granian), "--interface", "rsgi", "--host", "127.0.0.1", "--port", str(port), "ntonix.app"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # granian forks workers: the whole group is killed below
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: httpx.get(url + "/health").status_code == 200, 20, what="granian up")
        answer = httpx.post(
            url + "/v1/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert answer.status_code == 200, log.read_text()
        assert answer.json() == ANSWER
        assert "x-cache" not in answer.headers, "NTONIX_CONFIG's cache.enabled=false was not applied"
        assert answer.headers["x-request-id"]
        metrics = httpx.get(url + "/metrics").json()
        assert metrics["backends"][0]["port"] == httpserver.port
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        assert wait_for(lambda: not _group_alive(proc.pid), 10, what="granian workers gone")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
