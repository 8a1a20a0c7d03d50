"""`Exchange`: the per-request context carried through the pipeline's phases (pingora's CTX)."""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Any

import msgspec

from ntonix.routes.spec import prompt_text

if TYPE_CHECKING:
    from ntonix.auth.keys import Principal
    from ntonix.routes.spec import RequestFacts, RouteSpec

# Response headers the gateway owns: a backend's own (a Varnish or nginx cache in front of it sends
# X-Cache) would go out beside the gateway's, two values for one header.
OWN_RESPONSE_HEADERS = frozenset({"x-request-id", "x-cache"})
_VALID_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_decode = msgspec.json.Decoder().decode


_RANDOM_POOL = 4096  # bytes of os.urandom read at a time: 256 request ids per getrandom(2)


class _Random:
    __slots__ = ("at", "pool")

    def __init__(self) -> None:
        self.pool = b""
        self.at = 0

    def reset(self) -> None:
        self.pool, self.at = b"", 0


_random = _Random()
os.register_at_fork(after_in_child=_random.reset)  # a forked worker never repeats its parent's ids


def new_request_id() -> str:
    """A fresh UUID4 (some servers, llama-cpp-python among them, accept nothing else).

    NOTE: `str(uuid.UUID(bytes=os.urandom(16), version=4))` cost ~4 µs per request (a getrandom(2)
    call, a UUID object, its formatting); the same bits from a pooled os.urandom read, formatted
    directly, cost ~1 µs.
    """
    r = _random
    if r.at >= len(r.pool):
        r.pool, r.at = os.urandom(_RANDOM_POOL), 0
    b = bytearray(r.pool[r.at : r.at + 16])
    r.at += 16
    b[6] = (b[6] & 0x0F) | 0x40  # version 4
    b[8] = (b[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


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
        "request",
        "request_id",
        "route",
        "session_header",
        "started",
        "status",
        "ttfb_ms",
    )

    def __init__(self, request_id: str, started: float, route: RouteSpec) -> None:
        self.request_id = request_id
        self.started = started
        self.route = route
        self.path = route.path  # the upstream path, after the backend's base URL
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
