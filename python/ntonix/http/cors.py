"""CORS for browser apps calling the gateway: `server.cors_origins` (default none), preflights answered here.

Only listed origins (or any, with "*") get `Access-Control-Allow-Origin`, which
echoes the request's origin (with `Vary: Origin`) so a cache between the browser
and the gateway never hands one origin's answer to another. No credentials mode:
API keys travel in `Authorization`, which a preflight must allow explicitly and
does here. A preflight (`OPTIONS` with `Access-Control-Request-Method`) needs no
API key (browsers send none), answers 204 for an allowed origin and 403 for
another; the real request that follows is authenticated as usual.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from ntonix.errors import GatewayError

ALLOW_METHODS = "GET, HEAD, POST, OPTIONS"
# What a browser app may read of an answer besides the CORS-safelisted headers.
EXPOSE = (
    "x-request-id, x-cache, retry-after, x-ratelimit-limit-requests, x-ratelimit-remaining-requests, "
    "x-ratelimit-limit-tokens, x-ratelimit-remaining-tokens"
)
MAX_AGE = "600"
_HEADER_LIST = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+(\s*,\s*[A-Za-z0-9!#$%&'*+.^_`|~-]+)*")


class Cors:
    """The allowed origins and the headers each answer to one of them carries."""

    __slots__ = ("any", "origins")

    def __init__(self, origins: Iterable[str]) -> None:
        listed = {o.rstrip("/").lower() for o in origins}
        self.any = "*" in listed
        self.origins = frozenset(listed - {"*"})

    def allows(self, origin: str) -> bool:
        return self.any or origin.lower() in self.origins

    @staticmethod
    def headers(origin: str) -> list[tuple[str, str]]:
        return [
            ("access-control-allow-origin", origin),
            ("vary", "origin"),
            ("access-control-expose-headers", EXPOSE),
        ]

    def preflight(self, scope: Any, proto: Any, origin: str) -> int:
        """Answer an `OPTIONS` preflight: 204 with what the origin may do, or 403."""
        if not self.allows(origin):
            raise GatewayError(403, "cors_origin_not_allowed", f"origin {origin!r} may not call this gateway")
        requested = (scope.headers.get("access-control-request-headers") or "").strip()
        allow_headers = (
            requested if requested and _HEADER_LIST.fullmatch(requested) else "authorization, content-type"
        )
        proto.response_empty(
            204,
            [
                ("access-control-allow-origin", origin),
                ("access-control-allow-methods", ALLOW_METHODS),
                ("access-control-allow-headers", allow_headers),
                ("access-control-max-age", MAX_AGE),
                ("vary", "origin, access-control-request-method, access-control-request-headers"),
            ],
        )
        return 204


__all__ = ["Cors"]
