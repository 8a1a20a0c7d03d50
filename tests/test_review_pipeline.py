"""Review: the pipeline's rare failure paths release what they took (a unit harness, fake upstream)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from ntonix.balance import make_policy
from ntonix.config import BackendConfig, Settings
from ntonix.observe.metrics import Metrics
from ntonix.pipeline.proxy import Proxy
from ntonix.routes.spec import CHAT
from ntonix.upstream.backend import Backend
from ntonix.upstream.registry import ModelRegistry

SSE = [("content-type", "text/event-stream")]


class Headers(dict[str, str]):
    pass


class Scope:
    method = "POST"
    path = CHAT.path
    query_string = ""

    def __init__(self, headers: dict[str, str]) -> None:
        self.headers = Headers(headers)


class Response:
    def __init__(self, chunks: list[bytes]) -> None:
        self.status = 200
        self.headers = SSE
        self.body: bytes | None = None
        self.chunks = list(chunks)
        self.closed = False

    async def next_chunk(self) -> bytes | None:
        return self.chunks.pop(0) if self.chunks else None

    def close(self) -> None:
        self.closed = True


class Forwarder:
    def __init__(self, response: Response) -> None:
        self.response = response

    def request(self, method: str, url: str, headers: Any, body: bytes, buffer: bool) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        future.set_result(self.response)
        return future


class Transport:
    def __init__(self, fail_after: int) -> None:
        self.sent: list[bytes] = []
        self.fail_after = fail_after

    async def send_bytes(self, data: bytes) -> None:
        if len(self.sent) >= self.fail_after:
            raise RuntimeError("client gone")
        self.sent.append(data)


class Proto:
    def __init__(self, body: bytes, transport: Transport | None) -> None:
        self.body = body
        self.transport = transport
        self.answers: list[tuple[int, bytes]] = []

    async def __call__(self) -> bytes:
        return self.body

    def response_bytes(self, status: int, headers: Any, body: bytes) -> None:
        self.answers.append((status, body))

    def response_stream(self, status: int, headers: Any) -> Transport:
        if self.transport is None:
            raise RuntimeError("connection closed before the answer started")
        return self.transport

    async def client_disconnect(self) -> None:
        await asyncio.Event().wait()


def _run(response: Response, proto: Proto, headers: dict[str, str] | None = None) -> tuple[Backend, Proxy]:
    settings = Settings()
    backend = Backend(BackendConfig(host="127.0.0.1", port=9), settings.circuit_breaker)
    registry = ModelRegistry([backend], {}, lambda: make_policy(settings.routing))
    metrics = Metrics()
    proxy = Proxy(settings, Forwarder(response), None, metrics, lambda: registry)  # type: ignore[arg-type]
    body = proto.body
    all_headers = {"content-type": "application/json", "content-length": str(len(body)), **(headers or {})}

    async def go() -> None:
        await proxy.handle(CHAT, Scope(all_headers), proto)
        proxy.slow.close()

    asyncio.run(go())
    return backend, proxy


def _stream_body() -> bytes:
    return json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    ).encode()


def test_a_stream_whose_answer_cannot_start_releases_its_backend() -> None:
    response = Response([b"data: {}\n\n", b"data: [DONE]\n\n"])
    proto = Proto(_stream_body(), None)
    backend, proxy = _run(response, proto)
    assert backend.in_flight == 0
    assert proxy.metrics.streams_active == 0
    assert response.closed  # the upstream generation does not run on for nobody


def test_a_client_gone_when_the_held_back_tail_is_sent_is_a_disconnect_not_a_gateway_error() -> None:
    from ntonix.auth.guard import Guard
    from ntonix.auth.keys import build_table
    from ntonix.config import ApiKeyConfig, AuthConfig
    from ntonix.limits.limiter import Limiter

    # a key with a tpm: the usage tap holds back an event cut in half until the stream ends
    response = Response([b"data: {}\n\n", b'data: {"choices": [], "usa'])
    transport = Transport(fail_after=1)
    proto = Proto(_stream_body(), transport)
    table = build_table(AuthConfig(keys=(ApiKeyConfig(key="k1", name="one", tpm=100000),)))
    settings = Settings()
    backend = Backend(BackendConfig(host="127.0.0.1", port=9), settings.circuit_breaker)
    registry = ModelRegistry([backend], {}, lambda: make_policy(settings.routing))
    proxy = Proxy(settings, Forwarder(response), None, Metrics(), lambda: registry)  # type: ignore[arg-type]
    proxy.guard = Guard(table, Limiter(), False)
    body = proto.body
    headers = {
        "content-type": "application/json",
        "content-length": str(len(body)),
        "authorization": "Bearer k1",
    }

    async def go() -> None:
        await proxy.handle(CHAT, Scope(headers), proto)
        proxy.slow.close()

    asyncio.run(go())
    assert backend.in_flight == 0
    assert proto.answers == []  # no error answer written over a stream already started
    assert proxy.metrics.client_disconnects == 1


def test_the_backends_own_x_cache_does_not_duplicate_the_gateways() -> None:
    from ntonix._core import ResponseCache

    class Whole(Response):
        def __init__(self) -> None:
            super().__init__([])
            self.headers = [("content-type", "application/json"), ("x-cache", "HIT from varnish")]
            self.body = b'{"choices": []}'

    class Recording(Proto):
        def response_bytes(self, status: int, headers: Any, body: bytes) -> None:
            self.headers = list(headers)
            super().response_bytes(status, headers, body)

    settings = Settings()
    backend = Backend(BackendConfig(host="127.0.0.1", port=9), settings.circuit_breaker)
    registry = ModelRegistry([backend], {}, lambda: make_policy(settings.routing))
    cache = ResponseCache(1 << 20, 60.0)
    proxy = Proxy(settings, Forwarder(Whole()), cache, Metrics(), lambda: registry)  # type: ignore[arg-type]
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
    proto = Recording(body, None)
    headers = {"content-type": "application/json", "content-length": str(len(body))}

    async def go() -> None:
        await proxy.handle(CHAT, Scope(headers), proto)
        proxy.slow.close()

    asyncio.run(go())
    assert [v for n, v in proto.headers if n == "x-cache"] == ["MISS"]
