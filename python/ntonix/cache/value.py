"""How an answer's representation travels with its cached bytes.

The Rust cache stores a body and one short string beside it. That string is the
answer's `content-type`, followed by `\\n` and its `content-encoding` when the
backend sent one, so a hit is replayed with the headers a client needs to
decode the bytes (a gzip body without `content-encoding: gzip` is garbage to
the openai SDK). Streams are stored as their chunks, msgpack-encoded, so a
replay sends the same chunks in the same order.
"""

from __future__ import annotations

import msgspec

JSON = "application/json"

pack_chunks = msgspec.msgpack.Encoder().encode
unpack_chunks = msgspec.msgpack.Decoder(list[bytes]).decode


def header_value(headers: list[tuple[str, str]], name: str) -> str | None:
    for key, value in headers:
        if key == name:
            return value
    return None


def encode_meta(headers: list[tuple[str, str]]) -> str:
    """The representation headers of an answer, as stored beside its body."""
    content_type = header_value(headers, "content-type") or JSON
    encoding = header_value(headers, "content-encoding")
    if encoding and encoding.lower() != "identity":
        return f"{content_type}\n{encoding}"
    return content_type


def decode_meta(meta: str) -> list[tuple[str, str]]:
    """The headers to replay a stored body with."""
    if "\n" not in meta:
        return [("content-type", meta)]
    content_type, encoding = meta.split("\n", 1)
    return [("content-type", content_type), ("content-encoding", encoding)]
