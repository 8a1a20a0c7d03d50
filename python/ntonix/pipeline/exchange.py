"""`Exchange`: the per-request context carried through the pipeline's phases (pingora's CTX)."""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Any

import msgspec

from ntonix.routes.spec import prompt_text

if TYPE_CHECKING:
    from ntonix.auth.keys import Principal
    from ntonix.observe.metrics import ModelStats
    from ntonix.routes.spec import RequestFacts, RouteSpec

# Response headers the gateway owns: a backend's own (a Varnish or nginx cache in front of it sends
# X-Cache) would go out beside the gateway's, two values for one header.
OWN_RESPONSE_HEADERS = frozenset({"x-request-id", "x-cache"})
_VALID_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_decode = msgspec.json.Decoder().decode


_RANDOM_POOL = 4096  # bytes of os.urandom read at a time: 256 request ids per getrandom(2)


# The hex digit of the RFC 4122 variant nibble for each random hex digit: 10xx, the low bits kept.
_VARIANT = {d: "89ab"[int(d, 16) & 3] for d in "0123456789abcdef"}


class _Random:
    __slots__ = ("at", "pool")

    def __init__(self) -> None:
        self.pool = ""  # hex digits of one os.urandom read
        self.at = 0

    def reset(self) -> None:
        self.pool, self.at = "", 0


_random = _Random()
os.register_at_fork(after_in_child=_random.reset)  # a forked worker never repeats its parent's ids


def new_request_id() -> str:
    """A fresh UUID4 (some servers, llama-cpp-python among them, accept nothing else).

    NOTE: `str(uuid.UUID(bytes=os.urandom(16), version=4))` cost ~4 µs per request (a getrandom(2)
    call, a UUID object, its formatting); the same bits from a pooled os.urandom read, hex-encoded
    once per read and sliced, cost ~0.6 µs.
    """
    r = _random
    at = r.at
    if at >= len(r.pool):
        r.pool, at = os.urandom(_RANDOM_POOL).hex(), 0
    h = r.pool
    r.at = at + 32
    # version 4 (the 13th digit), variant 10xx (the 17th)
    return (
        f"{h[at : at + 8]}-{h[at + 8 : at + 12]}-4{h[at + 13 : at + 16]}-"
        f"{_VARIANT[h[at + 16]]}{h[at + 17 : at + 20]}-{h[at + 20 : at + 32]}"
    )


def client_request_id(value: str | None) -> str:
    """The client's X-Request-ID when it is 1-128 characters of [A-Za-z0-9._:-], else a new UUID4."""
    if value is not None and _VALID_ID.fullmatch(value):
        return value
    return new_request_id()


class Exchange:
    """Everything one request has learnt so far; each phase reads and fills it."""

    __slots__ = (
        "backend",
        "body",
        "bytes_sent",
        "cache",
        "client_error",
        "facts",
        "model",
        "path",
        "principal",
        "prompt",
        "query",
        "request",
        "request_id",
        "route",
        "session_header",
        "started",
        "stats",
        "status",
        "ttfb_ms",
    )

    def __init__(self, request_id: str, started: float, route: RouteSpec) -> None:
        self.request_id = request_id
        self.started = started
        self.route = route
        self.path = route.path  # the upstream path, after the backend's base URL (and ?query)
        self.query = ""  # the client's query string, sent on upstream and part of the cache key
        self.backend = "-"
        self.cache = "-"
        self.status = 500
        self.bytes_sent = 0
        self.ttfb_ms: float | None = None
        self.model: str | None = None
        self.body = b""
        self.request: dict[str, Any] | None = None
        self.facts: RequestFacts | None = None
        self.prompt: str | None = None
        self.session_header: str | None = None
        self.client_error = False
        self.principal: Principal | None = None  # the caller's gateway API key, when keys are on
        self.stats: ModelStats | None = None  # its (route, model) counters, once looked up (Proxy.stats)

    def drop_request_body(self) -> None:
        """Forget the request's body and its decoded form once it was sent and cannot be resent.

        NOTE: a stream holds its `Exchange` for minutes; with a long prompt the body and the decoded
        request were most of what it held (two copies of the prompt). `prompt` stays: the prefix
        policy reads it again when the request completes.
        """
        self.body = b""
        self.request = None

    @property
    def session_key(self) -> str | None:
        """What pins a session to a backend: the session header, else the body's `user`."""
        if self.session_header:
            return self.session_header
        return self.facts.user if self.facts is not None else None

    def prompt_text(self) -> str:
        """The prompt as one string (decoded on demand: only the prefix policy asks)."""
        if self.prompt is None:
            request = self.request
            if request is None and self.body:
                try:
                    decoded = _decode(self.body)
                except msgspec.DecodeError:
                    decoded = None
                request = decoded if isinstance(decoded, dict) else None
            # namespaced by model: one prefix index serves every model pool
            self.prompt = f"{self.model or ''}\n{prompt_text(self.route, request)}"
        return self.prompt
