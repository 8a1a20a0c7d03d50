"""End-to-end tests of smooth weighted round-robin (nginx's algorithm) through a real gateway.

Each backend is a pytest-httpserver answering with its own name, so the client
sees which backend served each request; the cache is off so every request
reaches a backend.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from itertools import groupby
from typing import Any

import httpx
import pytest
from pytest_httpserver import HTTPServer

from tests.conftest import Processes, chat_body, free_port, wait_for

CHAT = "/v1/chat/completions"


@pytest.fixture
def named_backends() -> Iterator[Callable[[str], HTTPServer]]:
    """Factory of started pytest-httpservers answering chats with `{"backend": name}`."""
    servers: list[HTTPServer] = []

    def make(name: str) -> HTTPServer:
        server = HTTPServer(host="127.0.0.1", port=0)
        server.expect_request("/health").respond_with_json({"status": "ok"})
        server.expect_request(CHAT, method="POST").respond_with_json({"backend": name})
        server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.clear()
        if server.is_running():
            server.stop()


def chat_requests(server: HTTPServer) -> int:
    return sum(1 for request, _ in server.log if request.path == CHAT)


def start(procs: Processes, servers: dict[str, HTTPServer], weights: dict[str, int]) -> Any:
    backends = [
        {"host": "127.0.0.1", "port": servers[name].port, "weight": weights[name]} for name in servers
    ]
    return procs.gateway(config={"backends": backends, "cache": {"enabled": False}})


def served_by(gateway: Any, count: int) -> list[str]:
    names = []
    with httpx.Client(base_url=gateway.url, timeout=10.0) as client:
        for index in range(count):
            response = client.post(CHAT, json=chat_body(f"request {index}"))
            assert response.status_code == 200, response.text
            names.append(response.json()["backend"])
    return names


def backend_metrics(gateway: Any) -> dict[int, dict[str, Any]]:
    document = httpx.get(gateway.url + "/metrics", timeout=5.0).json()
    return {entry["port"]: entry for entry in document["backends"]}


def test_weights_1_and_2_split_10_20_interleaved(
    procs: Processes, named_backends: Callable[[str], HTTPServer]
) -> None:
    servers = {"a": named_backends("a"), "b": named_backends("b")}
    gateway = start(procs, servers, {"a": 1, "b": 2})

    sequence = served_by(gateway, 30)

    assert Counter(sequence) == {"a": 10, "b": 20}
    longest_run = max(len(list(run)) for _, run in groupby(sequence))
    assert longest_run <= 2, sequence
    assert sequence == ["b", "a", "b"] * 10  # nginx's smooth WRR order for weights 1:2
    assert (chat_requests(servers["a"]), chat_requests(servers["b"])) == (10, 20)
    per_port = backend_metrics(gateway)
    assert per_port[servers["a"].port]["requests"] == 10
    assert per_port[servers["b"].port]["requests"] == 20
    assert per_port[servers["a"].port]["errors"] == per_port[servers["b"].port]["errors"] == 0
    document = httpx.get(gateway.url + "/metrics", timeout=5.0).json()
    assert (document["requests_total"], document["requests_success"]) == (30, 30)


def test_weights_5_1_1_follow_nginx_order(
    procs: Processes, named_backends: Callable[[str], HTTPServer]
) -> None:
    """nginx documents {a:5, b:1, c:1} as the sequence a a b a c a a (ngx_http_upstream_round_robin.c)."""
    servers = {name: named_backends(name) for name in "abc"}
    gateway = start(procs, servers, {"a": 5, "b": 1, "c": 1})

    sequence = served_by(gateway, 21)

    assert sequence == list("aabacaa") * 3
    per_port = backend_metrics(gateway)
    assert [per_port[servers[name].port]["requests"] for name in "abc"] == [15, 3, 3]


def test_unhealthy_backend_leaves_rotation_and_returns(
    procs: Processes, named_backends: Callable[[str], HTTPServer]
) -> None:
    servers = {"a": named_backends("a"), "b": named_backends("b")}
    gateway = start(procs, servers, {"a": 1, "b": 1})
    port_a = servers["a"].port
    servers["a"].stop()  # nothing listens on a's port now: health checks fail

    wait_for(lambda: not backend_metrics(gateway)[port_a]["healthy"], what="backend a marked unhealthy")
    assert served_by(gateway, 6) == ["b"] * 6

    servers["a"].clear()
    servers["a"] = restarted = HTTPServer(host="127.0.0.1", port=port_a)
    restarted.expect_request("/health").respond_with_json({"status": "ok"})
    restarted.expect_request(CHAT, method="POST").respond_with_json({"backend": "a"})
    restarted.start()
    try:
        wait_for(lambda: backend_metrics(gateway)[port_a]["healthy"], what="backend a healthy again")
        assert Counter(served_by(gateway, 6)) == {"a": 3, "b": 3}
    finally:
        restarted.clear()
        restarted.stop()


def test_dead_backend_is_skipped_by_retry_without_client_error(
    procs: Processes, named_backends: Callable[[str], HTTPServer]
) -> None:
    """A backend refusing connections costs no client error: the request is retried on the live one."""
    live = named_backends("live")
    dead_port = free_port()
    backends = [
        {"host": "127.0.0.1", "port": dead_port, "weight": 1},
        {"host": "127.0.0.1", "port": live.port, "weight": 1},
    ]
    gateway = procs.gateway(
        config={"backends": backends, "cache": {"enabled": False}, "health_check": {"interval_seconds": 60}}
    )

    assert served_by(gateway, 4) == ["live"] * 4
    assert chat_requests(live) == 4
    document = httpx.get(gateway.url + "/metrics", timeout=5.0).json()
    assert (document["requests_success"], document["requests_error"]) == (4, 0)
    assert document["retries"] >= 1
    assert backend_metrics(gateway)[dead_port]["errors"] >= 1
