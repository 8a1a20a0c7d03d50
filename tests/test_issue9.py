"""Regression tests for issue 9, one per numbered fault, each named `test_fault_NN_...`.

Each test fails on the code of commit 1aa54fd (the fault) and passes now. Faults 9 and 19 are
tests of their own (`tests/test_resilience.py::test_fault_09_...`, `tests/test_cache_e2e.py::
test_fault_19_...`); faults 10, 17 and 24 are Rust fixes whose tests are in
`tests/test_forwarder_core.py` and are re-exported here under their fault numbers when present.
Everything runs real `ntonix` processes on free ports; timings are polled with deadlines.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gzip
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from tests.conftest import REPO, Proc, Processes, chat_body, free_port, wait_for

CHAT = "/v1/chat/completions"
JSON_HEADERS = {"content-type": "application/json"}
# Active checks that never interfere with a test of the passive paths.
QUIET_CHECKS = {"interval_seconds": 60, "timeout_seconds": 1, "unhealthy_threshold": 10}


# -- helpers -------------------------------------------------------------------------------------


def addr(proc: Proc) -> str:
    return f"127.0.0.1:{proc.port}"


def post(
    gateway: Proc, payload: Any, headers: dict[str, str] | None = None, timeout: float = 30.0
) -> httpx.Response:
    return httpx.post(
        gateway.url + CHAT,
        content=json.dumps(payload).encode(),
        headers={**JSON_HEADERS, **(headers or {})},
        timeout=timeout,
    )


def raw_post(gateway: Proc, content: bytes, accept_encoding: str) -> tuple[httpx.Response, bytes]:
    """POST `content` with this Accept-Encoding; the response and its body as sent (not decoded)."""
    with httpx.Client(timeout=30) as client:
        request = client.build_request(
            "POST",
            gateway.url + CHAT,
            content=content,
            headers={**JSON_HEADERS, "accept-encoding": accept_encoding},
        )
        response = client.send(request, stream=True)
        raw = b"".join(response.iter_raw())
        response.close()
        return response, raw


def gzip_response(plain: bytes) -> Response:
    """A backend's JSON answer gzipped whatever the request's Accept-Encoding said."""
    return Response(
        gzip.compress(plain), headers={"content-type": "application/json", "content-encoding": "gzip"}
    )


def metrics(gateway: Proc) -> dict[str, Any]:
    return dict(httpx.get(gateway.url + "/metrics", timeout=10).json())


def backend_state(gateway: Proc, port: int) -> dict[str, Any]:
    return next(dict(b) for b in metrics(gateway)["backends"] if b["port"] == port)


def mock_stats(mock: Proc) -> dict[str, Any]:
    return dict(httpx.get(mock.url + "/mock/stats", timeout=10).json())


def mock_requests(mock: Proc) -> list[dict[str, Any]]:
    return list(httpx.get(mock.url + "/mock/requests", timeout=10).json()["requests"])


def last_chat(mock: Proc) -> dict[str, Any]:
    """The last chat request the mock received (health probes and model discovery skipped)."""
    return next(r for r in reversed(mock_requests(mock)) if r["path"] == CHAT)


def mock_without_health(procs: Processes, *extra: str) -> Proc:
    """`ntonix mock --no-health` (its /health is a 404, like llama-cpp-python's), up and answering."""
    port = free_port()
    mock = procs.spawn(["mock", "--host", "127.0.0.1", "--port", str(port), "--no-health", *extra], port)
    wait_for(lambda: httpx.get(mock.url + "/v1/models", timeout=1).status_code == 200, 20, what="mock")
    return mock


def header_of(request: dict[str, Any], name: str) -> str | None:
    headers = request["headers"]
    if isinstance(headers, dict):
        return headers.get(name)
    return next((value for key, value in headers if key.lower() == name), None)


def ntonix(*args: str, cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """A short `ntonix` command (no server), with no NTONIX_* variable of the caller's environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NTONIX_")}
    return subprocess.run(
        [sys.executable, "-m", "ntonix", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=cwd,
    )


def log_lines(proc: Proc, pattern: str) -> list[str]:
    return [line for line in proc.log().splitlines() if re.search(pattern, line)]


def access_lines(proc: Proc) -> list[dict[str, str]]:
    """The gateway's text access lines as key=value fields."""
    out = []
    for line in proc.log().splitlines():
        if " ntonix.access: access " in line:
            fields = dict(re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)', line.split(" access ", 1)[1]))
            out.append({k: v.strip('"') for k, v in fields.items()})
    return out


def raw_request(port: int, path: str, body: bytes, headers: dict[str, str]) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{head}\r\n".encode() + body
    )
    return sock


def reset(sock: socket.socket) -> None:
    """Close with an RST, as a client that crashed or gave up would."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def sse_payloads(raw: bytes) -> list[bytes]:
    return [block[len(b"data: ") :] for block in raw.split(b"\n\n") if block.startswith(b"data: ")]


# -- faults a user hits --------------------------------------------------------------------------


def test_fault_01_gzip_answer_replayed_with_content_encoding(
    procs: Processes, httpserver: HTTPServer
) -> None:
    # A backend that gzips when asked (--gzip): the gateway asks for identity on cacheable requests,
    # so what it stores decodes for every client.
    mock = procs.mock("--gzip")
    gw = procs.gateway([addr(mock)])
    body = chat_body("compress me")
    miss = post(gw, body, {"accept-encoding": "gzip"})
    assert miss.headers["x-cache"] == "MISS" and miss.json()["choices"]
    assert header_of(last_chat(mock), "accept-encoding") == "identity"
    for accept in ("identity", "gzip", "gzip, deflate, br"):
        hit = post(gw, body, {"accept-encoding": accept})
        assert hit.headers["x-cache"] == "HIT"
        assert hit.content == miss.content  # httpx decodes when content-encoding says so
        assert hit.json()["choices"]

    # A backend (or a proxy in front of it) that gzips whatever it is asked: its encoding is stored
    # and replayed; a client that does not accept gzip gets the decompressed bytes.
    plain = json.dumps({"id": "c1", "object": "chat.completion", "choices": []}).encode()

    def always_gzip(request: Request) -> Response:
        return gzip_response(plain)

    httpserver.expect_request("/health").respond_with_json({"status": "ok"})
    httpserver.expect_request(CHAT).respond_with_handler(always_gzip)
    gz = procs.gateway([f"127.0.0.1:{httpserver.port}"])
    first = post(gz, body, {"accept-encoding": "gzip"})
    assert first.headers["x-cache"] == "MISS" and first.content == plain
    for accept, encoded in (("gzip", True), ("identity", False)):
        response, raw = raw_post(gz, json.dumps(body).encode(), accept)
        assert response.headers["x-cache"] == "HIT"
        assert (response.headers.get("content-encoding") == "gzip") is encoded, response.headers
        assert (gzip.decompress(raw) if encoded else raw) == plain


def test_shared_answers_gzipped_against_identity_are_undone_for_clients_that_cannot_read_them(
    procs: Processes, httpserver: HTTPServer
) -> None:
    # A backend that gzips whatever it is asked, answering only once two identical requests wait on
    # the first (coalesced): the leader's client and each waiter get what their own Accept-Encoding
    # allows, as a cache hit does (the gateway asked the backend for identity on their behalf).
    plain = json.dumps({"id": "c2", "object": "chat.completion", "choices": []}).encode()
    gw_box: list[Proc] = []

    def gzip_after_two_joined(request: Request) -> Response:
        wait_for(lambda: metrics(gw_box[0])["cache_coalesced"] >= 2, timeout=20, what="2 coalesced")
        return gzip_response(plain)

    httpserver.expect_request("/health").respond_with_json({"status": "ok"})
    httpserver.expect_request(CHAT).respond_with_handler(gzip_after_two_joined)
    gw = procs.gateway([f"127.0.0.1:{httpserver.port}"])
    gw_box.append(gw)
    body = json.dumps(chat_body("shared and compressed")).encode()

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        leader = pool.submit(raw_post, gw, body, "identity")
        # the leader's miss and its in-flight entry are one synchronous step of the gateway's loop
        wait_for(lambda: metrics(gw)["cache_misses"] >= 1, what="the leader in flight")
        waiters = [pool.submit(raw_post, gw, body, accept) for accept in ("identity", "gzip")]
        answers = [leader.result(), *(w.result() for w in waiters)]
    for (response, raw), (accept, cache) in zip(
        answers, (("identity", "MISS"), ("identity", "COALESCED"), ("gzip", "COALESCED")), strict=True
    ):
        assert response.status_code == 200 and response.headers["x-cache"] == cache, response.headers
        encoded = accept == "gzip"
        assert (response.headers.get("content-encoding") == "gzip") is encoded, (accept, response.headers)
        assert (gzip.decompress(raw) if encoded else raw) == plain
    assert len([entry for entry in httpserver.log if entry[0].path == CHAT]) == 1


def test_fault_02_port_in_use_stops_start_up_with_one_line_and_exit_2(procs: Processes) -> None:
    mock = procs.mock()
    first = procs.gateway([addr(mock)])

    def second_on(port: int) -> tuple[int, str]:
        proc = procs.spawn(["run", "--port", str(port), "--bind", "127.0.0.1", "--backend", addr(mock)], port)
        try:
            code = proc.popen.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"a second gateway started on the busy port {port}:\n{proc.log()}")
        return code, proc.log()

    # Another NTONIX (Granian binds with SO_REUSEPORT) holds the port.
    code, output = second_on(first.port)
    assert code == 2, output
    assert output.strip().splitlines() == [output.strip()], output
    assert output.startswith(f"ntonix: cannot listen on 127.0.0.1:{first.port}: "), output
    assert "in use" in output and "listening" not in output.lower()
    assert post(first, chat_body("still mine")).status_code == 200

    # Anything else holds it: same one line, and "listening" was never printed.
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        code, output = second_on(busy.getsockname()[1])
    assert code == 2, output
    assert len(output.strip().splitlines()) == 1 and "listening" not in output.lower(), output


def test_fault_03_cache_is_scoped_by_the_forwarded_credential(procs: Processes) -> None:
    mock = procs.mock("--api-key", "right-key")
    gw = procs.gateway([addr(mock)])
    body = chat_body("secret question")
    good = post(gw, body, {"authorization": "Bearer right-key"})
    assert good.status_code == 200 and good.headers["x-cache"] == "MISS"
    wrong = post(gw, body, {"authorization": "Bearer wrong-key"})
    assert wrong.status_code == 401, "a wrong credential must reach the backend, not the cached 200"
    assert wrong.headers.get("x-cache") != "HIT"
    assert post(gw, body).status_code == 401  # no credential: not the key's answer either
    again = post(gw, body, {"authorization": "Bearer right-key"})
    assert again.status_code == 200 and again.headers["x-cache"] == "HIT"
    # The scope is a hash: the credential itself appears nowhere the gateway writes.
    assert "right-key" not in gw.log()
    assert "right-key" not in httpx.get(gw.url + "/metrics", timeout=10).text


@pytest.mark.parametrize("host", ["http://localhost", "[::1]", "localhost:8001", "local host"])
def test_fault_04_bad_backend_hosts_fail_validation_with_one_line(tmp_path: Path, host: str) -> None:
    config = tmp_path / "bad.json"
    config.write_text(json.dumps({"backends": [{"host": host, "port": 8001}]}))
    done = ntonix("config", "--config", str(config))
    assert done.returncode == 2, done.stdout
    assert done.stdout == "" and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("ntonix: invalid configuration: backends[0].host: "), done.stderr
    assert repr(host) in done.stderr


def test_fault_04_backend_url_on_the_command_line_is_a_url_not_a_bad_port() -> None:
    done = ntonix("config", "--backend", "http://localhost:8001")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["backends"] == [{"url": "http://localhost:8001", "weight": 1}]
    bad = ntonix("config", "--backend", "http://local host:8001")
    assert bad.returncode == 2 and "invalid" in bad.stderr and "integers" not in bad.stderr, bad.stderr


def test_fault_05_seed_habits_levels_no_subcommand_and_no_backends_message(
    procs: Processes, tmp_path: Path
) -> None:
    for level in ("trace", "warn", "TRACE"):
        done = ntonix("config", "--log-level", level, "--backend", "127.0.0.1:9")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["logging"]["level"] == level.lower()

    # No backends anywhere: name what was read, and point at an unread config/ntonix.json.
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "ntonix.json").write_text(json.dumps({"backends": [{"host": "x", "port": 1}]}))
    done = ntonix("run", cwd=tmp_path)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "read: no config file, environment, command line" in done.stderr, done.stderr
    assert "config/ntonix.json exists but was not read" in done.stderr, done.stderr

    # `ntonix --port N --backend ...` without `run` runs the gateway.
    mock = procs.mock()
    port = free_port()
    gw = procs.wait_healthy(
        procs.spawn(["--port", str(port), "--bind", "127.0.0.1", "--backend", addr(mock)], port)
    )
    assert post(gw, chat_body("no subcommand")).status_code == 200
    assert "--help" in ntonix("--help").stdout and ntonix("--version").returncode == 0


def test_fault_06_debug_lines_info_start_up_and_access_lines_for_every_route(procs: Processes) -> None:
    mock = procs.mock()
    dead = free_port()
    gw = procs.gateway(
        backends=[f"127.0.0.1:{dead}", addr(mock)],
        config={"logging": {"level": "debug"}, "health_check": QUIET_CHECKS},
    )
    assert log_lines(gw, r" INFO ntonix\.server: NTONIX listening on http://127\.0\.0\.1:")
    assert not log_lines(gw, r" WARNING .*(listening|ready)")
    for i in range(2):  # round robin: one of the two tries the dead backend first and is retried
        assert post(gw, chat_body(f"debug {i}")).status_code == 200
    assert post(gw, chat_body("debug 0")).headers["x-cache"] == "HIT"
    assert httpx.get(gw.url + "/no/such/path", timeout=10).status_code == 404
    assert httpx.get(gw.url + CHAT, timeout=10).status_code == 405
    assert httpx.get(gw.url + "/metrics", timeout=10).status_code == 200

    wait_for(lambda: log_lines(gw, r" DEBUG .*cache hit"), what="the cache hit's debug line")
    assert log_lines(gw, r" DEBUG ntonix\.balance: picked 127\.0\.0\.1:\d+ for model")  # selection
    assert log_lines(gw, r" DEBUG ntonix\.proxy: request \S+: retry 1 on ")  # retries
    assert log_lines(gw, r" DEBUG ntonix\.proxy: request \S+: cache miss")  # cache decisions
    assert log_lines(gw, rf" DEBUG ntonix\.health: backend 127\.0\.0\.1:{dead}: health probe failed")

    def access(path: str, status: str) -> bool:
        return any(a.get("path") == path and a.get("status") == status for a in access_lines(gw))

    wait_for(lambda: access("/metrics", "200"), what="the /metrics access line")
    assert access("/no/such/path", "404") and access(CHAT, "405")

    gw.signal(signal.SIGHUP)  # reload: INFO, not WARNING
    wait_for(lambda: log_lines(gw, r" INFO ntonix: backends reloaded: "), what="the reload line")
    assert not log_lines(gw, r" WARNING .*reloaded")


def test_fault_07_retry_after_allow_ready_and_client_errors_in_metrics(procs: Processes) -> None:
    mock = procs.mock()
    gw = procs.gateway(
        [addr(mock)], config={"health_check": {"interval_seconds": 0.2, "unhealthy_threshold": 1}}
    )
    ready = httpx.get(gw.url + "/ready", timeout=10)
    assert ready.status_code == 200 and ready.json()["healthy_backends"] == 1
    assert httpx.get(gw.url + "/health", timeout=10).json() == {"status": "healthy"}

    wrong_method = httpx.get(gw.url + CHAT, timeout=10)
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
    assert httpx.post(gw.url + "/health", timeout=10).headers["allow"] == "GET, HEAD"

    bad = httpx.post(gw.url + CHAT, content=b"{not json", headers=JSON_HEADERS, timeout=10)
    assert bad.status_code == 400
    assert post(gw, chat_body("fine")).status_code == 200

    mock.kill()
    wait_for(lambda: httpx.get(gw.url + "/ready", timeout=5).status_code == 503, what="/ready to say 503")
    assert httpx.get(gw.url + "/health", timeout=10).status_code == 200  # liveness is not readiness
    down = post(gw, chat_body("nobody home"))
    assert down.status_code == 503 and int(down.headers["retry-after"]) >= 1
    assert down.json()["error"]["code"] == "no_healthy_backend"

    m = metrics(gw)
    assert m["requests_client_error"] == 1
    assert m["requests_failed"] >= 1
    assert m["requests_error"] == m["requests_client_error"] + m["requests_failed"]


def test_fault_08_makefile_announces_the_rust_build_and_demo_needs_no_lint_extras() -> None:
    def plan(target: str) -> list[str]:
        done = subprocess.run(
            ["make", "-n", "-B", target], cwd=REPO, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.splitlines()

    for target in ("demo", "test"):
        lines = plan(target)
        builds = [i for i, line in enumerate(lines) if "maturin develop" in line]
        assert builds, lines
        notices = [i for i, line in enumerate(lines[: builds[0]]) if "echo" in line and "Rust" in line]
        assert notices, f"`make {target}` builds Rust without saying so:\n" + "\n".join(lines)
        assert re.search(r"minute|\d+ ?s\b", lines[notices[-1]]), lines[notices[-1]]
    demo_builds = [line for line in plan("demo") if "maturin develop" in line]
    assert demo_builds and all("lint" not in line for line in demo_builds), demo_builds


# -- faults found by reading ---------------------------------------------------------------------


def test_fault_11_stale_success_keeps_the_circuit_open_and_only_the_probe_frees_its_slot(
    procs: Processes,
) -> None:
    mock = procs.mock(name="m")
    threshold = 2
    gw = procs.gateway(
        [addr(mock)],
        config={
            "cache": {"enabled": False},
            "health_check": QUIET_CHECKS,
            "circuit_breaker": {"failure_threshold": threshold, "open_seconds": 2.0},
        },
    )

    def in_flight(n: int) -> None:
        wait_for(lambda: mock_stats(mock)["in_flight"] == n, timeout=30, what=f"{n} in flight at the mock")

    def open_circuit() -> None:
        for i in range(threshold):
            assert post(gw, chat_body(f"fail {i}"), {"x-mock-status": "500"}).status_code == 500
        assert backend_state(gw, mock.port)["circuit_state"] == "open"

    def probe(latency_ms: int) -> httpx.Response:
        """Send until the open circuit lets one request through (after open_seconds)."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            response = post(gw, chat_body("probe"), {"x-mock-latency-ms": str(latency_ms)})
            if response.status_code != 503:
                return response
            time.sleep(0.05)
        raise AssertionError("the circuit never let a probe through")

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        # A slow request placed while the circuit was closed succeeds after it opened: still open.
        stale = pool.submit(post, gw, chat_body("stale"), {"x-mock-latency-ms": "2500"})
        in_flight(1)
        open_circuit()
        assert stale.result(timeout=30).status_code == 200
        assert backend_state(gw, mock.port)["circuit_state"] == "open"
        assert probe(0).status_code == 200  # the probe's success closes it
        assert backend_state(gw, mock.port)["circuit_state"] == "closed"

        # A request placed while closed whose client leaves while the probe is in flight must not free
        # the probe's slot: a second request is still refused.
        leaver = raw_request(
            gw.port, CHAT, json.dumps(chat_body("leaver")).encode(), {**JSON_HEADERS, "x-mock-hang": "1"}
        )
        try:
            in_flight(1)
            open_circuit()
            probing = pool.submit(probe, 6000)
            in_flight(2)
            assert backend_state(gw, mock.port)["circuit_state"] == "half_open"
        finally:
            reset(leaver)
        in_flight(1)  # the gateway dropped the leaver's upstream request; the probe runs on
        second = post(gw, chat_body("second"))
        assert second.status_code == 503, "a second request got in beside the half-open probe"
        assert probing.result(timeout=30).status_code == 200
    assert backend_state(gw, mock.port)["circuit_state"] == "closed"


def test_fault_12_client_leaving_a_cached_stream_replay_is_a_499_not_a_500(procs: Processes) -> None:
    mock = procs.mock()
    gw = procs.gateway([addr(mock)], config={"cache": {"streaming": True}})
    body = chat_body("a long story", stream=True)
    headers = {"x-mock-tokens": "20000"}
    with httpx.stream("POST", gw.url + CHAT, json=body, headers=headers, timeout=60) as first:
        assert first.headers["x-cache"] == "MISS"
        assert b"".join(first.iter_raw()).rstrip().endswith(b"[DONE]")
    wait_for(lambda: httpx.get(gw.url + "/cache/stats", timeout=5).json()["entries"] == 1, what="stored")
    before = metrics(gw)["client_disconnects"]
    for _ in range(3):
        sock = raw_request(gw.port, CHAT, json.dumps(body).encode(), JSON_HEADERS)
        assert b"x-cache: hit" in sock.recv(4096).lower()
        reset(sock)
    wait_for(lambda: metrics(gw)["client_disconnects"] >= before + 1, what="the replay's disconnect")
    wait_for(lambda: len(access_lines(gw)) >= 4, what="the replays' access lines")
    statuses = [a["status"] for a in access_lines(gw) if a.get("cache") == "HIT"]
    assert "500" not in statuses and "499" in statuses, statuses
    assert "Traceback" not in gw.log() and "failed inside the gateway" not in gw.log()


def test_fault_13_broken_stream_counts_one_backend_request_and_one_error(procs: Processes) -> None:
    mock = procs.mock()
    gw = procs.gateway([addr(mock)], config={"health_check": QUIET_CHECKS})
    with httpx.stream(
        "POST",
        gw.url + CHAT,
        json=chat_body("break", stream=True),
        headers={"x-mock-abort-after": "3", "x-mock-tokens": "20"},
        timeout=30,
    ) as response:
        raw = b"".join(response.iter_raw())
    assert b"upstream_stream_broken" in raw
    state = backend_state(gw, mock.port)
    assert state["requests"] == 1, state
    assert state["errors"] == 1, state
    assert metrics(gw)["stream_errors"] == 1


def test_fault_14_coalescing_survives_a_leader_whose_client_left(procs: Processes) -> None:
    mock = procs.mock()
    gw = procs.gateway([addr(mock)], config={"health_check": QUIET_CHECKS})
    body = chat_body("together again")

    def coalesced(n: int) -> None:
        wait_for(lambda: metrics(gw)["cache_coalesced"] == n, timeout=30, what=f"{n} coalesced")

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        leader = raw_request(gw.port, CHAT, json.dumps(body).encode(), {**JSON_HEADERS, "x-mock-hang": "1"})
        try:
            wait_for(lambda: mock_stats(mock)["in_flight"] == 1, what="the leader at the mock")
            # Two waiters join in order; each becomes a leader of its own when the first leader's client
            # leaves. The first one's answer is not stored (429), the second one is slow.
            quick = pool.submit(post, gw, body, {"x-mock-status": "429", "x-mock-latency-ms": "300"})
            coalesced(1)
            slow = pool.submit(post, gw, body, {"x-mock-latency-ms": "5000"})
            coalesced(2)
        finally:
            reset(leader)
        assert quick.result(timeout=30).status_code == 429
        # The quick one finished: the slow one is still in flight as the key's leader, so an identical
        # request joins it instead of going to the backend.
        assert mock_stats(mock)["in_flight"] == 1
        late = post(gw, body)
        assert slow.result(timeout=30).status_code == 200
    assert late.status_code == 200
    assert late.headers["x-cache"] == "COALESCED", late.headers
    assert metrics(gw)["cache_coalesced"] == 3


def test_fault_15_one_cache_hit_rate_in_metrics_and_cache_stats(procs: Processes) -> None:
    mock = procs.mock()
    gw = procs.gateway([addr(mock)])
    body = chat_body("counted once")
    assert post(gw, body).headers["x-cache"] == "MISS"
    assert post(gw, body).headers["x-cache"] == "HIT"
    assert post(gw, body).headers["x-cache"] == "HIT"
    post(gw, body, {"cache-control": "no-cache"})  # no lookup ran: neither a hit nor a miss
    post(gw, chat_body("not stored"), {"cache-control": "no-store"})
    stats = httpx.get(gw.url + "/cache/stats", timeout=10).json()
    m = metrics(gw)
    assert (stats["hits"], stats["misses"]) == (2, 1), stats
    assert (m["cache_hits"], m["cache_misses"]) == (stats["hits"], stats["misses"])
    assert m["cache_hit_rate"] == stats["hit_rate"] == pytest.approx(2 / 3)
    prom = httpx.get(gw.url + "/metrics/prometheus", timeout=10).text
    assert "ntonix_cache_hits_total 2" in prom and "ntonix_cache_misses_total 1" in prom
    docs = (REPO / "docs" / "operations.md").read_text()
    assert "hit rate" in docs.lower() and "no-cache" in docs


def test_fault_16_one_request_id_and_coalesced_followers_keep_their_own(procs: Processes) -> None:
    mock = procs.mock()
    gw = procs.gateway([addr(mock)])
    echo = {"x-mock-echo-request-id": "1"}
    alone = post(gw, chat_body("echo"), {**echo, "x-request-id": "client-id-1"})
    assert alone.headers.get_list("x-request-id") == ["client-id-1"]
    hit = post(gw, chat_body("echo"), {"x-request-id": "client-id-2"})
    assert hit.headers["x-cache"] == "HIT" and hit.headers.get_list("x-request-id") == ["client-id-2"]

    body = chat_body("echo, together")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        lead = pool.submit(post, gw, body, {**echo, "x-mock-latency-ms": "3000", "x-request-id": "lead-id"})
        wait_for(lambda: mock_stats(mock)["in_flight"] == 1, what="the leader at the mock")
        follower = post(gw, body, {"x-request-id": "follower-id"})
        assert lead.result(timeout=30).headers.get_list("x-request-id") == ["lead-id"]
    assert follower.headers["x-cache"] == "COALESCED"
    assert follower.headers.get_list("x-request-id") == ["follower-id"]


def test_fault_18_idle_disconnect_sweeper_stops_and_restarts_on_demand() -> None:
    from ntonix.pipeline.watch import SlowRequestWatch

    async def scenario() -> None:
        watch = SlowRequestWatch(period=0.01)
        wakes = 0
        real_sleep = asyncio.sleep

        async def counting_sleep(delay: float) -> None:
            nonlocal wakes
            wakes += 1
            await real_sleep(delay)

        proto = SimpleNamespace()
        watch.add("a", proto, lambda: None)
        task = watch._task
        assert task is not None
        watch.remove("a")
        await asyncio.wait_for(asyncio.shield(task), timeout=5)  # idle: the sweeper ends by itself
        assert watch._task is None
        asyncio_sleep, asyncio.sleep = asyncio.sleep, counting_sleep  # type: ignore[assignment]
        try:
            await real_sleep(0.2)  # twenty periods of an idle gateway
        finally:
            asyncio.sleep = asyncio_sleep  # type: ignore[assignment]
        assert wakes == 0
        watch.add("b", proto, lambda: None)  # on demand again
        assert watch._task is not None and not watch._task.done()
        watch.remove("b")
        watch.close()

    asyncio.run(scenario())


def test_fault_18_raw_body_hashed_once_on_a_miss_and_never_when_not_cacheable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ntonix.cache.policy import KeyMemo
    from ntonix.pipeline.exchange import Exchange
    from ntonix.pipeline.proxy import Proxy
    from ntonix.routes.spec import CHAT as CHAT_ROUTE

    calls: list[bytes] = []
    real = KeyMemo.body_hash

    def counting(route: str, body: bytes) -> int:
        calls.append(body)
        return real(route, body)

    monkeypatch.setattr(KeyMemo, "body_hash", staticmethod(counting))
    proxy = SimpleNamespace(keys=KeyMemo())
    body = json.dumps(chat_body("hash me")).encode()
    for cacheable, expected in ((False, 0), (True, 1), (True, 2)):
        ex = Exchange("id", 0.0, CHAT_ROUTE)
        digest = Proxy._parse(proxy, ex, body, cacheable)  # type: ignore[arg-type]
        assert len(calls) == expected, (cacheable, calls)
        assert (digest is None) is not cacheable and ex.facts is not None


def test_fault_20_docs_name_only_code_that_exists() -> None:
    code = "\n".join(
        p.read_text() for p in (REPO / "python" / "ntonix").rglob("*") if p.suffix in (".py", ".pyi")
    )
    files = {p.name for top in ("python", "tests", "bench", "mock") for p in (REPO / top).rglob("*.py")}
    files |= {p.name for p in (REPO / "rust").rglob("*.rs")}
    texts = {p: p.read_text() for p in [REPO / "README.md", *(REPO / "docs").rglob("*.md")]}
    texts |= {p: p.read_text() for p in (REPO / "python" / "ntonix").rglob("*.py")}
    spec_in_repo = (REPO / "SPEC.md").exists() or (REPO / "docs" / "SPEC.md").exists()
    for path, text in texts.items():
        if not spec_in_repo:
            assert "SPEC §" not in text, (
                f"{path.relative_to(REPO)} cites a SPEC that is not in the repository"
            )
    for path in [REPO / "docs" / "architecture.md", REPO / "docs" / "operations.md", REPO / "README.md"]:
        text = path.read_text()
        for name in re.findall(r"`(?:[\w/]+/)?(\w+\.(?:py|rs))`", text):
            assert name in files, f"{path.name} names {name}, which does not exist"
        for owner, attr in re.findall(r"`([A-Z]\w+)\.(_?[a-z]\w*)\b", text):
            assert re.search(rf"class {owner}\b", code), f"{path.name} names class {owner}, not in the code"
            assert re.search(rf"def {attr}\b|\b{attr} =|\"{attr}\"|self\.{attr}\b", code), (
                f"{path.name} names {owner}.{attr}, not in the code"
            )
    import ntonix

    doc = ntonix.__doc__ or ""
    for module, attr in re.findall(r"`(ntonix[\w.]*):(\w+)`", doc):
        imported = __import__(module, fromlist=[attr])
        assert hasattr(imported, attr), f"ntonix's docstring names {module}:{attr}"
    assert all(hasattr(ntonix, name) for name in ntonix.__all__)
    assert "settings type" not in doc and "application factory" not in doc, doc


# -- faults found against a real server ----------------------------------------------------------


def test_fault_21_request_ids_are_uuid4_and_a_clients_valid_id_is_kept(procs: Processes) -> None:
    mock = procs.mock("--uuid-request-ids")
    gw = procs.gateway([addr(mock)], config={"cache": {"enabled": False}})
    answer = post(gw, chat_body("llama-cpp-python accepts only UUIDs"))
    assert answer.status_code == 200, answer.text
    generated = answer.headers["x-request-id"]
    assert uuid.UUID(generated).version == 4
    assert header_of(last_chat(mock), "x-request-id") == generated
    mine = str(uuid.uuid4())
    kept = post(gw, chat_body("mine"), {"x-request-id": mine})
    assert kept.status_code == 200 and kept.headers["x-request-id"] == mine
    assert header_of(last_chat(mock), "x-request-id") == mine
    ids = {post(gw, chat_body(f"n{i}")).headers["x-request-id"] for i in range(5)}
    assert len(ids) == 5 and all(uuid.UUID(i).version == 4 for i in ids)


def test_fault_22_backend_without_health_endpoint_is_probed_at_v1_models(procs: Processes) -> None:
    mock = mock_without_health(procs)
    gw = procs.gateway(
        [addr(mock)], config={"health_check": {"interval_seconds": 0.2, "unhealthy_threshold": 2}}
    )

    def models_probes() -> int:
        return sum(1 for r in mock_requests(mock) if r["method"] == "GET" and r["path"] == "/v1/models")

    wait_for(lambda: models_probes() >= 5, timeout=30, what="health probes at /v1/models")
    state = backend_state(gw, mock.port)
    assert state["healthy"] is True and state["consecutive_check_failures"] == 0, state
    assert post(gw, chat_body("healthy after all")).status_code == 200
    assert httpx.get(gw.url + "/ready", timeout=10).status_code == 200
    said = log_lines(gw, r"has no /health \(404\): probing /v1/models instead")
    assert len(said) == 1, gw.log()

    # An explicit health path per backend is used as given.
    other = mock_without_health(procs)
    gw2 = procs.gateway(
        config={
            "backends": [{"host": "127.0.0.1", "port": other.port, "health_path": "/v1/models"}],
            "health_check": {"interval_seconds": 0.2, "unhealthy_threshold": 2},
        }
    )
    wait_for(
        lambda: mock_stats(other)["health_requests"] == 0 and len(mock_requests(other)) >= 3, what="probes"
    )
    assert post(gw2, chat_body("explicit path")).status_code == 200


def test_fault_23_probe_timeout_while_the_backend_streams_does_not_mark_it_down(procs: Processes) -> None:
    # One request at a time, like a single-slot llama.cpp server: probes wait behind the stream.
    mock = procs.mock("--serial")
    gw = procs.gateway(
        [addr(mock)],
        config={
            "cache": {"enabled": False},
            "health_check": {
                "path": "/v1/models",
                "interval_seconds": 0.5,
                "timeout_seconds": 0.5,
                "unhealthy_threshold": 2,
            },
        },
    )
    seen_unhealthy = False
    with httpx.stream(
        "POST",
        gw.url + CHAT,
        json=chat_body("long generation", stream=True),
        headers={"x-mock-tokens": "40", "x-mock-token-rate": "10"},  # ~4 s, a chunk every 100 ms
        timeout=30,
    ) as response:
        raw = b""
        for chunk in response.iter_raw():
            raw += chunk
            if not backend_state(gw, mock.port)["healthy"]:
                seen_unhealthy = True
    assert raw.rstrip().endswith(b"data: [DONE]")
    assert not seen_unhealthy, "a backend busy streaming was marked unhealthy for slow probes"
    assert "marked unhealthy" not in gw.log()
    docs = (REPO / "docs" / "operations.md").read_text()
    assert "progress" in docs and "probe" in docs


def test_fault_25_done_then_abrupt_close_is_a_complete_stream(procs: Processes) -> None:
    mock = procs.mock()
    gw = procs.gateway([addr(mock)], config={"cache": {"enabled": False}, "health_check": QUIET_CHECKS})
    with httpx.stream(
        "POST",
        gw.url + CHAT,
        json=chat_body("clean end", stream=True),
        headers={"x-mock-close-after-done": "1"},
        timeout=30,
    ) as response:
        raw = b"".join(response.iter_raw())
    payloads = sse_payloads(raw)
    assert payloads[-1] == b"[DONE]", raw[-300:]
    assert b"upstream_stream_broken" not in raw
    state = backend_state(gw, mock.port)
    assert state["errors"] == 0 and state["requests"] == 1, state
    assert metrics(gw)["stream_errors"] == 0
    assert "broke" not in gw.log()


# -- Rust faults (the fixes and their direct tests are in rust/ and tests/test_forwarder_core.py) --


def test_fault_10_cancelling_the_awaitable_drops_the_rust_future_and_closes_the_connection() -> None:
    from tests import test_forwarder_core as core

    core.test_cancelling_a_task_awaiting_a_pending_closes_the_upstream_connection()
    core.test_wait_for_running_out_on_a_pending_closes_the_upstream_connection()
    core.test_cancelling_a_task_awaiting_next_chunk_closes_the_upstream_connection()


def test_fault_17_an_abort_racing_the_start_of_a_chunk_wait_is_never_lost() -> None:
    """A cancel landing at any moment around the start of a chunk read closes the connection at once.

    The race itself (the flag checked before the `Notified` existed) is pinned deterministically by the
    Rust unit test `forward::client_tests::a_trigger_racing_the_start_of_a_wait_is_never_lost`; this
    drives the same window from Python, cancelling after 0 to 3 turns of the loop, many times.
    """
    from tests import test_forwarder_core as core

    async def main() -> None:
        for round_ in range(40):
            async with core.serve(core.first_chunk_then_silence) as server:
                with core.forwarder(idle_timeout=30.0) as fwd:
                    response = await core.request(fwd, server.url)
                    task = asyncio.ensure_future(response.next_chunk())
                    for _ in range(round_ % 4):
                        await asyncio.sleep(0)
                    task.cancel()
                    await core.closed_soon(server)  # fails past 1 s; the idle timeout is 30 s
                    with contextlib.suppress(asyncio.CancelledError):
                        await task

    core.run(main())


class LatePrefill:
    """A backend that sends its SSE status line and headers at once and the first token `delay` later."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                data = conn.recv(65536)
                if not data:
                    return
                head += data
            if head.startswith(b"GET"):  # health checks
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: application/json\r\n\r\n{}"
                )
                return
            conn.sendall(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
            )
            time.sleep(self.delay)
            for event in (b'data: {"choices":[]}\n\n', b"data: [DONE]\n\n"):
                conn.sendall(b"%x\r\n%s\r\n" % (len(event), event))
            conn.sendall(b"0\r\n\r\n")

    def close(self) -> None:
        self.listener.close()


def test_fault_24_headers_reach_the_client_before_a_late_first_token(procs: Processes) -> None:
    from tests import test_forwarder_core as core

    core.test_headers_are_answered_before_a_late_first_chunk()
    core.test_a_first_chunk_sent_with_the_headers_comes_as_body()

    # End to end: a 3 s prefill must not hold the status line (1.5 s bound: generous on a loaded machine,
    # and still half the prefill).
    backend = LatePrefill(delay=3.0)
    try:
        gw = procs.gateway([f"127.0.0.1:{backend.port}"], config={"health_check": QUIET_CHECKS})
        started = time.monotonic()
        with httpx.stream("POST", gw.url + CHAT, json=chat_body("long prompt", stream=True), timeout=30) as r:
            headers_after = time.monotonic() - started
            raw = b"".join(r.iter_raw())
            total = time.monotonic() - started
        assert r.status_code == 200
        assert headers_after < 1.5, f"the status line came {headers_after:.2f}s after the request"
        assert total >= 2.9 and raw.rstrip().endswith(b"data: [DONE]")
    finally:
        backend.close()
