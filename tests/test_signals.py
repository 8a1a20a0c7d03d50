"""Signals of a running gateway (issue 4, item 6), against real processes.

SIGHUP re-reads the config file and applies its backend list (add, remove, re-weight) while requests
keep flowing, none dropped, a stream in flight on a removed backend included; a broken file is logged
and the old list kept. SIGTERM/SIGINT stop accepting at once, let requests in flight finish (streams
get their [DONE]) and exit 0; requests still running when `server.shutdown_grace_seconds` is over are
cut so the process still exits in time.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Proc, Processes, chat_body, wait_for

CHAT = "/v1/chat/completions"
NO_CACHE: dict[str, Any] = {"cache": {"enabled": False}}


def post_chat(gateway: Proc, content: str = "hello", headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(
        gateway.url + CHAT,
        content=json.dumps(chat_body(content)),
        headers={"content-type": "application/json", **(headers or {})},
        timeout=10.0,
    )


def spread(gateway: Proc, count: int) -> Counter[str]:
    names: Counter[str] = Counter()
    for i in range(count):
        response = post_chat(gateway, f"spread {i}")
        assert response.status_code == 200, response.text
        names[response.json()["system_fingerprint"]] += 1
    return names


def metrics(gateway: Proc) -> dict[str, Any]:
    return dict(httpx.get(gateway.url + "/metrics", timeout=5.0).json())


def backend_list(gateway: Proc) -> list[tuple[int, int]]:
    """(port, weight) of each backend the gateway uses, in order."""
    return [(entry["port"], entry["weight"]) for entry in metrics(gateway)["backends"]]


def mock_stats(mock: Proc) -> dict[str, Any]:
    return dict(httpx.get(mock.url + "/mock/stats", timeout=5.0).json())


def write_backends(gateway: Proc, backends: list[tuple[Proc, int]]) -> None:
    path: Path = gateway.config_path  # type: ignore[attr-defined]
    document = json.loads(path.read_text())
    document["backends"] = [
        {"host": "127.0.0.1", "port": mock.port, "weight": weight} for mock, weight in backends
    ]
    path.write_text(json.dumps(document))


def reload_to(gateway: Proc, backends: list[tuple[Proc, int]]) -> None:
    write_backends(gateway, backends)
    gateway.signal(signal.SIGHUP)
    expected = [(mock.port, weight) for mock, weight in backends]
    wait_for(lambda: backend_list(gateway) == expected, timeout=5.0, what=f"backends {expected}")


def refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return False
    except ConnectionRefusedError:
        return True


class Load:
    """Background non-streaming requests, two at a time, until stopped; records every outcome."""

    def __init__(self, gateway: Proc) -> None:
        self.gateway = gateway
        self.outcomes: Counter[str] = Counter()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(2)]
        for thread in self.threads:
            thread.start()

    def _run(self) -> None:
        with httpx.Client(timeout=10.0) as client:
            while not self.stopping.is_set():
                try:
                    response = client.post(
                        self.gateway.url + CHAT,
                        content=json.dumps(chat_body("load")),
                        headers={"content-type": "application/json", "x-mock-latency-ms": "20"},
                    )
                    self.outcomes[str(response.status_code)] += 1
                except httpx.HTTPError as err:
                    self.outcomes[type(err).__name__] += 1

    def stop(self) -> Counter[str]:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=15)
        return self.outcomes


class Stream:
    """One streamed chat request read on its own thread; `events` counts the SSE events received."""

    def __init__(self, gateway: Proc, headers: dict[str, str], content: str = "stream") -> None:
        self.gateway = gateway
        self.headers = {"content-type": "application/json", **headers}
        self.content = content
        self.body = b""
        self.status = 0
        self.error: Exception | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            with (
                httpx.Client(timeout=30.0) as client,
                client.stream(
                    "POST",
                    self.gateway.url + CHAT,
                    content=json.dumps(chat_body(self.content, stream=True)),
                    headers=self.headers,
                ) as response,
            ):
                self.status = response.status_code
                for piece in response.iter_raw():
                    self.body += piece
        except Exception as err:
            self.error = err

    @property
    def events(self) -> int:
        return self.body.count(b"\n\n")

    def result(self, timeout: float = 30.0) -> bytes:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the stream did not end"
        return self.body


# -- SIGHUP ----------------------------------------------------------------------------------------


def test_sighup_adds_removes_and_reweights_backends_without_dropping_requests(procs: Processes) -> None:
    a, b = procs.mock(name="a"), procs.mock(name="b")
    gateway = procs.gateway(config={**NO_CACHE, "backends": [{"host": "127.0.0.1", "port": a.port}]})
    assert spread(gateway, 3) == {"a": 3}
    # a stream on a that outlives both reloads below, a removing it included
    stream = Stream(gateway, {"x-mock-tokens": "80", "x-mock-token-rate": "20"})  # 4 s
    wait_for(lambda: stream.events >= 2, what="the stream to start")
    load = Load(gateway)

    # the load shares the balancer, so shares are read from the mocks' own counters
    reload_to(gateway, [(a, 1), (b, 1)])  # add
    wait_for(lambda: mock_stats(b)["chat_requests"] >= 5, what="the added backend to get traffic")

    reload_to(gateway, [(b, 1)])  # remove
    assert spread(gateway, 4) == {"b": 4}
    a_chats = mock_stats(a)["chat_requests"]
    assert spread(gateway, 4) == {"b": 4}
    assert mock_stats(a)["chat_requests"] == a_chats

    reload_to(gateway, [(a, 3), (b, 1)])  # re-weight (and add back)
    before = [mock_stats(m)["chat_requests"] for m in (a, b)]
    assert set(spread(gateway, 40)) == {"a", "b"}
    share_a, share_b = (mock_stats(m)["chat_requests"] - n for m, n in zip((a, b), before, strict=True))
    assert 2.5 <= share_a / share_b <= 3.5, (share_a, share_b)

    body = stream.result()
    assert stream.error is None
    assert stream.status == 200
    assert body.endswith(b"data: [DONE]\n\n")
    assert mock_stats(a)["streams_completed"] == 1
    outcomes = load.stop()
    assert set(outcomes) == {"200"}, outcomes
    assert outcomes["200"] >= 10
    assert "backends reloaded" in gateway.log()


@pytest.mark.parametrize(
    "broken",
    [
        "{ this is not json",
        json.dumps({"backends": [{"host": "127.0.0.1", "port": 1}], "no_such_section": {}}),
        json.dumps({"backends": []}),
        json.dumps({"backends": [{"host": "127.0.0.1", "port": 70000}]}),
    ],
    ids=["not_json", "unknown_key", "no_backends", "bad_port"],
)
def test_sighup_with_a_broken_file_keeps_the_old_backends(procs: Processes, broken: str) -> None:
    a, b = procs.mock(name="a"), procs.mock(name="b")
    backends = [{"host": "127.0.0.1", "port": a.port}, {"host": "127.0.0.1", "port": b.port}]
    gateway = procs.gateway(config={**NO_CACHE, "backends": backends})
    path: Path = gateway.config_path  # type: ignore[attr-defined]
    good = path.read_text()
    path.write_text(broken)
    gateway.signal(signal.SIGHUP)
    wait_for(lambda: "reload failed" in gateway.log(), timeout=5.0, what="the failed reload logged")
    assert gateway.alive()
    assert backend_list(gateway) == [(a.port, 1), (b.port, 1)]
    assert spread(gateway, 4) == {"a": 2, "b": 2}
    # the reload path still works afterwards
    path.write_text(good)
    reload_to(gateway, [(b, 2)])
    assert spread(gateway, 2) == {"b": 2}


# -- SIGTERM / SIGINT ------------------------------------------------------------------------------


def test_sigterm_lets_requests_in_flight_finish_then_exits_0(procs: Processes) -> None:
    mock = procs.mock(name="m")
    gateway = procs.gateway(
        backends=[f"127.0.0.1:{mock.port}"], config={**NO_CACHE, "server": {"shutdown_grace_seconds": 10}}
    )
    tokens = 30
    streams = [Stream(gateway, {"x-mock-tokens": str(tokens), "x-mock-token-rate": "20"}) for _ in range(3)]
    slow: dict[str, Any] = {}

    def slow_request() -> None:
        slow["response"] = post_chat(gateway, "slow", {"x-mock-latency-ms": "1200"})

    slow_thread = threading.Thread(target=slow_request, daemon=True)
    slow_thread.start()
    wait_for(lambda: all(s.events >= 2 for s in streams), what="the streams to start")
    wait_for(lambda: mock_stats(mock)["in_flight"] == 4, what="all four requests at the backend")

    gateway.signal(signal.SIGTERM)
    signalled_at = time.monotonic()
    wait_for(lambda: refused(gateway.port), timeout=2.0, what="the gateway to stop accepting")
    assert any(s.thread.is_alive() for s in streams), "the streams ended before the check: make them longer"

    for stream in streams:
        body = stream.result(timeout=15)
        assert stream.error is None, stream.error
        assert stream.status == 200
        assert body.endswith(b"data: [DONE]\n\n")
        assert body.count(b"\n\n") == tokens + 3  # role, tokens, finish, [DONE]
    slow_thread.join(15)
    assert slow["response"].status_code == 200
    assert gateway.popen.wait(timeout=10) == 0
    assert time.monotonic() - signalled_at < 10  # within the grace period
    assert mock_stats(mock)["streams_completed"] == 3
    assert "grace period over" not in gateway.log()


def test_sigterm_cuts_requests_still_running_after_the_grace_period(procs: Processes) -> None:
    mock = procs.mock(name="m")
    grace = 1.0
    gateway = procs.gateway(
        backends=[f"127.0.0.1:{mock.port}"], config={**NO_CACHE, "server": {"shutdown_grace_seconds": grace}}
    )
    stream = Stream(gateway, {"x-mock-tokens": "200", "x-mock-token-rate": "10"})  # 20 s
    wait_for(lambda: stream.events >= 2, what="the stream to start")
    gateway.signal(signal.SIGTERM)
    signalled_at = time.monotonic()
    assert gateway.popen.wait(timeout=grace + 5) == 0
    exited = time.monotonic() - signalled_at
    assert grace <= exited < grace + 3.0, exited
    body = stream.result(timeout=5)
    assert b"[DONE]" not in body
    assert "grace period over: cancelling 1 request(s)" in gateway.log()
    wait_for(
        lambda: mock_stats(mock)["streams_cancelled"] == 1, timeout=2.0, what="the backend stream dropped"
    )


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_stop_signal_with_idle_keepalive_connections_exits_0_at_once(procs: Processes, sig: int) -> None:
    mock = procs.mock(name="m")
    gateway = procs.gateway(backends=[f"127.0.0.1:{mock.port}"], config=NO_CACHE)
    with httpx.Client(timeout=5.0) as client:  # keeps its connection open and idle
        assert client.post(gateway.url + CHAT, json=chat_body()).status_code == 200
        gateway.signal(sig)
        signalled_at = time.monotonic()
        assert gateway.popen.wait(timeout=5) == 0
        assert time.monotonic() - signalled_at < 2.0
        with pytest.raises(httpx.TransportError):
            client.post(gateway.url + CHAT, json=chat_body())
