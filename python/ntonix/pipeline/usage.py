"""Token counts from the `usage` an answer or a stream's usage chunk carries (OpenAI and Responses shapes).

Read off the client's path: a whole answer is scanned only when it mentions
`"usage"` (or, gzip-compressed by the backend, once decompressed), and a stream only
keeps the last chunk that did, decoded once at its end.
"""

from __future__ import annotations

import zlib

import msgspec


class _Details(msgspec.Struct):
    cached_tokens: int | None = None


class _UsageDoc(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    prompt_tokens_details: _Details | None = None
    input_tokens_details: _Details | None = None


class _WithUsage(msgspec.Struct):
    usage: _UsageDoc | None = None


class _Event(msgspec.Struct):
    usage: _UsageDoc | None = None
    response: _WithUsage | None = None  # Responses API: response.completed carries response.usage


_decode_answer = msgspec.json.Decoder(_WithUsage).decode
_decode_event = msgspec.json.Decoder(_Event).decode


class Usage:
    """Prompt, completion and cached prompt tokens of one answer."""

    __slots__ = ("cached", "completion", "prompt")

    def __init__(self, doc: _UsageDoc) -> None:
        self.prompt = doc.prompt_tokens or doc.input_tokens
        self.completion = doc.completion_tokens or doc.output_tokens
        details = doc.prompt_tokens_details or doc.input_tokens_details
        self.cached = details.cached_tokens if details is not None else None


# Largest decompressed answer scanned for usage (a gzip bomb costs this much at most).
_GUNZIP_LIMIT = 16 * 1024 * 1024


def _gunzip(body: bytes) -> bytes | None:
    try:
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(body, _GUNZIP_LIMIT)
    except zlib.error:
        return None


def usage_of_body(status: int, body: bytes | None) -> Usage | None:
    """The usage of a whole answer (`status`, `body`: the upstream response's)."""
    if not body or status >= 300:
        return None
    if b'"usage"' not in body:
        # NOTE: a backend (or an nginx in front of it) may gzip answers for clients that accept it; the
        # pipeline forwards them compressed, so read the usage from the decompressed copy.
        if not body.startswith(b"\x1f\x8b"):
            return None
        plain = _gunzip(body)
        if plain is None or b'"usage"' not in plain:
            return None
        body = plain
    try:
        doc = _decode_answer(body).usage
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None  # compressed, or not the OpenAI shape
    return Usage(doc) if doc is not None else None


def usage_of_stream(chunk: bytes) -> Usage | None:
    """The usage of the last SSE event in `chunk` that carries one."""
    for line in reversed(chunk.split(b"\n")):
        if not line.startswith(b"data:") or b'"usage"' not in line:
            continue
        try:
            event = _decode_event(line[5:].strip())
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue
        doc = event.usage or (event.response.usage if event.response is not None else None)
        if doc is not None:
            return Usage(doc)
    return None
