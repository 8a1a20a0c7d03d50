"""What may be cached and under which key.

The key is policy, so it lives here and not in Rust. It is built in two steps:

1. the request's *digest*: an xxHash-128 of its canonical form (the parsed
   JSON re-encoded with sorted keys and no whitespace, without `model`), so key
   order and whitespace never matter while every field that changes the answer
   does (messages, temperature, max_tokens, tools, `stream`, …). Left out, since
   they do not change what the model generates: `user` (an end-user id for abuse
   tracking), `metadata` and `store` (OpenAI's bookkeeping flags);
2. the *key*: the digest hashed again, seeded by the scope it is valid in —
   the route, the resolved model (an alias and its target share entries), and
   the credential scope (a hash of the client's `Authorization` when that
   header is forwarded to the backend, or of the gateway key with
   `cache.scope: key`; never the value itself), and the request's query string
   when it has one (it goes to the backend too: `?api-version=…`).

Cacheable: routes whose spec says so, when the client did not send
`Cache-Control: no-store`; streaming requests only with `cache.streaming`.
Only 2xx answers are stored. `no-cache` skips the lookup but the fresh answer
refreshes the entry.
"""

from __future__ import annotations

from typing import Any

import msgspec
import xxhash

EXCLUDED_FIELDS = frozenset({"user", "metadata", "store", "model"})

_encode_sorted = msgspec.json.Encoder(order="sorted").encode
_seeds: dict[tuple[str, str | None, str], int] = {}
_route_seeds: dict[str, int] = {}


def request_digest(request: dict[str, Any]) -> int:
    """128-bit digest of the request's semantic content, model excluded (it goes into the scope)."""
    if not EXCLUDED_FIELDS.isdisjoint(request):
        request = {k: v for k, v in request.items() if k not in EXCLUDED_FIELDS}
    return xxhash.xxh3_128_intdigest(_encode_sorted(request))


def credential_scope(authorization: str | None) -> str:
    """A short hash standing for a credential (never the credential itself); '' for none."""
    if not authorization:
        return ""
    return xxhash.xxh3_64_hexdigest(authorization.encode("utf-8", "surrogateescape"))


def cache_key(route: str, model: str | None, scope: str, digest: int) -> int:
    """The cache key of `digest` on `route` for the resolved `model` within a credential `scope`."""
    seed_key = (route, model, scope)
    seed = _seeds.get(seed_key)
    if seed is None:
        if len(_seeds) > 65536:
            _seeds.clear()
        seed = _seeds[seed_key] = xxhash.xxh64_intdigest(f"{route}\0{model or ''}\0{scope}".encode())
    return xxhash.xxh3_128_intdigest(digest.to_bytes(16, "little"), seed)


class KeyMemo:
    """Remembers what was learnt of request bodies already seen, by a hash of their raw bytes.

    NOTE: a cache hit would otherwise decode, validate and re-encode the body just to find a key it
    computed before; an xxHash-128 of the raw bytes and one dict lookup replace all that. A body in
    the memo was parsed and validated when first seen, so skipping that on later sightings is safe;
    the memo keeps the facts routing needs too (model, stream, user), so a memo hit still routes by
    model. Bounded: when it holds `capacity` bodies it starts over (the next sighting re-parses).
    """

    __slots__ = ("capacity", "known")

    def __init__(self, capacity: int = 65536) -> None:
        self.capacity = capacity
        self.known: dict[int, Any] = {}

    @staticmethod
    def body_hash(route: str, body: bytes) -> int:
        seed = _route_seeds.get(route)
        if seed is None:
            seed = _route_seeds[route] = xxhash.xxh64_intdigest(route.encode())
        return xxhash.xxh3_128_intdigest(body, seed)

    def get(self, body_hash: int) -> Any:
        return self.known.get(body_hash)

    def put(self, body_hash: int, value: Any) -> None:
        if len(self.known) >= self.capacity:
            self.known.clear()
        self.known[body_hash] = value


def cache_directives(value: str | None) -> tuple[bool, bool]:
    """(no_cache, no_store) from a `Cache-Control` request header."""
    if not value:
        return False, False
    tokens = {part.strip().lower() for part in value.split(",")}
    return "no-cache" in tokens, "no-store" in tokens
