"""Bare Granian RSGI hello-world: the ceiling of any app Granian hosts.

It reads the request body (as any gateway must) and answers with the same fixed
chat.completion bytes the nginx backend serves, through ``response_bytes``. The
benchmark runs it as ``granian --interface rsgi --workers 1 --runtime-threads 1
hello:app`` so it gets exactly the resources the NTONIX gateway gets.
"""

from __future__ import annotations

from pathlib import Path

from granian.rsgi import HTTPProtocol, Scope  # type: ignore[attr-defined]

BODY: bytes = (Path(__file__).resolve().parent / "response.json").read_bytes()
HEADERS: list[tuple[str, str]] = [("content-type", "application/json")]
HEALTH: bytes = b'{"status":"healthy"}'


async def app(scope: Scope, protocol: HTTPProtocol) -> None:
    if scope.proto != "http":
        return
    await protocol()
    if scope.path == "/health":
        protocol.response_bytes(200, HEADERS, HEALTH)
        return
    protocol.response_bytes(200, HEADERS, BODY)
