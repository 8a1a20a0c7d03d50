"""A mock OpenAI-compatible LLM backend (`ntonix mock`) for the demo, the tests and the benchmarks.

It is an RSGI app served by Granian's embedded server. Endpoints:

- `POST /v1/chat/completions`: a deterministic "Echo: <last user message>" cut or padded to a number of
  words ("tokens"), either as one `chat.completion` object or as an SSE stream of `chat.completion.chunk`
  events ending in `data: [DONE]`, each event sent with its own `send_bytes` as soon as its time comes;
- `POST /v1/completions`: the same for a `prompt` (a string, a list of strings, a token array or a list of
  token arrays; one choice per prompt), as `text_completion` objects or chunks ending in `[DONE]`;
- `POST /v1/embeddings`: one vector per input (same four input shapes), derived from the input alone
  (xxhash-seeded Gaussian floats, normalised to length 1, rounded to float32), `dimensions` honoured
  (a shorter vector is a renormalised prefix of a longer one), `encoding_format` `float` or `base64`
  (little-endian float32, like OpenAI), `data[]` items carrying their `index`;
- `POST /v1/responses`: a Responses API `response` object, or with `"stream": true` its SSE events
  (`response.created` … `response.output_text.delta` … `response.completed`, no `[DONE]`);
- `POST /tokenize`: `{"tokens": […], "count": n, "max_model_len": …}` for a `prompt` or `messages`;
- `GET /v1/models` and `GET /v1/models/{id}`: the `--model` names (repeatable, the first is the default for
  requests that name none); `GET /health`.

The mock's tokens are whitespace-separated words: `usage.prompt_tokens` counts the prompt's words and a
token array's entries. Every answer carries `usage`; a stream carries it in a final chunk when
`stream_options.include_usage` is set (Responses: in `response.completed`). With `--model` given, a request
naming another model gets 404 `model_not_found` (like vLLM); without `--model` the mock lists `mock-model`
and answers to any name (`--any-model` keeps that leniency with `--model`).

KV prefix cache emulation (`--kv-capacity BLOCKS`, 0 = off, the default): the prompt text (chat and
Responses messages as `role: content` lines in order, a completion prompt as is) is cut into blocks of
`--kv-block-chars` characters with chained hashes, so a block counts as cached only when every block before
it is; an LRU of at most BLOCKS blocks per mock remembers them. Time to first token is the base latency plus
the uncached characters times `--prefill-us-per-char` (that cost applies with the cache off too). With the
cache on, `usage.prompt_tokens` is the prompt's characters / 4 (rounded up) and
`usage.prompt_tokens_details.cached_tokens` the cached characters / 4, in non-streamed answers and in the
usage chunk of streams. `/mock/stats` counts prompt characters (total and cached), requests per endpoint,
requests in flight now and at peak.

Latency before the first byte, token rate and token count come from the command line and can be overridden
per request with headers, which also inject faults, so one mock serves many tests:

- `X-Mock-Latency-Ms`, `X-Mock-Token-Rate`, `X-Mock-Tokens`: the knobs;
- `X-Mock-Status: N`: answer status N (400-599) with an OpenAI error body;
- `X-Mock-Hang: 1`: never answer, until the client leaves;
- `X-Mock-Abort-After: N`: drop the connection after N events (or N bytes of a non-streamed body);
  `X-Mock-Abort-Mode: clean` ends the stream properly instead, just without the rest;
- `X-Mock-Close-After-Done: 1`: send the whole stream, `[DONE]` included, then drop the connection abruptly
  instead of ending the body (Granian always ends a chunked body cleanly, even when the app raises, so the
  mock declares a content-length one byte longer than it sends);
- `X-Mock-Gzip: 1` (or `--gzip` for all): gzip non-streamed answers (`content-encoding: gzip`) when the
  client's Accept-Encoding allows it;
- `X-Mock-Shuffle: 1` (or `--shuffle`): embeddings `data[]` in an order other than the inputs';
- `X-Mock-Echo-Request-Id: 1`: answer with the request's `X-Request-ID` header.

Server-wide faults, like real servers: `--api-key KEY` (every `/v1/*` request needs
`Authorization: Bearer KEY`, else 401, like vLLM; `/health` stays open), `--no-health` (`GET /health` is a
404, like llama-cpp-python), `--uuid-request-ids` (a request whose `X-Request-ID` is not a UUID gets 400 with
an empty body, like llama-cpp-python), `--serial` (one request at a time, like a single-slot llama.cpp
server: further requests, `GET /v1/models` included, wait behind the running one; `/health` does not),
`--prefix /openai` (every route but `/mock/*` is served under that path prefix only, like a backend reached
as `https://host/openai`). A `/v1/...` route the mock does not serve is recorded for `/mock/requests` and
answered 404 like vLLM, or with `X-Mock-Echo: 1` 200 with the request's own body and content type.

Admin endpoints (not counted, not recorded, not behind `--api-key`/`--serial`): `POST /mock/health` steers
the health answer (`{"status", "delay_ms", "models_status"}`: the last makes `GET /v1/models` fail with that
status, to stand for a backend whose model list cannot be read), `GET /mock/stats` reads counters (including
streams whose client went away),
`GET /mock/requests[?limit=N]` the last requests (method, path, query, headers, body) so tests can check
what a gateway forwarded, `POST /mock/reset` zeroes counters, forgets recorded requests and empties the KV
cache. The hot paths stay cheap for benchmarks with thousands of open streams: chat answers are encoded once
per distinct request and reused with only the id and timestamp spliced in, and the only per-stream extra is
one disconnect watcher while the stream sleeps.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import dataclasses
import functools
import gzip
import itertools
import math
import os
import random
import signal
import socket
import struct
import sys
import time
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Annotated, Any, Final, Protocol, TypeVar

import click
import msgspec
import xxhash
from granian.constants import Interfaces
from granian.log import LogLevels
from granian.server.embed import Server

from ntonix.system import raise_open_files_limit

__all__ = ["MockApp", "MockOptions", "create_mock_app", "mock_command", "serve_mock"]


# --- the parts of Granian's RSGI protocol this module uses


class _Headers(Protocol):
    def items(self) -> list[tuple[str, str]]: ...


class _Scope(Protocol):
    proto: str
    method: str
    path: str
    query_string: str

    @property
    def headers(self) -> _Headers: ...


class _Transport(Protocol):
    def send_bytes(self, data: bytes) -> Awaitable[None]: ...


class _HTTPProtocol(Protocol):
    def __call__(self) -> Awaitable[bytes]: ...

    def client_disconnect(self) -> Awaitable[None]: ...

    def response_bytes(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None: ...

    def response_empty(self, status: int, headers: list[tuple[str, str]]) -> None: ...

    def response_stream(self, status: int, headers: list[tuple[str, str]]) -> _Transport: ...


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


class _CompletionRequest(msgspec.Struct):
    prompt: str | list[Any]
    model: str | None = None
    stream: bool | None = False
    stream_options: _StreamOptions | None = None
    max_tokens: int | None = None


class _EmbeddingRequest(msgspec.Struct):
    input: str | list[Any]
    model: str | None = None
    dimensions: Annotated[int, msgspec.Meta(ge=1, le=65536)] | None = None
    encoding_format: str | None = None


class _ResponseItem(msgspec.Struct):
    role: str | None = None
    content: str | list[_Part] | None = None


class _ResponsesRequest(msgspec.Struct):
    input: str | list[_ResponseItem]
    model: str | None = None
    instructions: str | None = None
    stream: bool | None = False
    max_output_tokens: int | None = None


class _TokenizeRequest(msgspec.Struct):
    prompt: str | None = None
    messages: list[_Message] | None = None
    model: str | None = None


class _HealthUpdate(msgspec.Struct, forbid_unknown_fields=True):
    status: Annotated[int, msgspec.Meta(ge=100, le=599)] = 200
    delay_ms: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    # What GET /v1/models answers: 200 = the model list, else that status with an error body.
    models_status: Annotated[int, msgspec.Meta(ge=200, le=599)] = 200


class _Stats(msgspec.Struct):
    """Counters served by `GET /mock/stats` (the admin endpoints themselves are not counted).

    `requests` counts every non-admin request, `requests_by_endpoint` the same per path (`/v1/models/{id}`
    for model lookups). `streams_*` count generation requests (chat, completions, responses) with
    `"stream": true` that got past forced status and parsing: completed (sent their last event),
    cancelled (the client went away, noticed by a failed send or by `client_disconnect`), or cut by
    `X-Mock-Abort-After` (`aborted`, which counts non-streamed cuts too); `closed_after_done` counts the
    completed streams dropped by `X-Mock-Close-After-Done`. `requests_cancelled` counts non-streamed
    requests, hangs and `--serial` waits whose client left before the answer; `rejected` the requests
    refused before their handler (bad API key, non-UUID request id). `in_flight` and `peak_in_flight`
    count POST requests being served (waiting for the `--serial` slot included; `waiting` is those).
    `prompt_chars_*` sum the prompt texts of generation requests and their KV-cached part; `kv_blocks` is
    the KV cache's size now, `kv_evictions` the blocks it dropped.
    """

    requests: int = 0
    chat_requests: int = 0
    health_requests: int = 0
    requests_by_endpoint: dict[str, int] = msgspec.field(default_factory=dict)
    streams_started: int = 0
    streams_completed: int = 0
    streams_cancelled: int = 0
    closed_after_done: int = 0
    aborted: int = 0
    requests_cancelled: int = 0
    rejected: int = 0
    in_flight: int = 0
    peak_in_flight: int = 0
    waiting: int = 0
    prompt_chars_total: int = 0
    prompt_chars_cached: int = 0
    kv_blocks: int = 0
    kv_evictions: int = 0
    last_headers: dict[str, str] | None = None
    last_body: str | None = None


_CHAT_DECODER: Final = msgspec.json.Decoder(_ChatRequest)
_COMPLETION_DECODER: Final = msgspec.json.Decoder(_CompletionRequest)
_EMBEDDING_DECODER: Final = msgspec.json.Decoder(_EmbeddingRequest)
_RESPONSES_DECODER: Final = msgspec.json.Decoder(_ResponsesRequest)
_TOKENIZE_DECODER: Final = msgspec.json.Decoder(_TokenizeRequest)
_HEALTH_DECODER: Final = msgspec.json.Decoder(_HealthUpdate)
_encode: Final = msgspec.json.encode

_DONE: Final = b"data: [DONE]\n\n"
_FILLER: Final = ("lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit", "sed", "do")
_ANSWER_CACHE_SIZE: Final = 4096
_VOCAB: Final = 32000
_MAX_MODEL_LEN: Final = 8192
_CHARS_PER_TOKEN: Final = 4
# Granian's default caps concurrent requests at backlog/workers (2048); benchmarks hold 10,000 streams.
_BACKPRESSURE: Final = 65536
_BACKLOG: Final = 2048


class _BadRequestError(Exception):
    """A request the mock refuses with 400 (bad JSON, bad `X-Mock-*` header, bad field)."""

    def __init__(self, message: str, code: str = "invalid_mock_header") -> None:
        super().__init__(message)
        self.code = code


def _error_body(message: str, type_: str, code: str | int | None, param: str | None = None) -> bytes:
    error: dict[str, Any] = {"message": message, "type": type_, "code": code}
    if param is not None:
        error["param"] = param
    return _encode({"error": error})


def _flag(headers: dict[str, str], name: str) -> bool:
    value = headers.get(name)
    return value is not None and value.strip().lower() not in ("", "0", "false", "no")


def _accepts_gzip(accept_encoding: str) -> bool:
    """Whether an Accept-Encoding value allows gzip (named or `*`, with a q-value above 0)."""
    allowed: bool | None = None
    for item in accept_encoding.split(","):
        coding, _, params = item.partition(";")
        coding = coding.strip().lower()
        if coding not in ("gzip", "*"):
            continue
        quality = 1.0
        for param in params.split(";"):
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        if coding == "gzip":
            return quality > 0
        allowed = quality > 0
    return bool(allowed)


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


# --- options and knobs


@dataclasses.dataclass(frozen=True, kw_only=True)
class MockOptions:
    """Server-wide behaviour beyond latency, rate and tokens (each is a `ntonix mock` option)."""

    any_model: bool = True  # answer requests for models not listed (False: 404 model_not_found)
    api_key: str | None = None
    kv_capacity: int = 0  # KV prefix cache size in blocks; 0 = no cache
    kv_block_chars: int = 64
    prefill_us_per_char: float = 0.0
    embedding_dimensions: int = 16
    health: bool = True  # False: GET /health answers 404
    uuid_request_ids: bool = False
    gzip: bool = False
    serial: bool = False
    shuffle: bool = False
    record: int = 256  # requests kept for /mock/requests
    prefix: str = ""  # path prefix every non-admin route is served under (like https://host/openai)

    def check(self) -> None:
        if self.kv_capacity < 0 or self.kv_block_chars < 1 or self.prefill_us_per_char < 0:
            raise ValueError("kv_capacity and prefill_us_per_char must not be negative, kv_block_chars >= 1")
        if self.embedding_dimensions < 1 or self.record < 0:
            raise ValueError("embedding_dimensions must be >= 1 and record >= 0")
        if self.prefix and (not self.prefix.startswith("/") or self.prefix.endswith("/")):
            raise ValueError("prefix must start with / and not end with /")


class _Knobs:
    """What one request asks of the mock: defaults from the CLI, overridden by `X-Mock-*` headers."""

    __slots__ = (
        "abort_after",
        "abort_clean",
        "close_after_done",
        "hang",
        "interval",
        "latency",
        "status",
        "tokens",
    )

    def __init__(self, latency: float, interval: float, tokens: int) -> None:
        self.latency = latency
        self.interval = interval
        self.tokens = tokens
        self.status = 200
        self.hang = False
        self.abort_after: int | None = None
        self.abort_clean = False
        self.close_after_done = False


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
    knobs.hang = _flag(headers, "x-mock-hang")
    if "x-mock-abort-after" in headers:
        knobs.abort_after = _header_value(headers, "x-mock-abort-after", int, 0, 10_000_000)
        knobs.abort_clean = headers.get("x-mock-abort-mode", "reset").strip().lower() == "clean"
    knobs.close_after_done = _flag(headers, "x-mock-close-after-done")
    return knobs


# --- text, tokens and vectors


def _text_of(content: str | list[_Part] | None) -> str:
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


def _token_ids(text: str) -> list[int]:
    return [xxhash.xxh32_intdigest(word.encode()) % _VOCAB for word in text.split()]


def _prompt_list(value: str | list[Any], field: str) -> list[str]:
    """A `prompt`/`input` (string, list of strings, token array, list of token arrays) as texts.

    A token array becomes its ids as words, so it has as many mock tokens as entries.
    """
    if isinstance(value, str):
        return [value]
    if not value:
        raise _BadRequestError(f"`{field}` must not be an empty list", "invalid_value")
    if all(isinstance(item, str) for item in value):
        return list(value)
    if all(isinstance(item, int) and not isinstance(item, bool) for item in value):
        return [" ".join(map(str, value))]
    if all(isinstance(item, list) for item in value):
        texts = []
        for item in value:
            if not item or not all(isinstance(t, int) and not isinstance(t, bool) for t in item):
                raise _BadRequestError(
                    f"`{field}`: token arrays must be non-empty lists of integers", "invalid_value"
                )
            texts.append(" ".join(map(str, item)))
        return texts
    raise _BadRequestError(
        f"`{field}` must be a string, a list of strings, a token array or a list of token arrays",
        "invalid_value",
    )


def _vector(key: str, dimensions: int) -> tuple[list[float], str]:
    """The embedding of `key`: unit-length float32 values and their little-endian base64 form."""
    rng = random.Random(xxhash.xxh64_intdigest(key.encode()))
    values = [rng.gauss(0.0, 1.0) for _ in range(dimensions)]
    norm = math.sqrt(math.fsum(v * v for v in values)) or 1.0
    packed = struct.pack(f"<{dimensions}f", *(v / norm for v in values))
    return list(struct.unpack(f"<{dimensions}f", packed)), base64.b64encode(packed).decode()


class _PrefixCache:
    """An LRU of prompt-prefix blocks with chained hashes: a block counts only if all before it do."""

    __slots__ = ("_blocks", "block_chars", "capacity", "evictions")

    def __init__(self, capacity: int, block_chars: int) -> None:
        self.capacity = capacity
        self.block_chars = block_chars
        self.evictions = 0
        self._blocks: collections.OrderedDict[int, None] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def clear(self) -> None:
        self._blocks.clear()
        self.evictions = 0

    def admit(self, text: str) -> int:
        """Characters of `text`'s longest cached prefix, then cache all its whole blocks."""
        if not self.capacity:
            return 0
        size = self.block_chars
        chain: list[int] = []
        digest = 0
        for start in range(0, len(text) - size + 1, size):
            digest = xxhash.xxh64_intdigest(text[start : start + size].encode(), seed=digest)
            chain.append(digest)
        blocks = self._blocks
        hit = 0
        for digest in chain:
            if digest not in blocks:
                break
            hit += 1
        # Touched last block first, so a prompt's first blocks are the most recent and evicted last
        # (like vLLM, which frees a sequence's blocks in reverse): an evicted tail still leaves a prefix.
        for digest in reversed(chain):
            if digest in blocks:
                blocks.move_to_end(digest)
            else:
                blocks[digest] = None
        while len(blocks) > self.capacity:
            blocks.popitem(last=False)
            self.evictions += 1
        return hit * size


# --- answers


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if cached_tokens is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return usage


class _Answer:
    """One distinct chat answer, encoded once: all but the id and the timestamp, which are spliced in."""

    __slots__ = ("body_tail", "chunk_tails", "content", "model_part", "ticks", "tokens", "usage_tail")

    def __init__(
        self, model: str, fingerprint: str, words: list[str], usage: dict[str, Any], finish: str
    ) -> None:
        self.content = " ".join(words)
        self.tokens = len(words)
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
        # Event 0 is the role, event k (1..n) token k; the finish, usage and [DONE] events come with token n.
        n = self.tokens
        self.ticks = [min(index, n) for index in range(len(deltas) + 2)]


class _Reply:
    """What a generation endpoint will send: when (prefill, tokens) and what (a body or SSE events)."""

    __slots__ = ("body", "events", "prefill", "ticks", "tokens")

    def __init__(
        self,
        tokens: int,
        prefill: float,
        body: bytes = b"",
        events: Iterator[bytes] | None = None,
        ticks: Sequence[int] = (),
    ) -> None:
        self.tokens = tokens
        self.prefill = prefill
        self.body = body
        self.events = events  # None: a non-streamed answer
        self.ticks = ticks  # per event, the token it comes with: token k >= 2 is due k-1 intervals in


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


class _Call:
    """One request on its way through the mock."""

    __slots__ = ("body", "extra_headers", "gzip", "headers", "proto", "scope", "watch")

    def __init__(self, scope: _Scope, proto: _HTTPProtocol, headers: dict[str, str], body: bytes) -> None:
        self.scope = scope
        self.proto = proto
        self.headers = headers
        self.body = body
        self.extra_headers: list[tuple[str, str]] = []
        self.gzip = False
        self.watch: _DisconnectWatch | None = None

    def watch_disconnect(self) -> None:
        """From now on, cancel the handler as soon as the client leaves (not possible on Rust tasks)."""
        if self.watch is None and (task := asyncio.current_task()) is not None:
            self.watch = _DisconnectWatch(self.proto, task)

    async def pause(self, seconds: float) -> None:
        self.watch_disconnect()
        await asyncio.sleep(seconds)

    @property
    def watch_fired(self) -> bool:
        return self.watch is not None and self.watch.fired

    def close(self) -> None:
        if self.watch is not None:
            self.watch.close()
            self.watch = None


_Handler = Callable[[_Call], Awaitable[None]]
_Generator = Callable[[_Call, _Knobs], "_Reply | None"]

_ADMIN: Final = 0
_HEALTH: Final = 1
_PUBLIC: Final = 2
_MODEL_ROUTE: Final = "/v1/models/{id}"
_REQUEST_KINDS: Final = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completion",
    "/v1/embeddings": "embedding",
    "/v1/responses": "responses",
    "/tokenize": "tokenize",
}


# --- the app


class MockApp:
    """RSGI app of one mock backend; `close()` ends every request in flight so the server can stop."""

    def __init__(
        self,
        name: str,
        model: str | Sequence[str],
        latency_ms: float,
        token_rate: float,
        tokens: int,
        options: MockOptions | None = None,
    ) -> None:
        self.name = name
        self.models = [model] if isinstance(model, str) else list(dict.fromkeys(model))
        if not self.models or not all(self.models):
            raise ValueError("model names must not be empty")
        self.model = self.models[0]
        self.options = options or MockOptions()
        self.options.check()
        self.defaults = _Knobs(latency_ms / 1000.0, 1.0 / token_rate if token_rate > 0 else 0.0, tokens)
        self.stats = _Stats()
        self.kv = _PrefixCache(self.options.kv_capacity, self.options.kv_block_chars)
        self._prefill_on = bool(self.options.kv_capacity or self.options.prefill_us_per_char)
        self._recorded: collections.deque[tuple[str, str, str, list[tuple[str, str]], bytes]] = (
            collections.deque(maxlen=self.options.record)
        )
        self._slot = asyncio.Lock() if self.options.serial else None
        self._health_status = 200
        self._health_delay = 0.0
        self._models_status = 200
        self._answers: dict[tuple[Any, ...], _Answer] = {}
        self._vectors: dict[tuple[str, int], tuple[list[float], str]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._ids = itertools.count(1)
        self._id_hex = os.urandom(4).hex()
        self._id_prefix = b"chatcmpl-" + self._id_hex.encode() + b"-"
        self._json_headers = [("content-type", "application/json"), ("x-mock-name", name)]
        self._sse_headers = [
            ("content-type", "text/event-stream"),
            ("cache-control", "no-cache"),
            ("x-mock-name", name),
        ]
        created = int(time.time())
        self._model_objects = {
            m: {
                "id": m,
                "object": "model",
                "created": created,
                "owned_by": name,
                "max_model_len": _MAX_MODEL_LEN,
            }
            for m in self.models
        }
        self._models_body = _encode({"object": "list", "data": list(self._model_objects.values())})
        self._routes: dict[str, tuple[int, dict[str, _Handler]]] = {
            "/v1/chat/completions": (
                _PUBLIC,
                {"POST": functools.partial(self._generate, prepare=self._chat)},
            ),
            "/v1/completions": (
                _PUBLIC,
                {"POST": functools.partial(self._generate, prepare=self._completions)},
            ),
            "/v1/embeddings": (
                _PUBLIC,
                {"POST": functools.partial(self._generate, prepare=self._embeddings)},
            ),
            "/v1/responses": (_PUBLIC, {"POST": functools.partial(self._generate, prepare=self._responses)}),
            "/tokenize": (_PUBLIC, {"POST": functools.partial(self._generate, prepare=self._tokenize)}),
            "/v1/models": (_PUBLIC, {"GET": self._models}),
            _MODEL_ROUTE: (_PUBLIC, {"GET": self._model}),
            "/health": (_HEALTH, {"GET": self._health}),
            "/mock/health": (_ADMIN, {"POST": self._set_health}),
            "/mock/stats": (_ADMIN, {"GET": self._stats}),
            "/mock/requests": (_ADMIN, {"GET": self._requests}),
            "/mock/reset": (_ADMIN, {"POST": self._reset}),
        }

    async def __rsgi__(self, scope: _Scope, proto: _HTTPProtocol) -> None:
        if scope.proto != "http":
            return
        path = scope.path
        prefix = self.options.prefix
        if prefix and not path.startswith("/mock/"):
            path = path[len(prefix) :] if path.startswith(prefix + "/") else ""
        route = self._routes.get(path)
        if route is None and path.startswith("/v1/models/") and len(path) > len("/v1/models/"):
            path = _MODEL_ROUTE
            route = self._routes[path]
        if route is None:
            if path.startswith("/v1/"):
                await self._unknown_v1(scope, proto)
                return
            self._error(proto, 404, f"no route for {scope.path}", "invalid_request_error", "not_found")
            return
        kind, methods = route
        handler = methods.get(scope.method)
        if handler is None:
            allowed = ", ".join(methods)
            self._error(proto, 405, f"{scope.path} accepts {allowed}", "invalid_request_error", "bad_method")
            return
        task = asyncio.current_task()
        if task is not None:  # None on Granian's Rust task implementation: served, but not cancellable
            self._tasks.add(task)
        call: _Call | None = None
        try:
            body = await proto() if scope.method == "POST" else b""
            call = _Call(scope, proto, dict(scope.headers.items()), body)
            if kind == _ADMIN:
                await handler(call)
            else:
                await self._public(call, path, kind, handler)
        except asyncio.CancelledError:
            if call is not None and call.watch_fired:
                self.stats.requests_cancelled += 1
            elif not self._closing:
                raise
        finally:
            if call is not None:
                call.close()
            if task is not None:
                self._tasks.discard(task)

    async def _unknown_v1(self, scope: _Scope, proto: _HTTPProtocol) -> None:
        """A `/v1/...` route the mock does not serve: recorded (not counted), then 401 or 404 like vLLM.

        With `X-Mock-Echo: 1` the request's body comes back as the answer (200, same content type), so a
        test can see what a gateway forwards on routes it does not know, both ways.
        """
        headers = dict(scope.headers.items())
        body = await proto() if scope.method == "POST" else b""
        self._recorded.append((scope.method, scope.path, scope.query_string, scope.headers.items(), body))
        if not self._authorised(headers):
            self._unauthorised(proto, [])
        elif _flag(headers, "x-mock-echo"):
            content_type = headers.get("content-type", "application/octet-stream")
            proto.response_bytes(200, [("content-type", content_type), ("x-mock-name", self.name)], body)
        else:
            self._error(proto, 404, f"no route for {scope.path}", "invalid_request_error", "not_found")

    def close(self) -> None:
        """End every request in flight (hangs, sleeps, streams), so Granian's graceful stop is prompt."""
        self._closing = True
        for task in list(self._tasks):
            task.cancel()

    # --- what every non-admin request goes through

    async def _public(self, call: _Call, path: str, kind: int, handler: _Handler) -> None:
        scope = call.scope
        self._recorded.append(
            (scope.method, scope.path, scope.query_string, scope.headers.items(), call.body)
        )
        self.stats.requests += 1
        self.stats.requests_by_endpoint[path] = self.stats.requests_by_endpoint.get(path, 0) + 1
        if path == "/v1/chat/completions":
            self.stats.chat_requests += 1
        headers = call.headers
        request_id = headers.get("x-request-id")
        if request_id is not None:
            if self.options.uuid_request_ids and not _is_uuid(request_id):
                self.stats.rejected += 1
                call.proto.response_empty(400, [])
                return
            if _flag(headers, "x-mock-echo-request-id"):
                call.extra_headers.append(("x-request-id", request_id))
        if kind == _HEALTH:
            await handler(call)
            return
        if path.startswith("/v1/") and not self._authorised(headers):
            self.stats.rejected += 1
            self._unauthorised(call.proto, call.extra_headers)
            return
        call.gzip = (self.options.gzip or _flag(headers, "x-mock-gzip")) and _accepts_gzip(
            headers.get("accept-encoding", "")
        )
        counted = scope.method == "POST"
        if counted:
            self.stats.in_flight += 1
            if self.stats.in_flight > self.stats.peak_in_flight:
                self.stats.peak_in_flight = self.stats.in_flight
        try:
            slot = self._slot
            if slot is None:
                await handler(call)
                return
            if slot.locked():
                call.watch_disconnect()
            self.stats.waiting += 1
            try:
                await slot.acquire()
            finally:
                self.stats.waiting -= 1
            try:
                await handler(call)
            finally:
                slot.release()
        finally:
            if counted:
                self.stats.in_flight -= 1

    def _authorised(self, headers: dict[str, str]) -> bool:
        key = self.options.api_key
        return key is None or headers.get("authorization", "") == f"Bearer {key}"

    def _unauthorised(self, proto: _HTTPProtocol, extra: list[tuple[str, str]]) -> None:
        body = _error_body(
            "Incorrect API key provided; send Authorization: Bearer <key>.",
            "invalid_request_error",
            "invalid_api_key",
        )
        proto.response_bytes(401, [*self._json_headers, *extra], body)

    def _headers(self, call: _Call) -> list[tuple[str, str]]:
        return [*self._json_headers, *call.extra_headers] if call.extra_headers else self._json_headers

    def _error(
        self,
        proto: _HTTPProtocol,
        status: int,
        message: str,
        type_: str,
        code: str | int,
        headers: list[tuple[str, str]] | None = None,
        param: str | None = None,
    ) -> None:
        proto.response_bytes(status, headers or self._json_headers, _error_body(message, type_, code, param))

    def _send_json(self, call: _Call, body: bytes) -> None:
        if call.gzip:
            headers = [*self._headers(call), ("content-encoding", "gzip"), ("vary", "accept-encoding")]
            call.proto.response_bytes(200, headers, gzip.compress(body, compresslevel=1, mtime=0))
        else:
            call.proto.response_bytes(200, self._headers(call), body)

    def _resolve_model(self, call: _Call, requested: str | None) -> str | None:
        """The model a request is for, or None after answering 404 for one this mock does not serve."""
        model = requested or self.model
        if self.options.any_model or model in self._model_objects:
            return model
        message = f"The model `{model}` does not exist (this backend serves {', '.join(self.models)})."
        self._error(
            call.proto, 404, message, "invalid_request_error", "model_not_found", self._headers(call), "model"
        )
        return None

    # --- small endpoints

    async def _health(self, call: _Call) -> None:
        self.stats.health_requests += 1
        if not self.options.health:
            call.proto.response_bytes(404, self._headers(call), b'{"detail":"Not Found"}')
            return
        if self._health_delay:
            await asyncio.sleep(self._health_delay)
        status = self._health_status
        body = b'{"status":"ok"}' if status < 400 else b'{"status":"unhealthy"}'
        call.proto.response_bytes(status, self._headers(call), body)

    async def _models(self, call: _Call) -> None:
        if self._models_status != 200:
            message = f"{self.name}: status {self._models_status} set by POST /mock/health"
            self._error(call.proto, self._models_status, message, "server_error", "mock_forced_status")
            return
        self._send_json(call, self._models_body)

    async def _model(self, call: _Call) -> None:
        model_id = urllib.parse.unquote(call.scope.path[len(self.options.prefix) + len("/v1/models/") :])
        model = self._model_objects.get(model_id)
        if model is None:
            message = f"The model `{model_id}` does not exist."
            self._error(
                call.proto,
                404,
                message,
                "invalid_request_error",
                "model_not_found",
                self._headers(call),
                "model",
            )
            return
        self._send_json(call, _encode(model))

    async def _set_health(self, call: _Call) -> None:
        try:
            update = _HEALTH_DECODER.decode(call.body)
        except msgspec.DecodeError as err:
            self._error(
                call.proto,
                400,
                f"expected {{'status': int, 'delay_ms': float}}: {err}",
                "invalid_request_error",
                "invalid_json",
            )
            return
        self._health_status = update.status
        self._health_delay = update.delay_ms / 1000.0
        self._models_status = update.models_status
        call.proto.response_bytes(200, self._json_headers, _encode(update))

    async def _stats(self, call: _Call) -> None:
        self.stats.kv_blocks = len(self.kv)
        self.stats.kv_evictions = self.kv.evictions
        call.proto.response_bytes(200, self._json_headers, _encode(self.stats))

    async def _requests(self, call: _Call) -> None:
        query = urllib.parse.parse_qs(call.scope.query_string)
        recorded = list(self._recorded)
        try:
            limit = int(query.get("limit", [str(len(recorded))])[0])
        except ValueError:
            self._error(call.proto, 400, "limit must be an integer", "invalid_request_error", "invalid_value")
            return
        items = []
        for method, path, query_string, header_list, body in recorded[-limit:] if limit > 0 else []:
            joined: dict[str, str] = {}
            for name, value in header_list:
                joined[name] = f"{joined[name]}, {value}" if name in joined else value
            items.append(
                {
                    "method": method,
                    "path": path,
                    "query": query_string,
                    "headers": joined,
                    "header_list": header_list,
                    "body": body.decode("utf-8", "replace"),
                }
            )
        call.proto.response_bytes(200, self._json_headers, _encode({"requests": items}))

    async def _reset(self, call: _Call) -> None:
        # in_flight and waiting are gauges of live requests, not counters: zeroing them would drive them
        # negative.
        old = self.stats
        self.stats = _Stats(in_flight=old.in_flight, peak_in_flight=old.in_flight, waiting=old.waiting)
        self.kv.clear()
        self._recorded.clear()
        call.proto.response_bytes(200, self._json_headers, _encode(self.stats))

    # --- generation endpoints: what they share

    async def _generate(self, call: _Call, prepare: _Generator) -> None:
        streaming = False
        proto = call.proto
        try:
            headers = call.headers
            self.stats.last_headers = headers
            self.stats.last_body = call.body.decode("utf-8", "replace")
            try:
                knobs = _parse_knobs(headers, self.defaults)
            except _BadRequestError as err:
                self._error(proto, 400, str(err), "invalid_request_error", err.code, self._headers(call))
                return
            if knobs.hang:
                await proto.client_disconnect()
                self.stats.requests_cancelled += 1
                return
            if knobs.latency or knobs.interval:
                call.watch_disconnect()
            if knobs.status != 200:
                if knobs.latency:
                    await call.pause(knobs.latency)
                type_ = "server_error" if knobs.status >= 500 else "invalid_request_error"
                message = f"{self.name}: status {knobs.status} forced by X-Mock-Status"
                self._error(proto, knobs.status, message, type_, "mock_forced_status", self._headers(call))
                return
            try:
                reply = prepare(call, knobs)
            except msgspec.DecodeError as err:
                what = _REQUEST_KINDS.get(call.scope.path, "")
                self._error(
                    proto,
                    400,
                    f"invalid {what} request: {err}",
                    "invalid_request_error",
                    "invalid_json",
                    self._headers(call),
                )
                return
            except _BadRequestError as err:
                self._error(proto, 400, str(err), "invalid_request_error", err.code, self._headers(call))
                return
            if reply is None:  # answered already (404 model_not_found)
                return
            streaming = reply.events is not None
            if streaming:
                self.stats.streams_started += 1
            # A non-streamed answer is ready when its stream would have ended: latency plus generation.
            delay = knobs.latency + reply.prefill
            if not streaming:
                delay += knobs.interval * max(reply.tokens - 1, 0)
            if delay:
                await call.pause(delay)
            if reply.events is not None:
                await self._stream(call, reply.events, reply.ticks, knobs)
            else:
                await self._complete(call, reply.body, knobs)
        except asyncio.CancelledError:
            if not call.watch_fired:
                raise
            if streaming:
                self.stats.streams_cancelled += 1
            else:
                self.stats.requests_cancelled += 1

    def _admit(self, text: str) -> tuple[float, int]:
        """Run a prompt text through the KV cache: its prefill time and cached characters."""
        cached = self.kv.admit(text)
        self.stats.prompt_chars_total += len(text)
        self.stats.prompt_chars_cached += cached
        return (len(text) - cached) * self.options.prefill_us_per_char / 1e6, cached

    def _prompt_usage(self, words: int, chars: int, cached_chars: int) -> tuple[int, int | None]:
        """`prompt_tokens` and `cached_tokens` (None with the KV cache off) for a prompt."""
        if not self.kv.capacity:
            return words, None
        return -(-chars // _CHARS_PER_TOKEN), cached_chars // _CHARS_PER_TOKEN

    def _next_id(self) -> str:
        return f"{self._id_hex}-{next(self._ids):x}"

    def _head(self, kind: bytes) -> bytes:
        rid = b"%s%x" % (self._id_prefix, next(self._ids))
        return b'{"id":"%s","object":"%s","created":%d,' % (rid, kind, int(time.time()))

    async def _complete(self, call: _Call, body: bytes, knobs: _Knobs) -> None:
        if knobs.abort_after is None:
            self._send_json(call, body)
            return
        # A declared length longer than what is sent makes Granian drop the connection mid-body, which is
        # what a crashing backend looks like; a stream that merely ends would be a clean, complete answer.
        self.stats.aborted += 1
        headers = [*self._headers(call), ("content-length", str(len(body)))]
        transport = call.proto.response_stream(200, headers)
        cut = min(knobs.abort_after, len(body) - 1)
        if cut:
            await transport.send_bytes(body[:cut])

    async def _stream(
        self, call: _Call, events: Iterator[bytes], ticks: Sequence[int], knobs: _Knobs
    ) -> None:
        headers = [*self._sse_headers, *call.extra_headers] if call.extra_headers else self._sse_headers
        limit = -1
        if knobs.abort_after is not None or knobs.close_after_done:
            every = list(events)
            events = iter(every)
            total = sum(map(len, every))
            if knobs.abort_after is not None:
                limit = min(knobs.abort_after, len(every) - 1)
                if not knobs.abort_clean:  # see _complete: a longer declared length makes it a real abort
                    headers = [*headers, ("content-length", str(total))]
            else:  # everything is sent, then the connection drops for the one byte still owed
                headers = [*headers, ("content-length", str(total + 1))]
        transport = call.proto.response_stream(200, headers)
        interval = knobs.interval
        start = time.monotonic()
        for index, event in enumerate(events):
            if index == limit:
                self.stats.aborted += 1
                return
            if interval and ticks[index] > 1:
                delay = start + (ticks[index] - 1) * interval - time.monotonic()
                if delay > 0:
                    await call.pause(delay)
            try:
                await transport.send_bytes(event)
            except RuntimeError:  # Granian's ProtocolClosed/ProtocolError: the client went away
                self.stats.streams_cancelled += 1
                return
        self.stats.streams_completed += 1
        if knobs.close_after_done and knobs.abort_after is None:
            self.stats.closed_after_done += 1

    # --- chat completions

    def _chat(self, call: _Call, knobs: _Knobs) -> _Reply | None:
        request = _CHAT_DECODER.decode(call.body)
        model = self._resolve_model(call, request.model)
        if model is None:
            return None
        pairs = [(m.role, _text_of(m.content)) for m in request.messages]
        prompt = ""
        for role, text in reversed(pairs):
            if role == "user":
                prompt = text
                break
        words = 0
        for _, text in pairs:
            words += len(text.split())
        if self._prefill_on:
            prompt_text = "".join([f"{role}: {text}\n" for role, text in pairs])
            prefill, cached = self._admit(prompt_text)
            prompt_tokens, cached_tokens = self._prompt_usage(words, len(prompt_text), cached)
        else:  # the hot path of benchmarks: the same counts without building the text
            prefill, prompt_tokens, cached_tokens = 0.0, words, None
            self.stats.prompt_chars_total += sum([len(role) + len(text) + 3 for role, text in pairs])
        tokens = knobs.tokens
        limit = request.max_completion_tokens or request.max_tokens
        finish = "stop"
        if limit is not None and 0 < limit < tokens:
            tokens, finish = limit, "length"
        key = (model, prompt, tokens, prompt_tokens, cached_tokens, finish)
        answer = self._answers.get(key)
        if answer is None:
            if len(self._answers) >= _ANSWER_CACHE_SIZE:
                del self._answers[next(iter(self._answers))]
            usage = _usage(prompt_tokens, tokens, cached_tokens)
            answer = _Answer(model, self.name, _answer_words(prompt, tokens), usage, finish)
            self._answers[key] = answer
        if not request.stream:
            return _Reply(answer.tokens, prefill, body=self._head(b"chat.completion") + answer.body_tail)
        options = request.stream_options
        include_usage = bool(options and options.include_usage)
        return _Reply(
            answer.tokens, prefill, events=self._chat_events(answer, include_usage), ticks=answer.ticks
        )

    def _chat_events(self, answer: _Answer, include_usage: bool) -> Iterator[bytes]:
        head = b"data: " + self._head(b"chat.completion.chunk") + answer.model_part
        for tail in answer.chunk_tails:
            yield head + tail
        if include_usage:
            yield head + answer.usage_tail
        yield _DONE

    # --- text completions

    def _completions(self, call: _Call, knobs: _Knobs) -> _Reply | None:
        request = _COMPLETION_DECODER.decode(call.body)
        prompts = _prompt_list(request.prompt, "prompt")
        model = self._resolve_model(call, request.model)
        if model is None:
            return None
        prefill = 0.0
        chars = cached_chars = 0
        for prompt in prompts:
            seconds, cached = self._admit(prompt)
            prefill += seconds
            chars += len(prompt)
            cached_chars += cached
        prompt_tokens, cached_tokens = self._prompt_usage(
            sum(len(p.split()) for p in prompts), chars, cached_chars
        )
        tokens, finish = knobs.tokens, "stop"
        if request.max_tokens is not None and 0 < request.max_tokens < tokens:
            tokens, finish = request.max_tokens, "length"
        answers = [_answer_words(prompt, tokens) for prompt in prompts]
        usage = _usage(prompt_tokens, tokens * len(prompts), cached_tokens)
        identity = {
            "id": f"cmpl-{self._next_id()}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": self.name,
        }
        if not request.stream:
            choices = [
                {"index": i, "text": " ".join(words), "logprobs": None, "finish_reason": finish}
                for i, words in enumerate(answers)
            ]
            return _Reply(tokens, prefill, body=_encode({**identity, "choices": choices, "usage": usage}))
        events: list[bytes] = []
        ticks: list[int] = []

        def event(choices: list[dict[str, Any]], tick: int, **extra: Any) -> None:
            events.append(b"data: " + _encode({**identity, "choices": choices, **extra}) + b"\n\n")
            ticks.append(tick)

        for position in range(tokens):
            for i, words in enumerate(answers):
                text = words[position] if position == 0 else " " + words[position]
                event([{"index": i, "text": text, "logprobs": None, "finish_reason": None}], position + 1)
        for i in range(len(answers)):
            event([{"index": i, "text": "", "logprobs": None, "finish_reason": finish}], tokens)
        options = request.stream_options
        if options and options.include_usage:
            event([], tokens, usage=usage)
        events.append(_DONE)
        ticks.append(tokens)
        return _Reply(tokens, prefill, events=iter(events), ticks=ticks)

    # --- embeddings

    def _embeddings(self, call: _Call, knobs: _Knobs) -> _Reply | None:
        request = _EMBEDDING_DECODER.decode(call.body)
        texts = _prompt_list(request.input, "input")
        token_input = not isinstance(request.input, str) and not isinstance(request.input[0], str)
        encoding = request.encoding_format or "float"
        if encoding not in ("float", "base64"):
            raise _BadRequestError(
                f"encoding_format must be 'float' or 'base64', not {encoding!r}", "invalid_value"
            )
        model = self._resolve_model(call, request.model)
        if model is None:
            return None
        dimensions = request.dimensions or self.options.embedding_dimensions
        data = []
        for index, text in enumerate(texts):
            key = ("tokens:" if token_input else "text:") + text
            vector = self._vectors.get((key, dimensions))
            if vector is None:
                if len(self._vectors) >= _ANSWER_CACHE_SIZE:
                    del self._vectors[next(iter(self._vectors))]
                vector = self._vectors[(key, dimensions)] = _vector(key, dimensions)
            embedding = vector[1] if encoding == "base64" else vector[0]
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        if len(data) > 1 and (self.options.shuffle or _flag(call.headers, "x-mock-shuffle")):
            order = list(range(len(data)))
            random.Random(xxhash.xxh64_intdigest(call.body)).shuffle(order)
            if order == sorted(order):
                order.reverse()
            data = [data[i] for i in order]
        prompt_tokens = sum(len(t.split()) for t in texts)
        usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
        body = _encode({"object": "list", "data": data, "model": model, "usage": usage})
        return _Reply(1, 0.0, body=body)

    # --- tokenize

    def _tokenize(self, call: _Call, knobs: _Knobs) -> _Reply | None:
        request = _TOKENIZE_DECODER.decode(call.body)
        if request.prompt is not None:
            text = request.prompt
        elif request.messages is not None:
            text = " ".join(_text_of(m.content) for m in request.messages)
        else:
            raise _BadRequestError("a tokenize request needs `prompt` or `messages`", "invalid_value")
        if self._resolve_model(call, request.model) is None:
            return None
        tokens = _token_ids(text)
        body = _encode({"tokens": tokens, "count": len(tokens), "max_model_len": _MAX_MODEL_LEN})
        return _Reply(1, 0.0, body=body)

    # --- responses

    def _responses(self, call: _Call, knobs: _Knobs) -> _Reply | None:
        request = _RESPONSES_DECODER.decode(call.body)
        model = self._resolve_model(call, request.model)
        if model is None:
            return None
        if isinstance(request.input, str):
            items = [("user", request.input)]
        else:
            items = [(item.role or "user", _text_of(item.content)) for item in request.input]
        if request.instructions:
            items.insert(0, ("system", request.instructions))
        prompt = next((text for role, text in reversed(items) if role == "user"), "")
        prompt_text = "".join(f"{role}: {text}\n" for role, text in items)
        prefill, cached = self._admit(prompt_text)
        input_tokens, cached_tokens = self._prompt_usage(
            sum(len(text.split()) for _, text in items), len(prompt_text), cached
        )
        tokens, incomplete = knobs.tokens, False
        if request.max_output_tokens is not None and 0 < request.max_output_tokens < tokens:
            tokens, incomplete = request.max_output_tokens, True
        words = _answer_words(prompt, tokens)
        text = " ".join(words)
        serial = self._next_id()
        rid, mid = f"resp_{serial}", f"msg_{serial}"
        usage = {
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": cached_tokens or 0},
            "output_tokens": tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + tokens,
        }
        status = "incomplete" if incomplete else "completed"

        def part(text: str) -> dict[str, Any]:
            return {"type": "output_text", "text": text, "annotations": []}

        def message(status: str, content: list[dict[str, Any]]) -> dict[str, Any]:
            return {"type": "message", "id": mid, "status": status, "role": "assistant", "content": content}

        def response(
            status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None
        ) -> dict[str, Any]:
            return {
                "id": rid,
                "object": "response",
                "created_at": int(time.time()),
                "status": status,
                "error": None,
                "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                "instructions": request.instructions,
                "max_output_tokens": request.max_output_tokens,
                "model": model,
                "output": output,
                "parallel_tool_calls": True,
                "previous_response_id": None,
                "temperature": 1.0,
                "text": {"format": {"type": "text"}},
                "tool_choice": "auto",
                "tools": [],
                "top_p": 1.0,
                "truncation": "disabled",
                "usage": usage,
                "metadata": {},
            }

        done = message("completed", [part(text)])
        if not request.stream:
            return _Reply(tokens, prefill, body=_encode(response(status, [done], usage)))
        events: list[bytes] = []
        ticks: list[int] = []

        def event(type_: str, tick: int, **fields: Any) -> None:
            data = _encode({"type": type_, "sequence_number": len(events), **fields})
            events.append(b"event: %s\ndata: %s\n\n" % (type_.encode(), data))
            ticks.append(tick)

        at = {"output_index": 0, "item_id": mid, "content_index": 0}
        event("response.created", 0, response=response("in_progress", [], None))
        event("response.in_progress", 0, response=response("in_progress", [], None))
        event("response.output_item.added", 0, output_index=0, item=message("in_progress", []))
        event("response.content_part.added", 0, **at, part=part(""))
        for index, word in enumerate(words):
            event("response.output_text.delta", index + 1, **at, delta=word if index == 0 else " " + word)
        event("response.output_text.done", tokens, **at, text=text)
        event("response.content_part.done", tokens, **at, part=part(text))
        event("response.output_item.done", tokens, output_index=0, item=done)
        event(f"response.{status}", tokens, response=response(status, [done], usage))
        return _Reply(tokens, prefill, events=iter(events), ticks=ticks)


def create_mock_app(
    name: str,
    model: str | Sequence[str] = "mock-model",
    latency_ms: float = 0.0,
    token_rate: float = 0.0,
    tokens: int = 16,
    options: MockOptions | None = None,
) -> MockApp:
    """Build the RSGI app of one mock backend (serve it with Granian, or with `serve_mock`)."""
    if latency_ms < 0 or token_rate < 0 or tokens < 0:
        raise ValueError("latency_ms, token_rate and tokens must not be negative")
    return MockApp(name, model, latency_ms, token_rate, tokens, options)


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
    model: str | Sequence[str] = "mock-model",
    latency_ms: float = 0.0,
    token_rate: float = 0.0,
    tokens: int = 16,
    threads: int = 1,
    options: MockOptions | None = None,
) -> None:
    """Serve a mock backend on host:port until SIGTERM or SIGINT, then return.

    A process that ends after this should leave with `os._exit` (as `mock_command` does): Granian's Rust
    threads may otherwise panic during interpreter teardown.
    """
    app = create_mock_app(name or f"mock-{port}", model, latency_ms, token_rate, tokens, options)
    _check_port_free(host, port)
    raise_open_files_limit()
    extras = []
    opts = app.options
    if opts.kv_capacity:
        extras.append(f"KV cache {opts.kv_capacity} blocks of {opts.kv_block_chars} chars")
    if opts.prefill_us_per_char:
        extras.append(f"prefill {opts.prefill_us_per_char:g} us/char")
    for flag, label in ((opts.serial, "serial"), (opts.api_key, "API key"), (not opts.health, "no /health")):
        if flag:
            extras.append(label)
    print(
        f"{app.name}: mock OpenAI backend on http://{host}:{port} (models {', '.join(app.models)}, {tokens} "
        f"tokens, {token_rate:g} tokens/s, {latency_ms:g} ms latency{''.join(', ' + e for e in extras)})",
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
@click.option(
    "--model",
    "models",
    multiple=True,
    help="Model id served and listed by /v1/models; repeatable, the first is the default. Other names get "
    "404 model_not_found. [default: mock-model, and any name is answered]",
)
@click.option("--any-model", is_flag=True, help="Answer requests naming a model not given by --model too.")
@click.option(
    "--latency-ms",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Delay before the first byte of every answer (header X-Mock-Latency-Ms).",
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
@click.option("--api-key", default=None, help="Require Authorization: Bearer KEY on /v1/* (else 401).")
@click.option(
    "--kv-capacity",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="KV prefix cache emulation: LRU capacity in blocks, 0 = off. When on, usage.prompt_tokens is "
    "prompt chars / 4 and usage.prompt_tokens_details.cached_tokens cached chars / 4.",
)
@click.option(
    "--kv-block-chars",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="Prompt characters per KV block.",
)
@click.option(
    "--prefill-us-per-char",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Time to first token grows by this many microseconds per uncached prompt character.",
)
@click.option(
    "--embedding-dimensions",
    type=click.IntRange(1, 65536),
    default=16,
    show_default=True,
    help="Embedding length when the request has no `dimensions`.",
)
@click.option("--no-health", is_flag=True, help="GET /health answers 404 (like llama-cpp-python).")
@click.option(
    "--uuid-request-ids",
    is_flag=True,
    help="400 with an empty body when X-Request-ID is not a UUID (like llama-cpp-python).",
)
@click.option(
    "--gzip",
    "gzip_",
    is_flag=True,
    help="Gzip non-streamed answers the client accepts gzip for (X-Mock-Gzip).",
)
@click.option(
    "--serial",
    is_flag=True,
    help="One request at a time; others (GET /v1/models too, not /health) wait (like a 1-slot llama.cpp).",
)
@click.option("--shuffle", is_flag=True, help="Embeddings data[] out of input order (X-Mock-Shuffle).")
@click.option(
    "--record",
    type=click.IntRange(min=0),
    default=256,
    show_default=True,
    help="Requests kept for GET /mock/requests.",
)
@click.option(
    "--prefix",
    default="",
    help="Serve every route but /mock/* under this path prefix only (e.g. /openai, like https://host/openai).",
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
    models: tuple[str, ...],
    any_model: bool,
    latency_ms: float,
    token_rate: float,
    tokens: int,
    api_key: str | None,
    kv_capacity: int,
    kv_block_chars: int,
    prefill_us_per_char: float,
    embedding_dimensions: int,
    no_health: bool,
    uuid_request_ids: bool,
    gzip_: bool,
    serial: bool,
    shuffle: bool,
    record: int,
    prefix: str,
    threads: int,
) -> None:
    """Run a mock OpenAI-compatible LLM backend: chat and text completions (SSE streaming too), embeddings,
    responses, /tokenize, /health, /v1/models.

    Per-request headers override the options and inject faults: X-Mock-Latency-Ms, X-Mock-Token-Rate,
    X-Mock-Tokens, X-Mock-Status (answer that status), X-Mock-Hang (never answer), X-Mock-Abort-After
    (drop the connection after N events; X-Mock-Abort-Mode: clean ends it properly), X-Mock-Close-After-Done
    (drop the connection right after [DONE]), X-Mock-Gzip (gzip the answer), X-Mock-Shuffle (embeddings
    out of order), X-Mock-Echo-Request-Id (answer with the request's X-Request-ID). Tests steer it through
    POST /mock/health, GET /mock/stats, GET /mock/requests and POST /mock/reset.
    """
    if any(not m for m in models):
        raise click.BadParameter("must not be empty", param_hint="--model")
    if api_key == "":
        raise click.BadParameter("must not be empty", param_hint="--api-key")
    if prefix and (not prefix.startswith("/") or prefix.endswith("/")):
        raise click.BadParameter("must start with / and not end with /", param_hint="--prefix")
    options = MockOptions(
        any_model=any_model or not models,
        api_key=api_key,
        kv_capacity=kv_capacity,
        kv_block_chars=kv_block_chars,
        prefill_us_per_char=prefill_us_per_char,
        embedding_dimensions=embedding_dimensions,
        health=not no_health,
        uuid_request_ids=uuid_request_ids,
        gzip=gzip_,
        serial=serial,
        shuffle=shuffle,
        record=record,
        prefix=prefix,
    )
    try:
        serve_mock(
            host,
            port,
            name=name,
            model=models or "mock-model",
            latency_ms=latency_ms,
            token_rate=token_rate,
            tokens=tokens,
            threads=threads,
            options=options,
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
