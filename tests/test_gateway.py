"""End-to-end tests of the gateway's own routes and of non-streaming forwarding (issue 2).

Each test starts a real `ntonix run` subprocess on a free port in front of a
pytest-httpserver backend (fixed, byte-exact answers, and a log of what the
backend received) or a bare TCP backend that misbehaves on purpose (closes,
sends garbage, truncates, hangs).
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request

import ntonix
from tests.conftest import Processes, backend_addr, chat_body, free_port, wait_for

CHAT = "/v1/chat/completions"
METRICS_KEYS = {
    "requests_total",
    "requests_active",
    "requests_success",
    "requests_error",
    "cache_hits",
    "cache_misses",
    "cache_hit_rate",
    "uptime_seconds",
    "connections_active",
    "connections_total",
    "memory_cache_bytes",
    "backends",
}
BACKEND_KEYS = {"host", "port", "requests", "errors", "latency_avg_ms", "error_rate"}
CACHE_STATS_KEYS = {
    "enabled",
    "hits",
    "misses",
    "hit_rate",
    "evictions",
    "expired",
    "entries",
    "size_bytes",
    "max_size_bytes",
}
# A backend answer with unusual but valid bytes: odd spacing, key order, unicode, no trailing newline.
FIXED_ANSWER = (
    b'{"id":"chatcmpl-fixed",  "object":"chat.completion","created":1700000000,"model":"m",'
    b'"choices":[{"index":0,"message":{"role":"assistant","content":"caf\xc3\xa9 \\u00e9 \xe2\x9c\x93"},'
    b'"finish_reason":"stop"}],\n "usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}'
)


# -- helpers ---------------------------------------------------------------------------------


_DEFAULT: Any = object()


def post_chat(
    url: str,
    body: Any = _DEFAULT,
    *,
    content: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> httpx.Response:
    if content is None:
        content = json.dumps(chat_body() if body is _DEFAULT else body).encode()
    all_headers = {"content-type": "application/json", **(headers or {})}
    return httpx.post(url + CHAT, content=content, headers=all_headers, timeout=timeout)


def assert_openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    document = response.json()
    assert set(document) == {"error"}, document
    error = document["error"]
    assert {"message", "type", "code"} <= set(error), error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    assert isinstance(error["code"], str) and error["code"]
    return error


def metrics(gateway: Any) -> dict[str, Any]:
    response = httpx.get(gateway.url + "/metrics", timeout=5.0)
    assert response.status_code == 200
    return dict(response.json())


def chat_log(server: HTTPServer) -> list[Request]:
    """Requests the backend received on the chat route (health checks left out)."""
    return [request for request, _ in server.log if request.path == CHAT]


@pytest.fixture
def backend(httpserver: HTTPServer) -> HTTPServer:
    """A pytest-httpserver backend whose health check always passes."""
    httpserver.expect_request("/health").respond_with_json({"status": "ok"})
    return httpserver


@pytest.fixture
def gateway(procs: Processes, backend: HTTPServer) -> Any:
    """A gateway with the cache off in front of `backend`."""
    return procs.gateway(backends=[backend_addr(backend)], config={"cache": {"enabled": False}})


class RawBackend:
    """A bare TCP backend: answers `GET /health` with 200, hands each other request to `behaviour`.

    `behaviour(conn)` runs on the connection's own thread after the whole request was read.
    """

    def __init__(self, behaviour: Callable[[socket.socket], None]) -> None:
        self.behaviour = behaviour
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.requests: list[bytes] = []
        self.release = threading.Event()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buffer = b""
        try:
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(buffer) < length:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buffer += data
                body, buffer = buffer[:length], buffer[length:]
                if head.startswith(b"GET /health"):
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                        b'content-length: 15\r\n\r\n{"status":"ok"}'
                    )
                    continue
                if head.startswith(b"GET "):  # model discovery: this backend has no model list
                    conn.sendall(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                    continue
                with self._lock:
                    self.requests.append(head + b"\r\n\r\n" + body)
                self.behaviour(conn)
                return
        except OSError:
            return
        finally:
            conn.close()

    def close(self) -> None:
        self.release.set()
        self.listener.close()
        with self._lock:
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.close()


@pytest.fixture
def raw_backends() -> Iterator[Callable[[Callable[[socket.socket], None]], RawBackend]]:
    made: list[RawBackend] = []

    def make(behaviour: Callable[[socket.socket], None]) -> RawBackend:
        raw = RawBackend(behaviour)
        made.append(raw)
        return raw

    yield make
    for raw in made:
        raw.close()


# -- the gateway's own routes ----------------------------------------------------------------


def test_index_has_exactly_the_spec_shape(gateway: Any) -> None:
    response = httpx.get(gateway.url + "/", timeout=5.0)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    document = response.json()
    assert set(document) == {"name", "version", "description", "endpoints"}
    assert document["name"] == "NTONIX"
    assert document["version"] == ntonix.__version__
    assert isinstance(document["description"], str) and document["description"]
    assert document["endpoints"] == {
        "health": "/health",
        "ready": "/ready",
        "metrics": "/metrics",
        "cache_stats": "/cache/stats",
        "chat_completions": "/v1/chat/completions",
        "completions": "/v1/completions",
        "embeddings": "/v1/embeddings",
        "responses": "/v1/responses",
        "models": "/v1/models",
        "dashboard": "/dashboard",
    }


def test_health_answers_healthy(gateway: Any) -> None:
    response = httpx.get(gateway.url + "/health", timeout=5.0)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert response.json() == {"status": "healthy"}


def test_metrics_has_the_spec_keys(gateway: Any, backend: HTTPServer) -> None:
    document = metrics(gateway)
    assert set(document) >= METRICS_KEYS, METRICS_KEYS - set(document)
    for key in METRICS_KEYS - {"backends", "cache_hit_rate", "uptime_seconds"}:
        assert isinstance(document[key], int), (key, document[key])
    assert isinstance(document["cache_hit_rate"], float)
    assert isinstance(document["uptime_seconds"], float) and document["uptime_seconds"] >= 0
    [entry] = document["backends"]
    assert set(entry) >= BACKEND_KEYS, BACKEND_KEYS - set(entry)
    assert (entry["host"], entry["port"]) == ("127.0.0.1", backend.port)
    assert (entry["requests"], entry["errors"], entry["latency_avg_ms"], entry["error_rate"]) == (
        0,
        0,
        0.0,
        0.0,
    )
    later = wait_for(
        lambda: (m := metrics(gateway))["uptime_seconds"] > document["uptime_seconds"] and m,
        what="uptime_seconds to grow",
    )
    assert later["uptime_seconds"] > document["uptime_seconds"]


def test_metrics_count_success_and_error_per_status(gateway: Any, backend: HTTPServer) -> None:
    ok = chat_body("ok")
    backend.expect_request(CHAT, json=ok).respond_with_data(FIXED_ANSWER, content_type="application/json")
    backend.expect_request(CHAT, json=chat_body("teapot")).respond_with_json({"error": "no"}, status=418)
    backend.expect_request(CHAT, json=chat_body("boom")).respond_with_json({"error": "down"}, status=500)
    before = metrics(gateway)
    assert before["requests_total"] == 0

    statuses = [
        post_chat(gateway.url, ok).status_code,  # backend 200 -> success
        post_chat(gateway.url, ok).status_code,  # backend 200 -> success
        post_chat(gateway.url, chat_body("teapot")).status_code,  # backend 418 -> error
        post_chat(gateway.url, chat_body("boom")).status_code,  # backend 500 -> error
        post_chat(gateway.url, content=b"{not json").status_code,  # gateway 400 -> error
    ]
    assert statuses == [200, 200, 418, 500, 400]

    after = metrics(gateway)
    assert after["requests_total"] == 5
    assert after["requests_success"] == 2
    assert after["requests_error"] == 3
    assert after["requests_active"] == 0
    assert after["connections_total"] >= 1
    [entry] = after["backends"]
    assert entry["requests"] == 4  # the 400 never reached the backend
    assert entry["errors"] == 1  # the backend's 500; a 418 is the client's fault, not the backend's
    assert entry["error_rate"] == pytest.approx(1 / 4)
    assert entry["latency_avg_ms"] > 0
    assert after["cache_hits"] == after["cache_misses"] == 0  # cache disabled


def test_cache_hit_counts_as_request_but_not_backend_request(procs: Processes, backend: HTTPServer) -> None:
    backend.expect_request(CHAT).respond_with_data(FIXED_ANSWER, content_type="application/json")
    gateway = procs.gateway(backends=[backend_addr(backend)])
    first = post_chat(gateway.url, chat_body("same"))
    second = post_chat(
        gateway.url,
        content=b'{"stream": false, "messages": [{"content": "same", "role": "user"}],'
        b'   "model": "mock-model"}',
    )
    assert (first.status_code, second.status_code) == (200, 200)
    assert first.headers["x-cache"] == "MISS"
    assert second.headers["x-cache"] == "HIT"
    assert first.content == second.content == FIXED_ANSWER
    assert len(chat_log(backend)) == 1

    after = metrics(gateway)
    assert (after["requests_total"], after["requests_success"], after["requests_error"]) == (2, 2, 0)
    assert (after["cache_hits"], after["cache_misses"]) == (1, 1)
    assert after["cache_hit_rate"] == pytest.approx(0.5)
    assert after["memory_cache_bytes"] >= len(FIXED_ANSWER)
    assert after["backends"][0]["requests"] == 1

    stats = httpx.get(gateway.url + "/cache/stats", timeout=5.0).json()
    assert (stats["hits"], stats["misses"], stats["entries"]) == (1, 1, 1)
    assert stats["hit_rate"] == pytest.approx(0.5)
    assert len(FIXED_ANSWER) <= stats["size_bytes"] <= stats["max_size_bytes"]


def test_cache_stats_has_exactly_the_spec_keys(procs: Processes, backend: HTTPServer) -> None:
    gateway = procs.gateway(backends=[backend_addr(backend)], config={"cache": {"max_size_mb": 3}})
    response = httpx.get(gateway.url + "/cache/stats", timeout=5.0)
    assert response.status_code == 200
    stats = response.json()
    assert set(stats) == CACHE_STATS_KEYS
    assert stats["enabled"] is True
    assert stats["max_size_bytes"] == 3 * 1024 * 1024
    assert (stats["hits"], stats["misses"], stats["entries"], stats["size_bytes"]) == (0, 0, 0, 0)
    assert stats["hit_rate"] == 0.0


def test_cache_stats_when_cache_disabled(gateway: Any) -> None:
    stats = httpx.get(gateway.url + "/cache/stats", timeout=5.0).json()
    assert set(stats) == CACHE_STATS_KEYS
    assert stats["enabled"] is False


# -- forwarding ------------------------------------------------------------------------------


def test_answer_is_forwarded_byte_identical(gateway: Any, backend: HTTPServer) -> None:
    backend.expect_request(CHAT, method="POST").respond_with_data(
        FIXED_ANSWER, content_type="application/json", headers={"x-backend-extra": "kept"}
    )
    response = post_chat(gateway.url)
    assert response.status_code == 200
    assert response.content == FIXED_ANSWER
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-backend-extra"] == "kept"
    assert len(chat_log(backend)) == 1


def test_request_bytes_reach_the_backend_untouched(gateway: Any, backend: HTTPServer) -> None:
    backend.expect_request(CHAT).respond_with_data(FIXED_ANSWER, content_type="application/json")
    original = (
        b'{ "temperature" : 0.7,\n\t"messages":[{"role":"user","content":"caf\xc3\xa9 \\u00e9 \\"q\\""}],'
        b'"model":"mock-model" ,"stream":false, "x_custom": [1, 2.50, null]}  '
    )
    response = post_chat(gateway.url, content=original, headers={"x-client-header": "passed"})
    assert response.status_code == 200
    [received] = chat_log(backend)
    assert received.get_data() == original
    assert received.method == "POST"
    assert received.headers["content-type"] == "application/json"
    assert received.headers["x-client-header"] == "passed"
    assert int(received.headers["content-length"]) == len(original)


def test_client_request_id_is_echoed_and_forwarded(gateway: Any, backend: HTTPServer) -> None:
    backend.expect_request(CHAT).respond_with_data(FIXED_ANSWER, content_type="application/json")
    response = post_chat(gateway.url, headers={"X-Request-ID": "client-chosen-id-42"})
    assert response.status_code == 200
    assert response.headers.get_list("x-request-id") == ["client-chosen-id-42"]
    [received] = chat_log(backend)
    assert received.headers.getlist("X-Request-ID") == ["client-chosen-id-42"]


def test_request_id_is_generated_unique_and_forwarded(gateway: Any, backend: HTTPServer) -> None:
    backend.expect_request(CHAT).respond_with_data(FIXED_ANSWER, content_type="application/json")
    ids = []
    for _ in range(20):
        response = post_chat(gateway.url)
        assert response.status_code == 200
        assert len(response.headers.get_list("x-request-id")) == 1
        ids.append(response.headers["x-request-id"])
    assert all(ids)
    assert len(set(ids)) == len(ids)
    assert [request.headers.getlist("X-Request-ID") for request in chat_log(backend)] == [[i] for i in ids]


def test_request_id_is_on_gateway_errors(gateway: Any) -> None:
    response = post_chat(gateway.url, content=b"{", headers={"X-Request-ID": "bad-one"})
    assert_openai_error(response, 400)
    assert response.headers["x-request-id"] == "bad-one"
    generated = post_chat(gateway.url, content=b"{")
    assert generated.headers.get("x-request-id")


# -- errors the gateway makes ----------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"", b'{"model": "m", "messages": [', b"\xff\xfe", b'{"a":1} trailing'],
    ids=["garbage", "empty", "truncated", "not-utf8", "trailing-data"],
)
def test_malformed_json_is_400(gateway: Any, backend: HTTPServer, content: bytes) -> None:
    error = assert_openai_error(post_chat(gateway.url, content=content), 400)
    assert error["type"] == "invalid_request_error"
    assert chat_log(backend) == []


@pytest.mark.parametrize(
    "body",
    [
        {"model": "mock-model"},
        {"model": "mock-model", "messages": "hello"},
        {"model": "mock-model", "messages": {"role": "user", "content": "hi"}},
        {"model": "mock-model", "messages": []},
        {"model": "mock-model", "messages": ["hello"]},
        {"model": "mock-model", "messages": [{"content": "no role"}]},
        {"model": 7, "messages": [{"role": "user", "content": "hi"}]},
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"},
        [{"role": "user", "content": "hi"}],
        "a string",
        42,
        None,
    ],
    ids=[
        "no-messages",
        "messages-string",
        "messages-object",
        "messages-empty",
        "message-not-object",
        "message-without-role",
        "model-not-string",
        "stream-not-bool",
        "array",
        "string",
        "number",
        "null",
    ],
)
def test_json_that_is_not_a_chat_request_is_400(gateway: Any, backend: HTTPServer, body: Any) -> None:
    error = assert_openai_error(post_chat(gateway.url, body), 400)
    assert error["type"] == "invalid_request_error"
    assert chat_log(backend) == []


def test_body_over_the_limit_is_413(procs: Processes, backend: HTTPServer) -> None:
    backend.expect_request(CHAT).respond_with_data(FIXED_ANSWER, content_type="application/json")
    gateway = procs.gateway(
        backends=[backend_addr(backend)],
        config={"proxy": {"max_body_size_mb": 0.001}, "cache": {"enabled": False}},
    )
    limit = int(0.001 * 1024 * 1024)
    small = json.dumps(chat_body("x" * 100)).encode()
    assert len(small) < limit
    assert post_chat(gateway.url, content=small).status_code == 200

    big = json.dumps(chat_body("x" * (limit + 10))).encode()
    error = assert_openai_error(post_chat(gateway.url, content=big), 413)
    assert error["type"] == "invalid_request_error"

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit must hold while reading
        for start in range(0, len(big), 256):
            yield big[start : start + 256]

    response = httpx.post(
        gateway.url + CHAT, content=chunked(), headers={"content-type": "application/json"}, timeout=10.0
    )
    assert "content-length" not in response.request.headers
    assert_openai_error(response, 413)
    assert len(chat_log(backend)) == 1  # only the small one
    assert metrics(gateway)["requests_error"] == 2


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "", None])
def test_wrong_content_type_is_415(gateway: Any, backend: HTTPServer, content_type: str | None) -> None:
    headers = {} if content_type is None else {"content-type": content_type}
    response = httpx.post(
        gateway.url + CHAT, content=json.dumps(chat_body()).encode(), headers=headers, timeout=10.0
    )
    if content_type is None:
        assert "content-type" not in response.request.headers
    error = assert_openai_error(response, 415)
    assert error["type"] == "invalid_request_error"
    assert chat_log(backend) == []


def test_json_content_type_with_parameters_is_accepted(gateway: Any, backend: HTTPServer) -> None:
    backend.expect_request(CHAT).respond_with_data(FIXED_ANSWER, content_type="application/json")
    response = post_chat(gateway.url, headers={"content-type": "Application/JSON; charset=utf-8"})
    assert response.status_code == 200
    assert response.content == FIXED_ANSWER


@pytest.mark.parametrize("path", ["/nope", "/v2/chat/completions", "/v1", "/metricsx"])
def test_unknown_path_is_404(gateway: Any, path: str) -> None:
    for method in ("GET", "POST"):
        response = httpx.request(method, gateway.url + path, json=chat_body(), timeout=5.0)
        assert_openai_error(response, 404)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", CHAT),
        ("PUT", CHAT),
        ("DELETE", CHAT),
        ("POST", "/health"),
        ("POST", "/metrics"),
        ("DELETE", "/"),
        ("PUT", "/cache/stats"),
    ],
)
def test_wrong_method_is_405(gateway: Any, backend: HTTPServer, method: str, path: str) -> None:
    response = httpx.request(method, gateway.url + path, json=chat_body(), timeout=5.0)
    assert_openai_error(response, 405)
    assert chat_log(backend) == []


def _close_without_answer(conn: socket.socket) -> None:
    conn.shutdown(socket.SHUT_RDWR)


def _send_garbage(conn: socket.socket) -> None:
    conn.sendall(b"this is not HTTP at all\r\n\r\n")


def _truncate_body(conn: socket.socket) -> None:
    conn.sendall(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 500\r\n\r\n"
        b'{"id":"chatcmpl-cut","choices":['
    )


@pytest.mark.parametrize(
    "behaviour", [_close_without_answer, _send_garbage, _truncate_body], ids=["close", "garbage", "truncated"]
)
def test_broken_backend_is_502(procs: Processes, raw_backends: Any, behaviour: Any) -> None:
    """proxy.py: a backend that breaks the exchange is retried elsewhere; with no other backend, 502."""
    raw = raw_backends(behaviour)
    gateway = procs.gateway(backends=[raw.addr], config={"cache": {"enabled": False}})
    started = time.monotonic()
    error = assert_openai_error(post_chat(gateway.url, headers={"X-Request-ID": "broken-1"}), 502)
    assert time.monotonic() - started < 5
    assert error["type"] == "upstream_error"
    assert len(raw.requests) == 1  # never the same backend twice
    assert b"x-request-id: broken-1" in raw.requests[0].lower()
    entry = metrics(gateway)["backends"][0]
    assert (entry["requests"], entry["errors"]) == (1, 1)


def test_broken_backend_is_retried_on_a_healthy_one(
    procs: Processes, raw_backends: Any, backend: HTTPServer
) -> None:
    backend.expect_request(CHAT).respond_with_data(FIXED_ANSWER, content_type="application/json")
    raw = raw_backends(_close_without_answer)
    # weight 2 on the broken one: smooth WRR picks it first
    gateway = procs.gateway(
        config={
            "cache": {"enabled": False},
            "backends": [
                {"host": "127.0.0.1", "port": raw.port, "weight": 2},
                {"host": "127.0.0.1", "port": backend.port, "weight": 1},
            ],
        },
    )
    response = post_chat(gateway.url)
    assert response.status_code == 200
    assert response.content == FIXED_ANSWER
    assert len(raw.requests) == 1
    assert len(chat_log(backend)) == 1


def test_no_reachable_backend_is_503(procs: Processes) -> None:
    dead = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    gateway = procs.gateway(backends=dead, config={"cache": {"enabled": False}})
    started = time.monotonic()
    error = assert_openai_error(post_chat(gateway.url), 503)
    assert time.monotonic() - started < 5
    assert error["type"] == "service_unavailable"
    document = metrics(gateway)
    assert (document["requests_total"], document["requests_error"]) == (1, 1)
    # the once-healthy backends end up marked unhealthy by the active checks, still 503
    wait_for(lambda: not any(b["healthy"] for b in metrics(gateway)["backends"]), what="backends unhealthy")
    assert_openai_error(post_chat(gateway.url), 503)


def test_hanging_backend_is_504(procs: Processes, raw_backends: Any) -> None:
    raw = raw_backends(lambda conn: raw.release.wait(30))
    gateway = procs.gateway(
        backends=[raw.addr], config={"cache": {"enabled": False}, "proxy": {"ttfb_timeout_seconds": 0.5}}
    )
    started = time.monotonic()
    error = assert_openai_error(post_chat(gateway.url), 504)
    elapsed = time.monotonic() - started
    assert 0.45 <= elapsed < 3.0, elapsed
    assert error["type"] == "timeout_error"
    assert len(raw.requests) == 1  # a timeout is not retried
    entry = metrics(gateway)["backends"][0]
    assert (entry["requests"], entry["errors"]) == (1, 1)


@pytest.mark.parametrize(
    ("status", "body", "content_type"),
    [
        (
            400,
            b'{"error":{"message":"bad param","type":"invalid_request_error","code":"x"}}',
            "application/json",
        ),
        (401, b'{"error":"unauthorized"}', "application/json"),
        (404, b'{"detail":"model not found"}', "application/json"),
        (422, b'{"detail":[{"loc":["body","messages"],"msg":"field required"}]}', "application/json"),
        (429, b'{"error":{"message":"slow down"}}', "application/json"),
        (500, b"Internal Server Error: CUDA out of memory", "text/plain"),
        (503, b'{"error":"model loading"}', "application/json"),
    ],
)
def test_backend_error_status_passes_through(
    gateway: Any, backend: HTTPServer, status: int, body: bytes, content_type: str
) -> None:
    backend.expect_request(CHAT).respond_with_data(
        body, status=status, content_type=content_type, headers={"retry-after": "7"}
    )
    response = post_chat(gateway.url)
    assert response.status_code == status
    assert response.content == body
    assert response.headers["content-type"] == content_type
    assert response.headers["retry-after"] == "7"
    assert response.headers.get("x-request-id")
    assert len(chat_log(backend)) == 1  # an answer from the backend is never retried
    document = metrics(gateway)
    assert (document["requests_success"], document["requests_error"]) == (0, 1)
