"""What may be cached and under which key.

The key is policy, so it lives here and not in Rust: an xxHash-128 of the
request's canonical form (the parsed JSON re-encoded with sorted keys and no
whitespace), seeded by the route, so key order and whitespace never matter
while every field that changes the answer does (model, messages, temperature,
max_tokens, tools, `stream`, …). Left out of the key, because they do not
change what the model generates: `user` (an end-user id for abuse tracking),
`metadata` and `store` (OpenAI's bookkeeping flags).

Cacheable: chat requests whose client did not send `Cache-Control: no-store`;
streaming requests only with `cache.streaming: true`. Only 2xx answers are
stored. `no-cache` skips the lookup but the fresh answer refreshes the entry.
"""

from __future__ import annotations

from typing import Any

import msgspec
import xxhash

from ntonix.errors import GatewayError

EXCLUDED_FIELDS = frozenset({"user", "metadata", "store"})

_decode = msgspec.json.Decoder().decode
_encode_sorted = msgspec.json.Encoder(order="sorted").encode
_route_seeds: dict[str, int] = {}


def parse_chat(body: bytes) -> dict[str, Any]:
    """Decode and check a chat completion request; 400 when it is not one."""
    try:
        request = _decode(body)
    except msgspec.DecodeError as exc:
        raise GatewayError(400, "invalid_json", f"request body is not valid JSON: {exc}") from None
    if not isinstance(request, dict):
        raise GatewayError(400, "invalid_request", "request body must be a JSON object")
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages:
        raise GatewayError(400, "invalid_request", "'messages' must be a non-empty array")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise GatewayError(400, "invalid_request", f"'messages[{index}]' must be an object with a 'role'")
    model = request.get("model")
    if model is not None and not isinstance(model, str):
        raise GatewayError(400, "invalid_request", "'model' must be a string")
    stream = request.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise GatewayError(400, "invalid_request", "'stream' must be a boolean")
    return request


def cache_key(route: str, request: dict[str, Any]) -> int:
    """128-bit key of the request's semantic content on `route`."""
    seed = _route_seeds.get(route)
    if seed is None:
        seed = _route_seeds[route] = xxhash.xxh64_intdigest(route.encode())
    if not EXCLUDED_FIELDS.isdisjoint(request):
        request = {k: v for k, v in request.items() if k not in EXCLUDED_FIELDS}
    return xxhash.xxh3_128_intdigest(_encode_sorted(request), seed)


class KeyMemo:
    """Remembers the cache key (and stream flag) of request bodies already seen, by their raw bytes.

    NOTE: a cache hit would otherwise decode, validate and re-encode the body just to find a key it
    computed before; an xxHash-128 of the raw bytes and one dict lookup replace all that. A body in
    the memo was parsed and validated when first seen, so skipping that on later sightings is safe.
    Bounded: when it holds `capacity` bodies it starts over (the next sighting re-parses).
    """

    __slots__ = ("capacity", "known")

    def __init__(self, capacity: int = 65536) -> None:
        self.capacity = capacity
        self.known: dict[int, tuple[int, bool]] = {}

    def get(self, body: bytes) -> tuple[int, bool] | None:
        return self.known.get(xxhash.xxh3_128_intdigest(body))

    def put(self, body: bytes, key: int, stream: bool) -> None:
        if len(self.known) >= self.capacity:
            self.known.clear()
        self.known[xxhash.xxh3_128_intdigest(body)] = (key, stream)


def cache_directives(value: str | None) -> tuple[bool, bool]:
    """(no_cache, no_store) from a `Cache-Control` request header."""
    if not value:
        return False, False
    tokens = {part.strip().lower() for part in value.split(",")}
    return "no-cache" in tokens, "no-store" in tokens
