"""The response cache through a real gateway: HIT/MISS, key canonicalisation, Cache-Control,
what is never stored, single-flight coalescing, exact replay, streaming replay and live stats."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from tests.conftest import Processes, backend_addr, chat_body

ANSWER = (
    b'{"id":"c1","object":"chat.completion",'
    b'"choices":[{"index":0,"message":{"role":"assistant","content":"hi"}}]}'
)


class CountingBackend:
    """A backend answering fixed bytes, counting chat calls, optionally slow or failing."""

    def __init__(self, server: HTTPServer, delay: float = 0.0, status: int = 200) -> None:
        self.calls = 0
        self.delay = delay
        self.status = status
        self.lock = threading.Lock()
        server.expect_request("/v1/chat/completions").respond_with_handler(self.handle)
        server.expect_request("/health").respond_with_json({"status": "ok"})

    def handle(self, request: Request) -> Response:
        with self.lock:
            self.calls += 1
            call = self.calls
        if self.delay:
            time.sleep(self.delay)
        body = ANSWER if self.status < 400 else json.dumps({"error": {"message": f"fail {call}"}}).encode()
        return Response(body, status=self.status, content_type="application/json")


@pytest.fixture
def backend_server() -> Any:
    server = HTTPServer(host="127.0.0.1", port=0, threaded=True)
    server.start()
    yield server
    server.clear()
    if server.is_running():
        server.stop()


def post(
    url: str, payload: Any, headers: dict[str, str] | None = None, raw: bytes | None = None
) -> httpx.Response:
    content = raw if raw is not None else json.dumps(payload).encode()
    return httpx.post(
        url + "/v1/chat/completions",
        content=content,
        headers={"content-type": "application/json", **(headers or {})},
        timeout=30,
    )


def stats(url: str) -> dict[str, Any]:
    return httpx.get(url + "/cache/stats").json()


def test_miss_then_hit_replays_exact_bytes_and_stats_move(
    procs: Processes, backend_server: HTTPServer
) -> None:
    backend = CountingBackend(backend_server)
    gw = procs.gateway([backend_addr(backend_server)])
    first = post(gw.url, chat_body("cache me"))
    second = post(gw.url, chat_body("cache me"))
    assert first.status_code == second.status_code == 200
    assert first.headers["x-cache"] == "MISS"
    assert second.headers["x-cache"] == "HIT"
    assert first.content == second.content == ANSWER
    assert second.headers["content-type"].startswith("application/json")
    assert backend.calls == 1
    s = stats(gw.url)
    assert s["enabled"] is True
    assert (s["hits"], s["misses"], s["entries"]) == (1, 1, 1)
    assert s["size_bytes"] >= len(ANSWER)
    assert s["hit_rate"] == pytest.approx(0.5)
    metrics = httpx.get(gw.url + "/metrics").json()
    assert (metrics["cache_hits"], metrics["cache_misses"]) == (1, 1)
    assert metrics["memory_cache_bytes"] == s["size_bytes"]
    # A hit counts as a request but never as a backend request.
    assert metrics["requests_total"] == 2
    assert metrics["backends"][0]["requests"] == 1


def test_key_ignores_order_and_whitespace_but_not_temperature(
    procs: Processes, backend_server: HTTPServer
) -> None:
    backend = CountingBackend(backend_server)
    gw = procs.gateway([backend_addr(backend_server)])
    compact = b'{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":0.5}'
    spaced = b'{ "temperature": 0.5,\n  "messages": [ {"content": "x", "role": "user"} ],  "model": "m" }'
    assert post(gw.url, None, raw=compact).headers["x-cache"] == "MISS"
    assert post(gw.url, None, raw=spaced).headers["x-cache"] == "HIT"
    hotter = b'{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":0.9}'
    assert post(gw.url, None, raw=hotter).headers["x-cache"] == "MISS"
    other_model = b'{"model":"m2","messages":[{"role":"user","content":"x"}],"temperature":0.5}'
    assert post(gw.url, None, raw=other_model).headers["x-cache"] == "MISS"
    # `user` does not change the answer, so it is left out of the key.
    with_user = b'{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":0.5,"user":"u1"}'
    assert post(gw.url, None, raw=with_user).headers["x-cache"] == "HIT"
    assert backend.calls == 3


def test_no_cache_refreshes_and_no_store_bypasses(procs: Processes, backend_server: HTTPServer) -> None:
    backend = CountingBackend(backend_server)
    gw = procs.gateway([backend_addr(backend_server)])
    assert "x-cache" not in post(gw.url, chat_body("a"), {"cache-control": "no-store"}).headers
    assert stats(gw.url)["entries"] == 0, "no-store must not write"
    assert backend.calls == 1
    assert post(gw.url, chat_body("a")).headers["x-cache"] == "MISS"
    assert post(gw.url, chat_body("a")).headers["x-cache"] == "HIT"
    refreshed = post(gw.url, chat_body("a"), {"cache-control": "no-cache"})
    assert refreshed.headers["x-cache"] == "MISS"
    assert backend.calls == 3, "no-cache must reach the backend"
    stored = post(gw.url, chat_body("a"), {"cache-control": "no-store"})
    assert "x-cache" not in stored.headers, "no-store neither reads nor writes"
    assert backend.calls == 4
    assert post(gw.url, chat_body("a")).headers["x-cache"] == "HIT"


def test_non_2xx_answers_are_never_stored(procs: Processes, backend_server: HTTPServer) -> None:
    CountingBackend(backend_server, status=400)
    gw = procs.gateway([backend_addr(backend_server)])
    for expected_call in (1, 2):
        answer = post(gw.url, chat_body("bad"))
        assert answer.status_code == 400
        assert answer.headers["x-cache"] == "MISS"
        assert answer.json()["error"]["message"] == f"fail {expected_call}"
    assert stats(gw.url)["entries"] == 0


def test_disabled_cache_reports_enabled_false(procs: Processes, backend_server: HTTPServer) -> None:
    backend = CountingBackend(backend_server)
    gw = procs.gateway([backend_addr(backend_server)], config={"cache": {"enabled": False}})
    for _ in range(2):
        answer = post(gw.url, chat_body("x"))
        assert "x-cache" not in answer.headers
    assert backend.calls == 2
    s = stats(gw.url)
    assert s["enabled"] is False and s["entries"] == 0 and s["hits"] == 0


def test_fifty_identical_requests_coalesce_into_one_backend_call(
    procs: Processes, backend_server: HTTPServer
) -> None:
    backend = CountingBackend(backend_server, delay=1.0)
    gw = procs.gateway([backend_addr(backend_server)])
    with ThreadPoolExecutor(max_workers=50) as pool:
        answers = list(pool.map(lambda _: post(gw.url, chat_body("together")), range(50)))
    assert all(a.status_code == 200 for a in answers)
    assert all(a.content == ANSWER for a in answers)
    assert backend.calls == 1
    kinds = sorted(a.headers["x-cache"] for a in answers)
    assert kinds.count("MISS") == 1
    assert set(kinds) <= {"MISS", "COALESCED", "HIT"}
    assert len({a.headers["x-request-id"] for a in answers}) == 50


def test_fault_19_waiters_get_the_leaders_gateway_error(procs: Processes, backend_server: HTTPServer) -> None:
    """Issue 9, fault 19: the leader is slow AND fails, so only sharing can give every waiter its error.

    The backend answers after 3 s and the gateway gives up waiting after 1.5 s (504): the waiters
    arrive while the leader waits, get the leader's 504 when it ends, and the backend sees one
    request. (With an unreachable port, as before, each waiter got its own 503 in milliseconds.)
    """
    backend = CountingBackend(backend_server, delay=3.0)
    gw = procs.gateway(
        [backend_addr(backend_server)],
        config={"health_check": {"interval_seconds": 60}, "proxy": {"ttfb_timeout_seconds": 1.5}},
    )
    with ThreadPoolExecutor(max_workers=10) as pool:
        leader = pool.submit(post, gw.url, chat_body("slow and failing"))
        deadline = time.monotonic() + 20
        while backend.calls == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert backend.calls == 1, "the leader never reached the backend"
        waiters = [pool.submit(post, gw.url, chat_body("slow and failing")) for _ in range(9)]
        answers = [leader.result(timeout=30), *(w.result(timeout=30) for w in waiters)]
    coalesced = httpx.get(gw.url + "/metrics").json()["cache_coalesced"]
    assert {a.status_code for a in answers} == {504}
    assert len({a.json()["error"]["message"] for a in answers}) == 1  # the one error, shared
    assert all(a.json()["error"]["code"] == "upstream_timeout" for a in answers)
    # Waiters that arrived while the leader waited shared its error; on a very slow machine one may
    # arrive after it ended and send its own request, which the backend then counts.
    assert coalesced >= 5, coalesced
    assert backend.calls == 1 + (9 - coalesced)
    assert len({a.headers["x-request-id"] for a in answers}) == 10


def test_streams_are_cached_only_when_enabled_and_replayed_chunk_for_chunk(procs: Processes) -> None:
    mock = procs.mock()
    gw = procs.gateway([f"127.0.0.1:{mock.port}"], config={"cache": {"streaming": True}})
    plain = procs.gateway([f"127.0.0.1:{mock.port}"])

    def stream(url: str) -> tuple[httpx.Headers, list[bytes]]:
        with httpx.stream(
            "POST", url + "/v1/chat/completions", json=chat_body("stream me", stream=True), timeout=30
        ) as response:
            return response.headers, list(response.iter_raw())

    headers1, chunks1 = stream(gw.url)
    headers2, chunks2 = stream(gw.url)
    assert headers1["x-cache"] == "MISS" and headers2["x-cache"] == "HIT"
    assert b"".join(chunks1) == b"".join(chunks2)
    assert b"".join(chunks2).rstrip().endswith(b"data: [DONE]")
    assert headers2["content-type"].startswith("text/event-stream")
    # Without cache.streaming a stream is never looked up or stored: each is a MISS (it is keyed only
    # so that identical live streams coalesce, SPEC §10), and no lookup is counted.
    headers3, _ = stream(plain.url)
    headers4, _ = stream(plain.url)
    assert headers3["x-cache"] == "MISS" and headers4["x-cache"] == "MISS"
    figures = httpx.get(plain.url + "/metrics", timeout=5).json()
    assert figures["cache_hits"] == 0 and figures["cache_misses"] == 0
