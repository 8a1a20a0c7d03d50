"""A mock OpenAI-compatible LLM backend (`ntonix mock`) for the demo, the tests and the benchmarks.

It is an RSGI app served by Granian's embedded server: `POST /v1/chat/completions` answers with a
deterministic "Echo: <last user message>" cut or padded to a number of words ("tokens"), either as one
`chat.completion` object or as an SSE stream of `chat.completion.chunk` events ending in `data: [DONE]`,
each event sent with its own `send_bytes` as soon as its time comes; `GET /health` and `GET /v1/models`
answer like a real server. Latency before the first byte, token rate and token count come from the command
line and can be overridden per request with `X-Mock-*` headers, which also force an error status, a hang
until the client leaves, or a mid-stream abort, so one mock serves many tests. `/mock/health`,
`/mock/stats` and `/mock/reset` let tests steer the health answer and read counters (including streams
whose client went away). The hot paths stay cheap for benchmarks with thousands of open streams: answers
are encoded once per distinct request and reused with only the id and timestamp spliced in, and the only
per-stream extra is one disconnect watcher while the stream sleeps.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Annotated, Any, Final, Protocol, TypeVar

import click
import msgspec
from granian.constants import Interfaces
from granian.log import LogLevels
from granian.server.embed import Server

from ntonix.system import raise_open_files_limit

__all__ = ["MockApp", "create_mock_app", "mock_command", "serve_mock"]


# --- the parts of Granian's RSGI protocol this module uses


class _Headers(Protocol):
    def items(self) -> list[tuple[str, str]]: ...


class _Scope(Protocol):
    proto: str
    method: str
    path: str

    @property
    def headers(self) -> _Headers: ...


class _Transport(Protocol):
    def send_bytes(self, data: bytes) -> Awaitable[None]: ...


class _HTTPProtocol(Protocol):
    def __call__(self) -> Awaitable[bytes]: ...

    def client_disconnect(self) -> Awaitable[None]: ...

    def response_bytes(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None: ...

    def response_stream(self, status: int, headers: list[tuple[str, str]]) -> _Transport: ...


_Handler = Callable[[_Scope, _HTTPProtocol], Awaitable[None]]

# --- request and admin documents


class _Part(msgspec.Struct):
    text: str | None = None


class _Message(msgspec.Struct):
    role: str
    content: str | list[_Part] | None = None


class _StreamOptions(msgspec.Struct):
    include_usage: bool | None = False


class _ChatRequest(msgspec.Struct):
    messages: list[_Message]
    model: str | None = None
    stream: bool | None = False
    stream_options: _StreamOptions | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None


class _HealthUpdate(msgspec.Struct, forbid_unknown_fields=True):
    status: Annotated[int, msgspec.Meta(ge=100, le=599)] = 200
    delay_ms: Annotated[float, msgspec.Meta(ge=0)] = 0.0


class _Stats(msgspec.Struct):
    """Counters served by `GET /mock/stats` (the admin endpoints themselves are not counted).

    `streams_*` count chat requests with `"stream": true` that got past forced status and parsing:
    completed (sent `[DONE]`), cancelled (the client went away, noticed by a failed send or by
    `client_disconnect`), or cut by `X-Mock-Abort-After` (`aborted`, which counts non-streamed cuts too).
    `requests_cancelled` counts non-streamed requests and hangs whose client left before the answer.
    """

    requests: int = 0
    chat_requests: int = 0
    health_requests: int = 0
    streams_started: int = 0
    streams_completed: int = 0
    streams_cancelled: int = 0
    aborted: int = 0
    requests_cancelled: int = 0
    in_flight: int = 0
    last_headers: dict[str, str] | None = None
    last_body: str | None = None


_CHAT_DECODER: Final = msgspec.json.Decoder(_ChatRequest)
_HEALTH_DECODER: Final = msgspec.json.Decoder(_HealthUpdate)
_encode: Final = msgspec.json.encode

_DONE: Final = b"data: [DONE]\n\n"
_FILLER: Final = ("lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit", "sed", "do")
_ANSWER_CACHE_SIZE: Final = 4096
# Granian's default caps concurrent requests at backlog/workers (2048); benchmarks hold 10,000 streams.
_BACKPRESSURE: Final = 65536
_BACKLOG: Final = 2048


class _BadRequestError(Exception):
    """A request the mock refuses with 400 (bad JSON, bad `X-Mock-*` header)."""


def _error_body(message: str, type_: str, code: str | int | None) -> bytes:
    return _encode({"error": {"message": message, "type": type_, "code": code}})


# --- knobs


class _Knobs:
    """What one chat request asks of the mock: defaults from the CLI, overridden by `X-Mock-*` headers."""

    __slots__ = ("abort_after", "abort_clean", "hang", "interval", "latency", "status", "tokens")

    def __init__(self, latency: float, interval: float, tokens: int) -> None:
        self.latency = latency
        self.interval = interval
        self.tokens = tokens
        self.status = 200
        self.hang = False
        self.abort_after: int | None = None
        self.abort_clean = False


_N = TypeVar("_N", int, float)


def _header_value(
    headers: dict[str, str], name: str, convert: Callable[[str], _N], minimum: _N, maximum: _N
) -> _N:
    raw = headers[name]
    try:
        value = convert(raw)
    except ValueError:
        kind = "an integer" if convert is int else "a number"
        raise _BadRequestError(f"header {name}: {raw!r} is not {kind}") from None
    if not minimum <= value <= maximum:
        low, high = (f"{minimum}", f"{maximum}") if convert is int else (f"{minimum:g}", f"{maximum:g}")
        raise _BadRequestError(f"header {name}: {raw!r} is out of range [{low}, {high}]")
    return value


def _parse_knobs(headers: dict[str, str], defaults: _Knobs) -> _Knobs:
    knobs = _Knobs(defaults.latency, defaults.interval, defaults.tokens)
    if "x-mock-latency-ms" in headers:
        knobs.latency = _header_value(headers, "x-mock-latency-ms", float, 0.0, 86_400_000.0) / 1000.0
    if "x-mock-token-rate" in headers:
        rate = _header_value(headers, "x-mock-token-rate", float, 0.0, 1e9)
        knobs.interval = 1.0 / rate if rate > 0 else 0.0
    if "x-mock-tokens" in headers:
        knobs.tokens = _header_value(headers, "x-mock-tokens", int, 0, 1_000_000)
    if "x-mock-status" in headers:
        knobs.status = _header_value(headers, "x-mock-status", int, 200, 599)
        if 200 < knobs.status < 400:
            raise _BadRequestError("header x-mock-status: must be 200 (no-op) or 400-599")
    if "x-mock-hang" in headers:
        knobs.hang = headers["x-mock-hang"].strip().lower() not in ("", "0", "false", "no")
    if "x-mock-abort-after" in headers:
        knobs.abort_after = _header_value(headers, "x-mock-abort-after", int, 0, 10_000_000)
        knobs.abort_clean = headers.get("x-mock-abort-mode", "reset").strip().lower() == "clean"
    return knobs


# --- answers


def _text_of(message: _Message) -> str:
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return " ".join(part.text for part in content if part.text)


def _members(obj: dict[str, Any]) -> bytes:
    """`obj` as JSON without its opening brace, to be appended to a head that opened the object."""
    return _encode(obj)[1:]


def _answer_words(prompt: str, count: int) -> list[str]:
    words = ["Echo:", *prompt.split()][:count]
    words.extend(_FILLER[i % len(_FILLER)] for i in range(count - len(words)))
    return words


class _Answer:
    """One distinct answer, encoded once: everything but the id and the timestamp, which are spliced in."""

    __slots__ = ("body_tail", "chunk_tails", "content", "model_part", "tokens", "usage_tail")

    def __init__(
        self, model: str, fingerprint: str, words: list[str], prompt_tokens: int, finish: str
    ) -> None:
        self.content = " ".join(words)
        self.tokens = len(words)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(words),
            "total_tokens": prompt_tokens + len(words),
        }
        identity = {"model": model, "system_fingerprint": fingerprint}
        # `{"id":…,"object":…,"created":T,` + body_tail is the whole chat.completion object.
        self.body_tail = _members(
            {
                **identity,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": self.content},
                        "logprobs": None,
                        "finish_reason": finish,
                    }
                ],
                "usage": usage,
            }
        )
        # `data: {"id":…,"object":…,"created":T,` + model_part + one of chunk_tails is one SSE event.
        self.model_part = _members(identity)[:-1] + b","
        deltas: list[tuple[dict[str, str], str | None]] = [({"role": "assistant", "content": ""}, None)]
        deltas += [({"content": word if i == 0 else " " + word}, None) for i, word in enumerate(words)]
        deltas.append(({}, finish))
        self.chunk_tails = [
            _members({"choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]})
            + b"\n\n"
            for delta, reason in deltas
        ]
        self.usage_tail = _members({"choices": [], "usage": usage}) + b"\n\n"


class _DisconnectWatch:
    """Cancels the handler's task when the client goes away, so a sleeping handler notices at once."""

    __slots__ = ("_future", "_task", "fired")

    def __init__(self, proto: _HTTPProtocol, task: asyncio.Task[Any]) -> None:
        self.fired = False
        self._task: asyncio.Task[Any] | None = task
        self._future = asyncio.ensure_future(proto.client_disconnect())
        self._future.add_done_callback(self._on_disconnect)

    def _on_disconnect(self, future: asyncio.Future[None]) -> None:
        if self._task is not None and not future.cancelled() and future.exception() is None:
            self.fired = True
            self._task.cancel()

    def close(self) -> None:
        # Granian's awaitable keeps its done callback after a cancel and is invisible to the cyclic
        # GC: drop the callback, or every stream's watch (and its task) would leak.
        self._task = None
        self._future.remove_done_callback(self._on_disconnect)
        self._future.cancel()


# --- the app


class MockApp:
    """RSGI app of one mock backend; `close()` ends every request in flight so the server can stop."""

    def __init__(self, name: str, model: str, latency_ms: float, token_rate: float, tokens: int) -> None:
        self.name = name
        self.model = model
        self.defaults = _Knobs(latency_ms / 1000.0, 1.0 / token_rate if token_rate > 0 else 0.0, tokens)
        self.stats = _Stats()
        self._health_status = 200
        self._health_delay = 0.0
        self._answers: dict[tuple[str, str, int, int, str], _Answer] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._ids = itertools.count(1)
        self._id_prefix = b"chatcmpl-" + os.urandom(4).hex().encode() + b"-"
        self._json_headers = [("content-type", "application/json"), ("x-mock-name", name)]
        self._sse_headers = [
            ("content-type", "text/event-stream"),
            ("cache-control", "no-cache"),
            ("x-mock-name", name),
        ]
        self._models_body = _encode(
            {
                "object": "list",
                "data": [{"id": model, "object": "model", "created": int(time.time()), "owned_by": name}],
            }
        )
        self._routes: dict[str, dict[str, _Handler]] = {
            "/v1/chat/completions": {"POST": self._chat},
            "/health": {"GET": self._health},
            "/v1/models": {"GET": self._models},
            "/mock/health": {"POST": self._set_health},
            "/mock/stats": {"GET": self._stats},
            "/mock/reset": {"POST": self._reset},
        }

    async def __rsgi__(self, scope: _Scope, proto: _HTTPProtocol) -> None:
        if scope.proto != "http":
            return
        methods = self._routes.get(scope.path)
        if methods is None:
            self._error(proto, 404, f"no route for {scope.path}", "invalid_request_error", "not_found")
            return
        handler = methods.get(scope.method)
        if handler is None:
            allowed = ", ".join(methods)
            self._error(proto, 405, f"{scope.path} accepts {allowed}", "invalid_request_error", "bad_method")
            return
        task = asyncio.current_task()
        if task is None:  # Granian's Rust task implementation: served, but not cancellable by close()
            await handler(scope, proto)
            return
        self._tasks.add(task)
        try:
            await handler(scope, proto)
        except asyncio.CancelledError:
            if not self._closing:
                raise
        finally:
            self._tasks.discard(task)

    def close(self) -> None:
        """End every request in flight (hangs, sleeps, streams), so Granian's graceful stop is prompt."""
        self._closing = True
        for task in list(self._tasks):
            task.cancel()

    # --- small endpoints

    def _error(self, proto: _HTTPProtocol, status: int, message: str, type_: str, code: str | int) -> None:
        proto.response_bytes(status, self._json_headers, _error_body(message, type_, code))

    async def _health(self, scope: _Scope, proto: _HTTPProtocol) -> None:
        self.stats.requests += 1
        self.stats.health_requests += 1
        if self._health_delay:
            await asyncio.sleep(self._health_delay)
        status = self._health_status
        body = b'{"status":"ok"}' if status < 400 else b'{"status":"unhealthy"}'
        proto.response_bytes(status, self._json_headers, body)

    async def _models(self, scope: _Scope, proto: _HTTPProtocol) -> None:
        self.stats.requests += 1
        proto.response_bytes(200, self._json_headers, self._models_body)

    async def _set_health(self, scope: _Scope, proto: _HTTPProtocol) -> None:
        try:
            update = _HEALTH_DECODER.decode(await proto())
        except msgspec.DecodeError as err:
            self._error(
                proto,
                400,
                f"expected {{'status': int, 'delay_ms': float}}: {err}",
                "invalid_request_error",
                "invalid_json",
            )
            return
        self._health_status = update.status
        self._health_delay = update.delay_ms / 1000.0
        proto.response_bytes(200, self._json_headers, _encode(update))

    async def _stats(self, scope: _Scope, proto: _HTTPProtocol) -> None:
        proto.response_bytes(200, self._json_headers, _encode(self.stats))

    async def _reset(self, scope: _Scope, proto: _HTTPProtocol) -> None:
        # in_flight is a gauge of live requests, not a counter: zeroing it would drive it negative.
        self.stats = _Stats(in_flight=self.stats.in_flight)
        proto.response_bytes(200, self._json_headers, _encode(self.stats))

    # --- chat completions

    def _answer(self, request: _ChatRequest, tokens: int) -> _Answer:
        model = request.model or self.model
        prompt = next((_text_of(m) for m in reversed(request.messages) if m.role == "user"), "")
        prompt_tokens = sum(len(_text_of(m).split()) for m in request.messages)
        limit = request.max_completion_tokens or request.max_tokens
        finish = "stop"
        if limit is not None and 0 < limit < tokens:
            tokens, finish = limit, "length"
        key = (model, prompt, tokens, prompt_tokens, finish)
        answer = self._answers.get(key)
        if answer is None:
            if len(self._answers) >= _ANSWER_CACHE_SIZE:
                del self._answers[next(iter(self._answers))]
            answer = _Answer(model, self.name, _answer_words(prompt, tokens), prompt_tokens, finish)
            self._answers[key] = answer
        return answer

    async def _chat(self, scope: _Scope, proto: _HTTPProtocol) -> None:
        self.stats.requests += 1
        self.stats.chat_requests += 1
        self.stats.in_flight += 1
        watch: _DisconnectWatch | None = None
        streaming = False
        try:
            body = await proto()
            headers = dict(scope.headers.items())
            self.stats.last_headers = headers
            self.stats.last_body = body.decode("utf-8", "replace")
            try:
                knobs = _parse_knobs(headers, self.defaults)
            except _BadRequestError as err:
                self._error(proto, 400, str(err), "invalid_request_error", "invalid_mock_header")
                return
            if knobs.hang:
                await proto.client_disconnect()
                self.stats.requests_cancelled += 1
                return
            task = asyncio.current_task()
            if task is not None and (knobs.latency or knobs.interval):
                watch = _DisconnectWatch(proto, task)
            if knobs.status != 200:
                if knobs.latency:
                    await asyncio.sleep(knobs.latency)
                type_ = "server_error" if knobs.status >= 500 else "invalid_request_error"
                message = f"{self.name}: status {knobs.status} forced by X-Mock-Status"
                self._error(proto, knobs.status, message, type_, "mock_forced_status")
                return
            try:
                request = _CHAT_DECODER.decode(body)
            except msgspec.DecodeError as err:
                self._error(
                    proto, 400, f"invalid chat request: {err}", "invalid_request_error", "invalid_json"
                )
                return
            answer = self._answer(request, knobs.tokens)
            streaming = bool(request.stream)
            if streaming:
                self.stats.streams_started += 1
            # A non-streamed answer is ready when its stream would have ended: latency plus generation.
            delay = knobs.latency if streaming else knobs.latency + knobs.interval * max(answer.tokens - 1, 0)
            if delay:
                await asyncio.sleep(delay)
            if streaming:
                options = request.stream_options
                await self._stream(proto, answer, knobs, bool(options and options.include_usage))
            else:
                await self._complete(proto, answer, knobs)
        except asyncio.CancelledError:
            if watch is None or not watch.fired:
                raise
            if streaming:
                self.stats.streams_cancelled += 1
            else:
                self.stats.requests_cancelled += 1
        finally:
            if watch is not None:
                watch.close()
            self.stats.in_flight -= 1

    def _head(self, kind: bytes) -> bytes:
        rid = b"%s%x" % (self._id_prefix, next(self._ids))
        return b'{"id":"%s","object":"%s","created":%d,' % (rid, kind, int(time.time()))

    async def _complete(self, proto: _HTTPProtocol, answer: _Answer, knobs: _Knobs) -> None:
        body = self._head(b"chat.completion") + answer.body_tail
        if knobs.abort_after is None:
            proto.response_bytes(200, self._json_headers, body)
            return
        # A declared length longer than what is sent makes Granian drop the connection mid-body, which is
        # what a crashing backend looks like; a stream that merely ends would be a clean, complete answer.
        self.stats.aborted += 1
        transport = proto.response_stream(200, [*self._json_headers, ("content-length", str(len(body)))])
        cut = min(knobs.abort_after, len(body) - 1)
        if cut:
            await transport.send_bytes(body[:cut])

    def _events(self, answer: _Answer, include_usage: bool) -> Iterator[bytes]:
        head = b"data: " + self._head(b"chat.completion.chunk") + answer.model_part
        for tail in answer.chunk_tails:
            yield head + tail
        if include_usage:
            yield head + answer.usage_tail
        yield _DONE

    async def _stream(
        self, proto: _HTTPProtocol, answer: _Answer, knobs: _Knobs, include_usage: bool
    ) -> None:
        events: Iterator[bytes] = self._events(answer, include_usage)
        headers = self._sse_headers
        limit = -1
        if knobs.abort_after is not None:
            every = list(events)
            events = iter(every)
            limit = min(knobs.abort_after, len(every) - 1)
            if not knobs.abort_clean:  # see _complete: a longer declared length makes it a real abort
                headers = [*headers, ("content-length", str(sum(map(len, every))))]
        transport = proto.response_stream(200, headers)
        interval = knobs.interval
        last_token = answer.tokens
        start = time.monotonic()
        for index, event in enumerate(events):
            if index == limit:
                self.stats.aborted += 1
                return
            # Event 0 is the role, event k (1..n) is token k-1, due k-1 intervals after the start.
            if interval and 1 < index <= last_token:
                delay = start + (index - 1) * interval - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            try:
                await transport.send_bytes(event)
            except RuntimeError:  # Granian's ProtocolClosed/ProtocolError: the client went away
                self.stats.streams_cancelled += 1
                return
        self.stats.streams_completed += 1


def create_mock_app(
    name: str, model: str = "mock-model", latency_ms: float = 0.0, token_rate: float = 0.0, tokens: int = 16
) -> MockApp:
    """Build the RSGI app of one mock backend (serve it with Granian, or with `serve_mock`)."""
    if latency_ms < 0 or token_rate < 0 or tokens < 0:
        raise ValueError("latency_ms, token_rate and tokens must not be negative")
    return MockApp(name, model, latency_ms, token_rate, tokens)


def _check_port_free(host: str, port: int) -> None:
    # Granian binds with SO_REUSEPORT, so a second mock on a busy port would silently share it with the
    # first; a probe without that option fails with EADDRINUSE instead (and SO_REUSEADDR ignores TIME_WAIT).
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))


async def _serve(app: MockApp, host: str, port: int, threads: int) -> None:
    server = Server(
        app,
        address=host,
        port=port,
        interface=Interfaces.RSGI,
        runtime_threads=threads,
        log_enabled=True,
        log_level=LogLevels.error,
        backlog=_BACKLOG,
        backpressure=_BACKPRESSURE,
    )
    loop = asyncio.get_running_loop()

    def stop() -> None:
        app.close()
        server.stop()  # type: ignore[no-untyped-call]

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    try:
        await server.serve()
    except RuntimeError as err:  # Granian reports a failed bind as RuntimeError("... (os error N)")
        if "(os error" not in str(err):
            raise
        raise OSError(str(err).splitlines()[0]) from None


def serve_mock(
    host: str,
    port: int,
    *,
    name: str | None = None,
    model: str = "mock-model",
    latency_ms: float = 0.0,
    token_rate: float = 0.0,
    tokens: int = 16,
    threads: int = 1,
) -> None:
    """Serve a mock backend on host:port until SIGTERM or SIGINT, then return.

    A process that ends after this should leave with `os._exit` (as `mock_command` does): Granian's Rust
    threads may otherwise panic during interpreter teardown.
    """
    app = create_mock_app(name or f"mock-{port}", model, latency_ms, token_rate, tokens)
    _check_port_free(host, port)
    raise_open_files_limit()
    print(
        f"{app.name}: mock OpenAI backend on http://{host}:{port} (model {model}, {tokens} tokens, "
        f"{token_rate:g} tokens/s, {latency_ms:g} ms latency)",
        file=sys.stderr,
        flush=True,
    )
    asyncio.run(_serve(app, host, port, threads))


@click.command("mock", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port", type=click.IntRange(1, 65535), default=8001, show_default=True, help="Port to listen on."
)
@click.option(
    "--name", default=None, help="Name reported as system_fingerprint and X-Mock-Name [default: mock-PORT]."
)
@click.option("--model", default="mock-model", show_default=True, help="Model id listed by /v1/models.")
@click.option(
    "--latency-ms",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Delay before the first byte of every chat answer (header X-Mock-Latency-Ms).",
)
@click.option(
    "--token-rate",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Tokens generated per second, 0 = as fast as possible; a non-streamed answer waits as long as "
    "its stream would take (header X-Mock-Token-Rate).",
)
@click.option(
    "--tokens",
    type=click.IntRange(min=0),
    default=16,
    show_default=True,
    help="Words per answer (header X-Mock-Tokens); a smaller max_tokens in the request caps it.",
)
@click.option(
    "--threads",
    type=click.IntRange(1, 256),
    default=1,
    show_default=True,
    help="Granian runtime (I/O) threads.",
)
def mock_command(
    host: str,
    port: int,
    name: str | None,
    model: str,
    latency_ms: float,
    token_rate: float,
    tokens: int,
    threads: int,
) -> None:
    """Run a mock OpenAI-compatible LLM backend (chat completions, SSE streaming, /health, /v1/models).

    Per-request headers override the options and inject faults: X-Mock-Latency-Ms, X-Mock-Token-Rate,
    X-Mock-Tokens, X-Mock-Status (answer that status), X-Mock-Hang (never answer), X-Mock-Abort-After
    (drop the connection after N events). Tests steer it through POST /mock/health, GET /mock/stats and
    POST /mock/reset.
    """
    if not model:
        raise click.BadParameter("must not be empty", param_hint="--model")
    try:
        serve_mock(
            host,
            port,
            name=name,
            model=model,
            latency_ms=latency_ms,
            token_rate=token_rate,
            tokens=tokens,
            threads=threads,
        )
    except OSError as err:
        raise click.ClickException(f"cannot listen on {host}:{port}: {err}") from None
    # Granian's Rust threads outlive the embedded server; at interpreter teardown one of them often
    # panics ("panic in a function that cannot unwind") and sometimes aborts the process. The server has
    # stopped cleanly by now, so end the process before that teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    mock_command()
