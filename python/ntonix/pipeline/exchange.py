"""`Exchange`: the per-request context carried through the pipeline's phases (pingora's CTX)."""

from __future__ import annotations

import os
import re
import uuid
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


def new_request_id() -> str:
    """A fresh UUID4 (some servers, llama-cpp-python among them, accept nothing else)."""
    return str(uuid.UUID(bytes=os.urandom(16), version=4))


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
