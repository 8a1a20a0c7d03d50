"""The chat request pipeline, as named phases.

`request_filter` (content type, size, JSON shape) → `cache_lookup` (hit,
coalesce onto an identical request in flight, or miss) → `select` a backend →
`forward` (retry on another backend while nothing was sent to the client) →
`respond` (whole answer, or SSE chunks as they arrive) → `record` (cache fill,
metrics, access log).

Retry safety, written down: only a failure before anything reached the client
goes to another backend: connect refused, a reset before the status line, or a
non-streamed answer cut short (it is read whole before the client sees a byte).
Never the same backend twice, never once a byte reached the client. A timeout is not
retried (the backend may still be generating; retrying would double the load).
A client that leaves cancels the upstream request at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec

from ntonix import logs
from ntonix.cache.policy import KeyMemo, cache_directives, cache_key, parse_chat
from ntonix.errors import (
    GatewayError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeoutError,
    error_body,
)
from ntonix.pipeline.watch import SlowRequestWatch

if TYPE_CHECKING:
    from ntonix._core import Forwarder, ResponseCache, UpstreamResponse
    from ntonix.balance.base import SelectionPolicy
    from ntonix.config import Settings
    from ntonix.observe.metrics import Metrics
    from ntonix.upstream.backend import Backend

log = logging.getLogger("ntonix.proxy")

CHAT_ROUTE = "/v1/chat/completions"
JSON = "application/json"
_pack = msgspec.msgpack.Encoder().encode
_unpack = msgspec.msgpack.Decoder(list[bytes]).decode


class Answer(msgspec.Struct, frozen=True):
    """A whole answer, shared with requests coalesced onto it."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes


class Exchange:
    """Per-request context carried through the phases (pingora's CTX)."""

    __slots__ = ("backend", "bytes_sent", "cache", "request_id", "started", "status", "ttfb_ms")

    def __init__(self, request_id: str, started: float) -> None:
        self.request_id = request_id
        self.started = started
        self.backend = "-"
        self.cache = "-"
        self.status = 500
        self.bytes_sent = 0
        self.ttfb_ms: float | None = None


class Proxy:
    """Answers `POST /v1/chat/completions` for one gateway process."""

    def __init__(
        self,
        settings: Settings,
        forwarder: Forwarder,
        cache: ResponseCache | None,
        metrics: Metrics,
        policy: Callable[[], SelectionPolicy],
    ) -> None:
        self.forwarder = forwarder
        self.cache = cache
        self.cache_streams = settings.cache.streaming
        self.metrics = metrics
        self.policy = policy
        self.retries = settings.proxy.retries
        self.max_body = int(settings.proxy.max_body_size_mb * 1024 * 1024)
        self.inflight: dict[int, asyncio.Future[Answer]] = {}
        self.slow = SlowRequestWatch()
        self.keys = KeyMemo()
        self._id_prefix = os.urandom(6).hex() + "-"
        self._id_counter = 0

    def new_request_id(self) -> str:
        self._id_counter += 1
        return f"{self._id_prefix}{self._id_counter:x}"

    async def handle(self, scope: Any, proto: Any) -> None:
        """Run the whole pipeline for one request; never raises to Granian."""
        metrics = self.metrics
        metrics.requests_total += 1
        metrics.requests_active += 1
        headers = scope.headers
        ex = Exchange(headers.get("x-request-id") or self.new_request_id(), time.perf_counter())
        try:
            await self._pipeline(scope, proto, headers, ex)
        except GatewayError as err:
            self._error(proto, ex, err)
        except asyncio.CancelledError:
            ex.status = 499
            metrics.client_disconnects += 1
            raise
        except Exception:
            log.exception("request %s failed inside the gateway", ex.request_id)
            self._error(proto, ex, GatewayError(500, "internal_error", "internal gateway error"))
        finally:
            latency_ms = (time.perf_counter() - ex.started) * 1000.0
            metrics.finish(ex.status, latency_ms)
            logs.log_access(
                ex.request_id,
                scope.method,
                scope.path,
                ex.backend,
                ex.status,
                ex.cache,
                ex.bytes_sent,
                latency_ms,
                ex.ttfb_ms,
            )

    def _error(self, proto: Any, ex: Exchange, err: GatewayError) -> None:
        body = err.body()
        ex.status = err.status
        ex.bytes_sent = len(body)
        proto.response_bytes(err.status, [("content-type", JSON), ("x-request-id", ex.request_id)], body)

    # -- phases -----------------------------------------------------------------------------

    async def _pipeline(self, scope: Any, proto: Any, headers: Any, ex: Exchange) -> None:
        body = await self._request_filter(proto, headers)
        cache = self.cache
        no_cache, no_store = cache_directives(headers.get("cache-control"))
        key: int | None = None
        known = self.keys.get(body) if cache is not None and not no_store else None
        if known is not None:
            key, stream = known  # validated when first seen
        else:
            request = parse_chat(body)
            stream = request.get("stream") is True
            if cache is not None and not no_store and (not stream or self.cache_streams):
                key = cache_key(CHAT_ROUTE, request)
                self.keys.put(body, key, stream)
        if key is not None:
            assert cache is not None
            ex.cache = "MISS"
            if not no_cache:
                hit = cache.get(key)
                if hit is not None:
                    await self._serve_hit(proto, hit, stream, ex)
                    return
                if not stream and key in self.inflight and await self._join_leader(proto, key, ex):
                    return
            self.metrics.cache_misses += 1
        if stream:
            await self._forward_stream(scope, proto, headers, body, key, ex)
            return
        leader: asyncio.Future[Answer] | None = None
        if key is not None and not no_cache:
            leader = asyncio.get_running_loop().create_future()
            self.inflight[key] = leader
        try:
            _, response = await self._select_and_send(proto, headers, body, ex, buffer=True)
            answer = Answer(response.status, response.headers, response.body or b"")
        except BaseException as exc:
            if leader is not None:
                self._release_waiters(key, leader, exc)
            raise
        if key is not None and 200 <= answer.status < 300:
            assert cache is not None
            cache.put(key, answer.body, _content_type(answer.headers))
        if leader is not None:
            self.inflight.pop(key, None)  # type: ignore[arg-type]
            leader.set_result(answer)
        self._respond_whole(proto, answer, ex)

    async def _request_filter(self, proto: Any, headers: Any) -> bytes:
        content_type = headers.get("content-type")
        if content_type != JSON and (
            not content_type or content_type.split(";", 1)[0].strip().lower() != JSON
        ):
            raise GatewayError(415, "unsupported_media_type", "Content-Type must be application/json")
        declared = headers.get("content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                raise GatewayError(400, "invalid_request", "invalid Content-Length") from None
            if size > self.max_body:
                raise GatewayError(413, "request_too_large", f"request body exceeds {self.max_body} bytes")
            return bytes(await proto())
        buffer = bytearray()
        async for chunk in proto:
            buffer += chunk
            if len(buffer) > self.max_body:
                raise GatewayError(413, "request_too_large", f"request body exceeds {self.max_body} bytes")
        return bytes(buffer)

    async def _serve_hit(self, proto: Any, hit: tuple[bytes, str], stream: bool, ex: Exchange) -> None:
        self.metrics.cache_hits += 1
        body, content_type = hit
        ex.cache = "HIT"
        ex.status = 200
        headers = [("content-type", content_type), ("x-request-id", ex.request_id), ("x-cache", "HIT")]
        if stream:
            await self._replay_stream(proto, headers, body, ex)
        else:
            ex.bytes_sent = len(body)
            proto.response_bytes(200, headers, body)

    async def _join_leader(self, proto: Any, key: int, ex: Exchange) -> bool:
        """Answer with the identical request already in flight; False when it gave no answer."""
        leader = self.inflight[key]
        self.metrics.coalesced += 1
        try:
            answer = await asyncio.shield(leader)
        except asyncio.CancelledError:
            if not leader.cancelled():
                raise  # this client left
            return False  # the leader's client left: make our own request
        ex.cache = "COALESCED"
        self._respond_whole(proto, answer, ex)
        return True

    def _release_waiters(self, key: int | None, leader: asyncio.Future[Answer], exc: BaseException) -> None:
        """The leader failed: waiters get the same gateway error, or retry if its client left."""
        if key is not None and self.inflight.get(key) is leader:
            del self.inflight[key]
        if isinstance(exc, GatewayError):
            leader.set_exception(exc)
            leader.exception()  # mark retrieved: waiters may be none
        else:
            leader.cancel()

    async def _select_and_send(
        self, proto: Any, headers: Any, body: bytes, ex: Exchange, buffer: bool
    ) -> tuple[Backend, UpstreamResponse]:
        """Pick backends and send until one answers; retries only what is safe to retry."""
        forward_headers = headers.items()
        if "x-request-id" not in headers:
            forward_headers.append(("x-request-id", ex.request_id))
        policy = self.policy()
        tried: list[Backend] = []
        last: UpstreamError | None = None
        for attempt in range(self.retries + 1):
            backend = policy.select(tried)
            if backend is None:
                break
            if attempt:
                self.metrics.retries += 1
            tried.append(backend)
            ex.backend = backend.key
            started = time.perf_counter()
            backend.in_flight += 1
            pending = self.forwarder.request("POST", backend.chat_url, forward_headers, body, buffer)
            self.slow.add(pending, proto, pending.cancel)
            try:
                response = await pending
            except (UpstreamConnectError, UpstreamProtocolError) as err:
                self._backend_failed(backend, started)
                log.warning(
                    "request %s: backend %s failed before answering: %s", ex.request_id, backend.key, err
                )
                # NOTE: the traceback would close a cycle (this frame -> pending -> its future -> err ->
                # traceback -> this frame) that only the cyclic GC frees, and with its raised
                # thresholds an outage piled up tens of MB of dead requests before a collection.
                last = err.with_traceback(None)
                continue
            except UpstreamTimeoutError as err:
                self._backend_failed(backend, started)
                err.with_traceback(None)  # same cycle as above
                raise GatewayError(
                    504, "upstream_timeout", f"backend did not answer in time: {err}"
                ) from None
            except BaseException:
                backend.breaker.on_release()
                raise
            finally:
                self.slow.remove(pending)
                backend.in_flight -= 1
            if response.status >= 500:
                self._backend_failed(backend, started)
            else:
                backend.breaker.on_success()
                backend.record((time.perf_counter() - started) * 1000.0, failed=False)
            return backend, response
        if isinstance(last, UpstreamProtocolError):
            raise GatewayError(502, "bad_gateway", f"backend failed: {last}")
        raise GatewayError(503, "no_healthy_backend", "no healthy backend is available")

    def _backend_failed(self, backend: Backend, started: float) -> None:
        backend.record((time.perf_counter() - started) * 1000.0, failed=True)
        if backend.breaker.on_failure(time.monotonic()):
            log.warning("circuit opened for backend %s", backend.key)

    def _respond_whole(self, proto: Any, answer: Answer, ex: Exchange) -> None:
        headers = [*answer.headers, ("x-request-id", ex.request_id)]
        if ex.cache != "-":
            headers.append(("x-cache", ex.cache))
        ex.status = answer.status
        ex.bytes_sent = len(answer.body)
        proto.response_bytes(answer.status, headers, answer.body)

    async def _forward_stream(
        self, scope: Any, proto: Any, headers: Any, body: bytes, key: int | None, ex: Exchange
    ) -> None:
        backend, response = await self._select_and_send(proto, headers, body, ex, buffer=False)
        out = [*response.headers, ("x-request-id", ex.request_id)]
        if ex.cache != "-":
            out.append(("x-cache", ex.cache))
        ex.status = response.status
        transport = proto.response_stream(response.status, out)
        metrics = self.metrics
        metrics.streams_active += 1
        backend.in_flight += 1
        left = False

        def client_left() -> None:
            nonlocal left
            left = True
            response.close()

        # NOTE: a disconnect watch started with the stream added ~0.6 ms to time to first token;
        # the sweeper starts it one or two periods later, by when the first token is usually out.
        self.slow.add(response, proto, client_left)
        record: list[bytes] | None = [] if key is not None and 200 <= response.status < 300 else None
        complete = False
        chunk = response.body  # the first chunk came with the headers
        if chunk is not None:
            ex.ttfb_ms = (time.perf_counter() - ex.started) * 1000.0
            metrics.ttft.observe(ex.ttfb_ms)
        try:
            while chunk is not None:
                try:
                    await transport.send_bytes(chunk)
                except Exception:
                    left = True
                    response.close()
                    break
                ex.bytes_sent += len(chunk)
                if record is not None:
                    record.append(chunk)
                try:
                    chunk = await response.next_chunk()
                except UpstreamError as err:
                    metrics.stream_errors += 1
                    self._backend_failed(backend, ex.started)
                    log.warning("request %s: stream from %s broke: %s", ex.request_id, backend.key, err)
                    if not left and _content_type(response.headers).startswith("text/event-stream"):
                        # the status line is gone: an in-band OpenAI error event tells the client the
                        # stream broke (the openai SDK raises APIError) instead of a quiet, truncated end
                        with contextlib.suppress(Exception):
                            await transport.send_bytes(_stream_error_event(err))
                    break
            else:
                complete = not left
        finally:
            self.slow.remove(response)
            metrics.streams_active -= 1
            backend.in_flight -= 1
            if left:
                metrics.client_disconnects += 1
                ex.status = 499
        # Only a stream that ended cleanly with [DONE] is worth replaying.
        clean = complete and bool(record) and record is not None and _ends_stream(record[-1])
        if clean and record is not None and key is not None and self.cache is not None:
            self.cache.put(key, _pack(record), _content_type(response.headers))

    async def _replay_stream(
        self, proto: Any, headers: list[tuple[str, str]], stored: bytes, ex: Exchange
    ) -> None:
        transport = proto.response_stream(200, headers)
        for chunk in _unpack(stored):
            await transport.send_bytes(chunk)
            ex.bytes_sent += len(chunk)


def _stream_error_event(err: Exception) -> bytes:
    """An SSE event carrying an OpenAI error; the leading blank line ends any event cut in half."""
    body = error_body(502, f"backend failed mid-stream: {err}", "upstream_stream_broken")
    return b"\n\ndata: " + body + b"\n\n"


def _ends_stream(chunk: bytes) -> bool:
    return chunk.rstrip().endswith(b"[DONE]")


def _content_type(headers: list[tuple[str, str]]) -> str:
    for name, value in headers:
        if name == "content-type":
            return value
    return JSON
