"""Fallback streaming backend, used only when ``ntonix mock`` cannot be started.

It answers ``POST /v1/chat/completions`` with an OpenAI-shaped SSE stream of
``TOKENS`` chunks followed by ``data: [DONE]``, paced at ``TOKEN_RATE`` tokens
per second (0 = as fast as possible), like ``ntonix mock``. Per-request headers
``X-Mock-Tokens`` and ``X-Mock-Token-Rate`` override both. Configuration comes
from the environment (``SSE_TOKENS``, ``SSE_TOKEN_RATE``) because Granian loads
the app by name. Run: ``granian --interface rsgi sse_backend:app``.
"""

from __future__ import annotations

import asyncio
import json
import os

from granian.rsgi import HTTPProtocol, Scope  # type: ignore[attr-defined]

TOKENS: int = int(os.environ.get("SSE_TOKENS", "24"))
TOKEN_RATE: float = float(os.environ.get("SSE_TOKEN_RATE", "0"))
JSON_HEADERS: list[tuple[str, str]] = [("content-type", "application/json")]
SSE_HEADERS: list[tuple[str, str]] = [("content-type", "text/event-stream"), ("cache-control", "no-cache")]


def _chunk(index: int, content: str | None, finish: str | None) -> bytes:
    delta: dict[str, str] = {} if content is None else {"content": content}
    if index == 0:
        delta["role"] = "assistant"
    payload = {
        "id": "chatcmpl-sse-bench",
        "object": "chat.completion.chunk",
        "created": 1730000000,
        "model": "bench-model",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


async def app(scope: Scope, protocol: HTTPProtocol) -> None:
    if scope.proto != "http":
        return
    body = await protocol()
    if scope.path == "/health":
        protocol.response_bytes(200, JSON_HEADERS, b'{"status":"healthy"}')
        return
    tokens = int(scope.headers.get("x-mock-tokens") or TOKENS)
    rate = float(scope.headers.get("x-mock-token-rate") or TOKEN_RATE)
    try:
        stream = bool(json.loads(body or b"{}").get("stream"))
    except ValueError:
        protocol.response_bytes(400, JSON_HEADERS, b'{"error":{"message":"bad json","type":"invalid"}}')
        return
    if not stream:
        text = " ".join(f"tok{i}" for i in range(tokens))
        answer = {
            "id": "chatcmpl-sse-bench",
            "object": "chat.completion",
            "created": 1730000000,
            "model": "bench-model",
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            ],
        }
        protocol.response_bytes(200, JSON_HEADERS, json.dumps(answer).encode())
        return
    transport = protocol.response_stream(200, SSE_HEADERS)
    delay = 1.0 / rate if rate > 0 else 0.0
    for i in range(tokens):
        if delay:
            await asyncio.sleep(delay)
        await transport.send_bytes(_chunk(i, f"tok{i} ", None))
    await transport.send_bytes(_chunk(tokens, None, "stop"))
    await transport.send_bytes(b"data: [DONE]\n\n")
