"""The request pipeline of every proxied route, as named phases.

`admit` (content type, size) → `parse` (route's validation, or the key memo) →
`resolve` (model → pool; 404 for a model nobody serves) → `cache_lookup` (hit,
join an identical request in flight, or miss) → `forward` (pick a backend in the
pool, send; retry on another one while that is safe) → `respond` (whole answer,
or SSE chunks as they arrive) → `record` (cache fill, metrics, access line).

Retry safety, written down: a request goes to another backend only when the
first one failed before answering and the retry cannot repeat work: a failed
connect (nothing was sent) always; a reset before the status line, or a
non-streamed answer cut short, only on routes whose spec allows a retry after
sending (chat, completions, embeddings: idempotent generation). `/v1/responses`
and unknown routes are never retried once sent. Never the same backend twice,
never once a byte reached the client. A timeout is not retried (the backend may
still be generating; retrying would double the load). A client that leaves
cancels the upstream request at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import logging
import time
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec

from ntonix import logs
from ntonix.cache.policy import KeyMemo, cache_directives, cache_key, credential_scope, request_digest
from ntonix.cache.value import JSON, decode_meta, encode_meta, header_value, pack_chunks, unpack_chunks
from ntonix.errors import (
    GatewayError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeoutError,
    error_body,
)
from ntonix.limits.stream import UsageTap, ask_for_usage
from ntonix.pipeline.embeddings import EmbeddingInputs
from ntonix.pipeline.exchange import OWN_RESPONSE_HEADERS, Exchange, client_request_id
from ntonix.pipeline.fanout import Pace, StreamGroup
from ntonix.pipeline.usage import Usage, usage_of_body, usage_of_stream
from ntonix.pipeline.watch import SlowRequestWatch
from ntonix.routes.spec import EMBEDDINGS

if TYPE_CHECKING:
    from ntonix._core import Forwarder, ResponseCache, UpstreamResponse
    from ntonix.auth.guard import Guard
    from ntonix.cache.redis_tier import RedisTier
    from ntonix.config import Settings
    from ntonix.observe.metrics import Metrics, ModelStats
    from ntonix.routes.spec import RouteSpec
    from ntonix.upstream.backend import Backend
    from ntonix.upstream.pool import BackendPool, Lease
    from ntonix.upstream.registry import ModelRegistry

log = logging.getLogger("ntonix.proxy")

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode
# Request headers never sent upstream as they are: the gateway sets its own.
_REPLACED = frozenset({"x-request-id", "host", "authorization", "accept-encoding"})


class Answer(msgspec.Struct, frozen=True):
    """A whole answer, shared with requests coalesced onto it."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes
    # Its Content-Encoding when it may be shared (keyed): undone for a client that does not accept it.
    encoding: str | None = None


class Proxy:
    """Answers the proxied `/v1/...` routes for one gateway process."""

    def __init__(
        self,
        settings: Settings,
        forwarder: Forwarder,
        cache: ResponseCache | None,
        metrics: Metrics,
        registry: Callable[[], ModelRegistry],
    ) -> None:
        self.forwarder = forwarder
        self.cache = cache
        self.cache_streams = settings.cache.streaming
        self.coalesce_streams = settings.cache.coalesce_streams
        self.lag_bound = settings.cache.follower_lag_kb * 1024
        self.streams: dict[int, StreamGroup] = {}
        self.metrics = metrics
        self.registry = registry
        self.retries = settings.proxy.retries
        self.max_body = int(settings.proxy.max_body_size_mb * 1024 * 1024)
        self.session_header = settings.routing.session_header.lower()
        self.inflight: dict[int, asyncio.Future[Answer]] = {}
        self.slow = SlowRequestWatch()
        self.keys = KeyMemo()
        self.shared: RedisTier | None = None  # the Redis tier behind `cache`, set by the gateway
        self.embeddings = EmbeddingInputs(self)  # /v1/embeddings cached per input (embeddings.py)
        self.guard: Guard | None = None  # set by the gateway when API keys are configured

    async def handle(self, route: RouteSpec, scope: Any, proto: Any) -> None:
        """Run the whole pipeline for one request; never raises to Granian (but a cancel)."""
        metrics = self.metrics
        metrics.requests_total += 1
        metrics.requests_active += 1
        headers = scope.headers
        ex = Exchange(client_request_id(headers.get("x-request-id")), time.perf_counter(), route)
        if route.validate is None:  # an unknown route goes upstream as the client named it
            ex.path = scope.path
        query = scope.query_string
        if query:  # e.g. Azure's `api-version`: sent on, and a different query is another answer
            ex.query = query
            ex.path = f"{ex.path}?{query}"
        try:
            if self.guard is not None:  # authenticate → admit: 401, 429; answers carry x-ratelimit-*
                proto = await self.guard.admit(headers, ex, proto)
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
            self._record(scope, ex)

    def stats(self, ex: Exchange) -> ModelStats:
        """The counters of the request's route and model, looked up once (its model is resolved)."""
        stats = ex.stats
        if stats is None:
            stats = ex.stats = self.metrics.model(ex.route.name, ex.model)
        return stats

    def _error(self, proto: Any, ex: Exchange, err: GatewayError) -> None:
        body = err.body()
        ex.status = err.status
        ex.bytes_sent = len(body)
        ex.client_error = err.status < 500 and err.status != 499
        headers = [("content-type", JSON), ("x-request-id", ex.request_id), *err.headers]
        proto.response_bytes(err.status, headers, body)

    # -- phases -----------------------------------------------------------------------------

    async def _pipeline(self, scope: Any, proto: Any, headers: Any, ex: Exchange) -> None:
        route = ex.route
        ex.body = await self._admit(proto, headers, route)  # no local: a stream may drop it (see below)
        no_cache, no_store = cache_directives(headers.get("cache-control"))
        cacheable = route.cacheable and self.cache is not None and not no_store
        digest = self._parse(ex, ex.body, cacheable)
        facts = ex.facts
        assert facts is not None
        if ex.principal is not None:
            ex.principal.check_model(facts.model, self.registry().aliases)  # 403 model_not_allowed
        model, pool = self._resolve(ex)
        if self.session_header:
            ex.session_header = headers.get(self.session_header)
        per_input = route is EMBEDDINGS and digest is not None and not facts.stream  # see embeddings.py
        if per_input and await self.embeddings.answer(
            proto, headers, pool, self._scope(headers, pool, ex), no_cache, ex
        ):
            return
        key: int | None = None
        if digest is not None and (not facts.stream or self.cache_streams or self.coalesce_streams):
            key = cache_key(route.name, model, self._scope(headers, pool, ex), digest)
        cache = self.cache
        if key is not None:
            assert cache is not None
            ex.cache = "MISS"
            if not no_cache:
                # a stream keyed only to coalesce (cache.streaming off) is never stored: no lookup, no miss
                stored = not facts.stream or self.cache_streams
                hit = cache.get(key) if stored else None
                if hit is None and stored and self.shared is not None and key not in self.inflight:
                    hit = await self.shared.get(key, facts.stream)  # the Redis tier; fills L1
                if hit is not None:
                    await self._serve_hit(proto, headers, hit, facts.stream, ex)
                    return
                joined = not facts.stream and key in self.inflight
                if joined and await self._join_leader(proto, headers, key, ex):
                    return
            log.debug("request %s: cache %s", ex.request_id, "refresh (no-cache)" if no_cache else "miss")
        if facts.stream:
            if key is not None and self.coalesce_streams and not no_cache:
                await self._join_stream(proto, headers, pool, key, ex, (scope.client, scope.server))
            else:
                await self._forward_stream(proto, headers, pool, key, ex)
            return
        leader: asyncio.Future[Answer] | None = None
        if key is not None and not no_cache:
            leader = asyncio.get_running_loop().create_future()
            self.inflight[key] = leader
            if self.shared is not None and await self._from_fleet(proto, headers, key, leader, ex):
                return
        try:
            lease, response = await self._forward(
                proto, headers, pool, ex, buffer=True, cacheable=key is not None
            )
            body = response.body or b""  # NOTE: each `.body` is a fresh copy of the answer: read once
            pool.release(ex, lease, self._note_usage(ex, usage_of_body(response.status, body)))
            out = _answer_headers(response.headers)
            encoding = header_value(out, "content-encoding") if key is not None else None
            answer = Answer(response.status, out, body, encoding)
        except BaseException as exc:
            if leader is not None:
                self._release_waiters(key, leader, exc)
            if self.shared is not None and key is not None:
                self.shared.fleet_done(key)
            raise
        if key is not None and 200 <= answer.status < 300:
            assert cache is not None
            meta = encode_meta(answer.headers)
            cache.put(key, answer.body, meta)
            if self.shared is not None:
                self.shared.put(key, answer.body, meta, False, answer.status)
        elif self.shared is not None and key is not None:
            self.shared.fleet_done(key)  # nothing to store: let the fleet's waiters go upstream
        if leader is not None:
            if self.inflight.get(key) is leader:  # type: ignore[arg-type]
                del self.inflight[key]  # type: ignore[arg-type]
            leader.set_result(answer)
        self._respond_whole(proto, answer, ex, headers)

    async def _admit(self, proto: Any, headers: Any, route: RouteSpec) -> bytes:
        """415 for a body that is not JSON (on JSON routes), 413 for one over the limit; the body."""
        content_type = headers.get("content-type")
        if (
            route.json_only
            and content_type != JSON
            and (not content_type or content_type.split(";", 1)[0].strip().lower() != JSON)
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

    def _parse(self, ex: Exchange, body: bytes, cacheable: bool) -> int | None:
        """Fill `ex.facts` (and `ex.request` when decoded); answers the request's digest when cacheable."""
        route = ex.route
        if not cacheable:
            ex.request, ex.facts = route.parse(body)
            return None
        memo = self.keys
        body_hash = memo.body_hash(route.path, body)
        known = memo.get(body_hash)
        if known is not None:
            digest, ex.facts = known  # validated when first seen
            return int(digest)
        request, facts = route.parse(body)
        assert request is not None  # cacheable routes validate JSON objects
        ex.request, ex.facts = request, facts
        digest = request_digest(request)
        memo.put(body_hash, (digest, facts))
        return digest

    def _resolve(self, ex: Exchange) -> tuple[str | None, BackendPool]:
        """Model → pool; rewrites the body's `model` when the client named an alias."""
        facts = ex.facts
        assert facts is not None
        model, pool = self.registry().resolve(facts.model)
        ex.model = model
        if model != facts.model:
            request = ex.request if ex.request is not None else _decode(ex.body)
            request["model"] = model
            ex.request = request
            ex.body = _encode(request)
            log.debug("request %s: alias %s -> %s", ex.request_id, facts.model, model)
        return model, pool

    def _scope(self, headers: Any, pool: BackendPool, ex: Exchange) -> str:
        """The credential scope of cached answers: the client's Authorization when it reaches a backend,
        the gateway key with `cache.scope: key` (with gateway keys on, no client Authorization goes up);
        and the request's query string, which the backend also reads."""
        if ex.principal is not None and self.guard is not None:
            scope = self.guard.scope(ex.principal)
        else:
            authorization = headers.get("authorization")
            if not authorization or all(b.api_key is not None for b in pool.backends):
                scope = ""
            else:
                scope = credential_scope(authorization)
        return f"{scope}?{ex.query}" if ex.query else scope

    async def _serve_hit(
        self, proto: Any, headers: Any, hit: tuple[bytes, str], stream: bool, ex: Exchange
    ) -> None:
        self.stats(ex).cache_hits += 1
        body, meta = hit
        ex.cache = "HIT"
        log.debug("request %s: cache hit (%d bytes)", ex.request_id, len(body))
        ex.status = 200
        out = decode_meta(meta)
        if len(out) > 1:  # stored as the backend compressed it
            out, body = _for_client(headers.get("accept-encoding"), out, body, out[1][1])
        out += [("x-request-id", ex.request_id), ("x-cache", "HIT")]
        if stream:
            await self._replay_stream(proto, out, body, ex)
        else:
            ex.bytes_sent = len(body)
            proto.response_bytes(200, out, body)

    async def _join_leader(self, proto: Any, headers: Any, key: int, ex: Exchange) -> bool:
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
        self._respond_whole(proto, answer, ex, headers)
        return True

    async def _from_fleet(
        self, proto: Any, headers: Any, key: int, leader: asyncio.Future[Answer], ex: Exchange
    ) -> bool:
        """Fleet single-flight (`cache.redis_lock_ms`): the answer another gateway computed, if any."""
        assert self.shared is not None
        try:
            hit = await self.shared.fleet_wait(key)
        except BaseException as exc:
            self._release_waiters(key, leader, exc)
            raise
        if hit is None:
            return False  # this process computes it (holding the lock, or done waiting)
        if self.inflight.get(key) is leader:
            del self.inflight[key]
        meta = decode_meta(hit[1])
        answer = Answer(200, meta, hit[0], meta[1][1] if len(meta) > 1 else None)
        leader.set_result(answer)
        ex.cache = "HIT"
        self.stats(ex).cache_hits += 1
        self._respond_whole(proto, answer, ex, headers)
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

    def _upstream_headers(self, headers: Any, ex: Exchange, cacheable: bool) -> list[tuple[str, str]]:
        """The client's headers as sent upstream, less those the gateway replaces per backend."""
        out = [
            (name, value)
            for name, value in headers.items()
            if name not in _REPLACED
            and not name.startswith("proxy-")  # Proxy-Authorization: ours, not theirs
        ]
        connection = headers.get("connection")
        if connection:  # headers the client named hop-by-hop (RFC 9110 §7.6.1) stay on this hop
            named = {token.strip().lower() for token in connection.split(",")}
            out = [(name, value) for name, value in out if name not in named]
        out.append(("x-request-id", ex.request_id))
        encoding = headers.get("accept-encoding")
        if cacheable:
            # NOTE: a stored answer must decode for every client that hits it: ask for identity.
            out.append(("accept-encoding", "identity"))
        elif encoding is not None:
            out.append(("accept-encoding", encoding))
        return out

    async def _forward(
        self,
        proto: Any | None,
        headers: Any,
        pool: BackendPool,
        ex: Exchange,
        buffer: bool,
        cacheable: bool,
    ) -> tuple[Lease, UpstreamResponse]:
        """Pick backends and send until one answers; retries only what is safe to retry (see above)."""
        base = self._upstream_headers(headers, ex, cacheable)
        authorization = headers.get("authorization")
        route = ex.route
        path = ex.path
        tried: list[Backend] = []
        last: UpstreamError | None = None
        for attempt in range(self.retries + 1):
            lease = pool.pick(ex, tried)
            if lease is None:
                break
            backend = lease.backend
            if attempt:
                self.metrics.retries += 1
                log.debug("request %s: retry %d on %s", ex.request_id, attempt, backend.key)
            tried.append(backend)
            ex.backend = backend.key
            started = time.perf_counter()
            send = base
            if backend.api_key is not None:
                send = [*base, ("authorization", f"Bearer {backend.api_key}")]
            elif authorization is not None and ex.principal is None:  # a gateway key never goes upstream
                send = [*base, ("authorization", authorization)]
            pending = self.forwarder.request("POST", backend.url + path, send, ex.body, buffer)
            if proto is not None:  # None: a shared stream's producer, cancelled when its last client left
                self.slow.add(pending, proto, pending.cancel)
            try:
                response = await pending
            except UpstreamConnectError as err:
                self._failed_attempt(pool, ex, lease, started, err)
                last = err.with_traceback(None)
                continue
            except UpstreamProtocolError as err:
                self._failed_attempt(pool, ex, lease, started, err)
                last = err.with_traceback(None)
                if route.retry_after_send:
                    continue
                break
            except UpstreamTimeoutError as err:
                self._backend_failed(backend, lease, started)
                pool.release(ex, lease)
                err.with_traceback(None)  # same cycle as in _failed_attempt
                raise GatewayError(
                    504, "upstream_timeout", f"backend did not answer in time: {err}"
                ) from None
            except BaseException:
                backend.breaker.on_release(lease.probe)
                pool.release(ex, lease)
                raise
            finally:
                self.slow.remove(pending)
            if response.status >= 500:
                self._backend_failed(backend, lease, started)
            else:
                backend.breaker.on_success(lease.probe)
                backend.last_progress = time.monotonic()
                backend.record((time.perf_counter() - started) * 1000.0, failed=False)
            return lease, response
        if isinstance(last, UpstreamProtocolError):
            raise GatewayError(502, "bad_gateway", f"backend failed: {last}")
        if pool.model is not None and not pool.backends:
            raise GatewayError(404, "model_not_found", f"no backend serves the model '{pool.model}'")
        model = f" for model '{pool.model}'" if pool.model is not None else ""
        raise GatewayError(503, "no_healthy_backend", f"no healthy backend is available{model}")

    def _failed_attempt(
        self, pool: BackendPool, ex: Exchange, lease: Lease, started: float, err: UpstreamError
    ) -> None:
        self._backend_failed(lease.backend, lease, started)
        pool.release(ex, lease)
        log.warning(
            "request %s: backend %s failed before answering: %s", ex.request_id, lease.backend.key, err
        )
        # NOTE: the traceback would close a cycle (this frame -> pending -> its future -> err ->
        # traceback -> this frame) that only the cyclic GC frees; the caller drops it.

    def _backend_failed(self, backend: Backend, lease: Lease, started: float) -> None:
        backend.record((time.perf_counter() - started) * 1000.0, failed=True)
        if backend.breaker.on_failure(time.monotonic(), lease.probe):
            log.warning("circuit opened for backend %s", backend.key)

    def _stream_broke(self, ex: Exchange, lease: Lease, response: UpstreamResponse, err: Exception) -> bool:
        """Count a stream the backend broke after its headers; True when it is SSE (an error event fits)."""
        backend = lease.backend
        self.metrics.stream_errors += 1
        backend.errors += 1  # the request itself was counted when its headers came
        if backend.breaker.on_failure(time.monotonic(), lease.probe):
            log.warning("circuit opened for backend %s", backend.key)
        log.warning("request %s: stream from %s broke: %s", ex.request_id, backend.key, err)
        return (header_value(response.headers, "content-type") or "").startswith("text/event-stream")

    def _note_usage(self, ex: Exchange, usage: Usage | None) -> int | None:
        """Count the answer's tokens for its model; answers the cached prompt tokens it reported."""
        if usage is None:
            return None
        if ex.principal is not None and self.guard is not None:
            self.guard.charge(ex.principal, usage.prompt + usage.completion)
        stats = self.stats(ex)
        stats.prompt_tokens += usage.prompt
        stats.completion_tokens += usage.completion
        if usage.cached is not None:
            stats.cached_tokens += usage.cached
        return usage.cached

    def _respond_whole(self, proto: Any, answer: Answer, ex: Exchange, asked: Any) -> None:
        """`answer` to this client, whose request headers are `asked`: a shared answer the backend
        compressed although the gateway asked for identity is undone when this client cannot read it."""
        out, body = answer.headers, answer.body
        if answer.encoding is not None:
            out, body = _for_client(asked.get("accept-encoding"), out, body, answer.encoding)
        headers = [*out, ("x-request-id", ex.request_id)]
        if ex.cache != "-":
            headers.append(("x-cache", ex.cache))
        ex.status = answer.status
        ex.bytes_sent = len(body)
        proto.response_bytes(answer.status, headers, body)

    def _usage_tap(self, ex: Exchange) -> UsageTap | None:
        """For a key with a tpm: ask the backend for the stream's usage; the tap that strips it again."""
        return ask_for_usage(ex) if ex.principal is not None and ex.principal.tpm is not None else None

    async def _forward_stream(
        self, proto: Any, headers: Any, pool: BackendPool, key: int | None, ex: Exchange
    ) -> None:
        tap = self._usage_tap(ex)
        lease, response = await self._forward(
            proto, headers, pool, ex, buffer=False, cacheable=key is not None
        )
        ex.drop_request_body()  # answered: never resent, and the stream may stay open for minutes
        backend = lease.backend
        out = [*_answer_headers(response.headers), ("x-request-id", ex.request_id)]
        if ex.cache != "-":
            out.append(("x-cache", ex.cache))
        ex.status = response.status
        try:
            transport = proto.response_stream(response.status, out)
        except BaseException:  # the answer cannot start (client gone): the lease and upstream go now
            response.close()
            pool.release(ex, lease)
            raise
        metrics = self.metrics
        metrics.streams_active += 1
        left = False

        def client_left() -> None:
            nonlocal left
            left = True
            response.close()

        # NOTE: a disconnect watch started with the stream added ~0.6 ms to time to first token;
        # the sweeper starts it one or two periods later, by when the first token is usually out.
        self.slow.add(response, proto, client_left)
        record: list[bytes] | None = [] if key is not None and 200 <= response.status < 300 else None
        usage_chunk: bytes | None = None
        done = False  # the backend sent `data: [DONE]`: whatever happens next, the stream is complete
        chunk = response.body  # the first chunk when it came with the headers
        try:
            if chunk is None:
                chunk = await response.next_chunk()
            if chunk is not None:
                ex.ttfb_ms = (time.perf_counter() - ex.started) * 1000.0
                metrics.ttft.observe(ex.ttfb_ms)
            while chunk is not None:
                sent = chunk if tap is None else tap.feed(chunk)  # tap: the usage event we asked for
                try:
                    if sent:
                        await transport.send_bytes(sent)
                except Exception:
                    left = True
                    response.close()
                    break
                ex.bytes_sent += len(sent)
                backend.last_progress = time.monotonic()
                if record is not None and sent:
                    record.append(sent)
                if b'"usage"' in chunk:
                    usage_chunk = chunk
                if chunk.rstrip().endswith(b"[DONE]"):
                    done = True
                try:
                    chunk = await response.next_chunk()
                except UpstreamError as err:
                    if done:
                        log.debug("request %s: %s closed after [DONE]: %s", ex.request_id, backend.key, err)
                        break
                    sse = self._stream_broke(ex, lease, response, err)
                    if not left and sse:
                        # the status line is gone: an in-band OpenAI error event tells the client the
                        # stream broke (the openai SDK raises APIError) instead of a quiet, truncated end
                        with contextlib.suppress(Exception):
                            await transport.send_bytes(_stream_error_event(err))
                    record = None
                    break
            if tap is not None and not left and (rest := tap.flush()):
                try:
                    await transport.send_bytes(rest)  # an event held back that never completed
                except Exception:  # the client left: as in the loop above, not a gateway error
                    left = True
        finally:
            self.slow.remove(response)
            metrics.streams_active -= 1
            if tap is not None and tap.usage is not None:
                cached = self._note_usage(ex, tap.usage)
            else:
                cached = self._note_usage(ex, usage_of_stream(usage_chunk)) if usage_chunk else None
            pool.release(ex, lease, cached)
            if left:
                metrics.client_disconnects += 1
                ex.status = 499
        # Only a stream that ended cleanly with [DONE] is worth replaying.
        if record and not left and done and key is not None and self.cache is not None:
            stored, meta = pack_chunks(record), encode_meta(response.headers)
            self.cache.put(key, stored, meta)
            if self.shared is not None:
                self.shared.put(key, stored, meta, True, response.status)

    # -- live stream fan-out (see fanout.py) -----------------------------------------------

    async def _join_stream(
        self, proto: Any, headers: Any, pool: BackendPool, key: int, ex: Exchange, where: tuple[str, str]
    ) -> None:
        """Attach this client to the live generation of `key`, starting it when there is none."""
        group = self.streams.get(key)
        if group is None:
            loop = asyncio.get_running_loop()
            group = self.streams[key] = StreamGroup(loop)
            group.task = loop.create_task(self._produce(group, headers, pool, key, ex))
        else:
            ex.cache = "COALESCED"
            self.metrics.coalesced_streams += 1
            ex.drop_request_body()  # a follower never sends its own: one prompt copy less per follower
        group.join()
        metrics = self.metrics
        metrics.stream_group_peak = max(metrics.stream_group_peak, group.members)
        task = asyncio.current_task()
        token = object()
        if task is not None:  # a client that leaves while waiting for chunks is noticed by the sweeper
            self.slow.add(token, proto, task.cancel)
        try:
            status, out = await asyncio.shield(group.head)
            ex.status = status
            transport = proto.response_stream(
                status, [*out, ("x-request-id", ex.request_id), ("x-cache", ex.cache)]
            )
            metrics.streams_active += 1
            try:
                await self._follow(group, transport, ex, where)
            finally:
                metrics.streams_active -= 1
        finally:
            self.slow.remove(token)
            if group.leave() and self.streams.get(key) is group:
                del self.streams[key]  # cancelled: a request arriving now starts a new generation

    async def _follow(self, group: StreamGroup, transport: Any, ex: Exchange, where: tuple[str, str]) -> None:
        """Send the group's chunks from the first one, then as they arrive, at the pace the client's
        connection acknowledges them; drop a client that falls too far behind (fanout.Pace)."""
        pace = Pace(self.lag_bound, group.size, where)
        sent = index = 0
        try:
            while True:
                chunks = group.chunks
                while index < len(chunks):
                    if pace.behind(group.size, sent):
                        self._drop_follower(pace, ex)
                        if pace.peer is None:  # it cannot be cut: tell it, after what it has queued
                            with contextlib.suppress(Exception):
                                await transport.send_bytes(_lag_event())
                        return
                    if pace.ahead(sent):
                        await pace.wait()  # the live head may move meanwhile: check again
                        if pace.stalled():
                            self._drop_follower(pace, ex)
                            return
                        continue
                    chunk = chunks[index]
                    try:
                        await transport.send_bytes(chunk)
                    except Exception:  # the client left
                        self.metrics.client_disconnects += 1
                        ex.status = 499
                        return
                    if not sent:
                        ex.ttfb_ms = (time.perf_counter() - ex.started) * 1000.0
                        self.metrics.ttft.observe(ex.ttfb_ms)
                    index += 1
                    sent += len(chunk)
                    ex.bytes_sent = sent
                if group.done:
                    return
                await asyncio.shield(group.wake)
        finally:
            pace.close()

    def _drop_follower(self, pace: Pace, ex: Exchange) -> None:
        self.metrics.followers_dropped += 1
        log.warning("request %s: client fell behind the live stream; disconnected", ex.request_id)
        pace.cut()
        ex.status = 499

    async def _produce(
        self, group: StreamGroup, headers: Any, pool: BackendPool, key: int, ex: Exchange
    ) -> None:
        """Read one upstream stream into `group`; owned by the group, not by any one client."""
        lease: Lease | None = None
        response: UpstreamResponse | None = None
        done = broken = False
        usage_chunk: bytes | None = None
        tap = self._usage_tap(ex)
        try:
            try:
                lease, response = await self._forward(None, headers, pool, ex, buffer=False, cacheable=True)
            except GatewayError as err:
                group.head.set_exception(err)
                group.head.exception()  # every member answers with it; there may be none left
                return
            ex.drop_request_body()  # answered: never resent
            backend = lease.backend
            group.head.set_result((response.status, _answer_headers(response.headers)))
            chunk = response.body
            if chunk is None:
                chunk = await response.next_chunk()
            while chunk is not None:
                sent = chunk if tap is None else tap.feed(chunk)  # tap: the usage event we asked for
                if sent:
                    group.append(sent)
                backend.last_progress = time.monotonic()
                if b'"usage"' in chunk:
                    usage_chunk = chunk
                if chunk.rstrip().endswith(b"[DONE]"):
                    done = True
                try:
                    chunk = await response.next_chunk()
                except UpstreamError as err:
                    if done:
                        break
                    broken = True
                    if self._stream_broke(ex, lease, response, err):
                        group.append(_stream_error_event(err))
                    break
            if tap is not None and (rest := tap.flush()):
                group.append(rest)
        except asyncio.CancelledError:
            log.debug("request %s: every client left the shared stream; upstream closed", ex.request_id)
            broken = True
        except Exception:
            log.exception("request %s: shared stream failed inside the gateway", ex.request_id)
            broken = True
            if not group.head.done():
                group.head.set_exception(GatewayError(500, "internal_error", "internal gateway error"))
                group.head.exception()
        finally:
            if response is not None and (broken or not done):
                response.close()
            if lease is not None:
                if tap is not None and tap.usage is not None:
                    cached = self._note_usage(ex, tap.usage)
                else:
                    cached = self._note_usage(ex, usage_of_stream(usage_chunk)) if usage_chunk else None
                pool.release(ex, lease, cached)
            if not group.head.done():
                group.head.cancel()
            group.finish()
            if self.streams.get(key) is group:
                del self.streams[key]
        stored = self.cache_streams and done and not broken and self.cache is not None
        if stored and response is not None and 200 <= response.status < 300:
            assert self.cache is not None
            stored_chunks, meta = pack_chunks(group.chunks), encode_meta(response.headers)
            self.cache.put(key, stored_chunks, meta)
            if self.shared is not None:
                self.shared.put(key, stored_chunks, meta, True, response.status)

    async def _replay_stream(
        self, proto: Any, headers: list[tuple[str, str]], stored: bytes, ex: Exchange
    ) -> None:
        transport = proto.response_stream(200, headers)
        for chunk in unpack_chunks(stored):
            try:
                await transport.send_bytes(chunk)
            except Exception:  # the client left during the replay: nothing more to do
                self.metrics.client_disconnects += 1
                ex.status = 499
                return
            ex.bytes_sent += len(chunk)

    # -- record -----------------------------------------------------------------------------

    def _record(self, scope: Any, ex: Exchange) -> None:
        latency_ms = (time.perf_counter() - ex.started) * 1000.0
        self.metrics.finish(ex.status, latency_ms, ex.client_error)
        stats = self.stats(ex)
        stats.requests += 1
        if ex.status >= 400:
            stats.errors += 1
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
            ex.model,
            ex.principal.name if ex.principal is not None else None,
            bare_id=True,  # client_request_id: a valid client id or a UUID4, nothing to quote
        )


def _answer_headers(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The backend's headers as the client gets them: its request id and X-Cache replaced by ours."""
    return [(name, value) for name, value in headers if name not in OWN_RESPONSE_HEADERS]


def _for_client(
    accept_encoding: str | None, headers: list[tuple[str, str]], body: bytes, encoding: str
) -> tuple[list[tuple[str, str]], bytes]:
    """A stored or shared answer's headers and body for a client sending `accept_encoding`: gzip the
    client does not accept is decompressed (and its Content-Encoding dropped); any other encoding,
    and a body that does not decompress, go as they were stored."""
    if encoding.lower() != "gzip" or _accepts(accept_encoding, encoding):
        return headers, body
    try:
        plain = gzip.decompress(body)
    except (OSError, EOFError, zlib.error):
        return headers, body
    return [(name, value) for name, value in headers if name != "content-encoding"], plain


def _accepts(accept_encoding: str | None, encoding: str) -> bool:
    if not accept_encoding:
        return False
    wanted = encoding.lower()
    for part in accept_encoding.lower().split(","):
        name, _, params = part.strip().partition(";")
        if name.strip() in (wanted, "*") and params.replace(" ", "") not in ("q=0", "q=0.0"):
            return True
    return False


def _lag_event() -> bytes:
    body = error_body(502, "client too slow for the live stream; disconnected", "stream_lagging")
    return b"\n\ndata: " + body + b"\n\n"


def _stream_error_event(err: Exception) -> bytes:
    """An SSE event carrying an OpenAI error; the leading blank line ends any event cut in half."""
    body = error_body(502, f"backend failed mid-stream: {err}", "upstream_stream_broken")
    return b"\n\ndata: " + body + b"\n\n"
