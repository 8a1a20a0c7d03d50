"""Bare Granian RSGI app that streams slowly: what one open stream costs in Granian itself.

Like bench/hello.py, but every POST is answered with an SSE stream of `STREAM_EVENTS` (5) events,
`STREAM_GAP` (4) seconds apart, then `data: [DONE]`, each with its own `send_bytes`, the way the
mock paces the memory benchmark's streams. Its RSS growth per open stream is the floor of any app
Granian hosts: the connection, the in-flight RSGI request, its protocol objects and one coroutine.
`bench/stream_memory.py` serves it with the gateway's Granian settings (HTTP/1 only, no websockets,
runtime threads = cores, backpressure 65,536).
"""

from __future__ import annotations

import asyncio
import os

from granian.rsgi import HTTPProtocol, Scope  # type: ignore[attr-defined]

EVENTS = int(os.environ.get("STREAM_EVENTS", "5"))
GAP = float(os.environ.get("STREAM_GAP", "4"))
HEADERS: list[tuple[str, str]] = [("content-type", "text/event-stream"), ("cache-control", "no-cache")]
HEALTH: bytes = b'{"status":"healthy"}'
EVENT: bytes = (
    b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,'
    b'"model":"bench-model","choices":[{"index":0,"delta":{"content":"word "},"finish_reason":null}]}\n\n'
)


async def app(scope: Scope, protocol: HTTPProtocol) -> None:
    if scope.proto != "http":
        return
    await protocol()
    if scope.path == "/health":
        protocol.response_bytes(200, [("content-type", "application/json")], HEALTH)
        return
    transport = protocol.response_stream(200, HEADERS)
    for _ in range(EVENTS):
        await transport.send_bytes(EVENT)
        await asyncio.sleep(GAP)
    await transport.send_bytes(b"data: [DONE]\n\n")
