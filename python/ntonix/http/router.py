"""Path and method -> handler, for every request the gateway receives.

Proxied routes (`RouteSpec`s, any other `POST /v1/...`) go to the pipeline;
the gateway's own routes answer from its state. A wrong method is 405 with
`Allow`; an unknown path 404. Every request, 404s included, gets one access line
(the pipeline writes its own; the router writes the others').

Before dispatch: a request whose headers exceed `MAX_HEADERS` or
`MAX_HEADER_BYTES` (of values) is refused with 431; a CORS preflight is answered (see
`http/cors.py`) and an allowed origin's answers get their CORS headers. With
`auth.admin_key`, the admin routes need it; with gateway keys, every `/v1/`
route needs a key (the pipeline and the `/v1/models` handlers check theirs, the
router the 404s and 405s under `/v1/`). `/health` and `/ready` never need one.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from ntonix import logs
from ntonix.admin.endpoints import JSON_HEADERS, OWN, model
from ntonix.auth.guard import ADMIN_PATHS
from ntonix.errors import GatewayError
from ntonix.http.cors import Cors
from ntonix.http.extra import WithHeaders
from ntonix.routes.spec import PASSTHROUGH, ROUTES

if TYPE_CHECKING:
    from ntonix.gateway import Gateway

log = logging.getLogger("ntonix.http")

_MODEL_PREFIX = "/v1/models/"
# NOTE: Granian (hyper) itself answers a request head over its 408 KiB read buffer, or with more than
# 100 headers, with an empty 431 and closes the connection; these tighter bounds (nginx's habit is
# 4 x 8 KiB) answer 431 in the OpenAI error shape and keep the connection.
MAX_HEADERS = 64
MAX_HEADER_BYTES = 32 * 1024


class Router:
    """Dispatches one RSGI HTTP request."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        origins = gateway.settings.server.cors_origins
        self.cors = Cors(origins) if origins else None

    async def __call__(self, scope: Any, proto: Any) -> None:
        path = scope.path
        method = scope.method
        headers = scope.headers
        # NOTE: values only: `items()` builds a tuple per header and cost twice as much (~1.4 against
        # ~0.7 us for 6 headers in Granian); names are bounded by the field count and Granian's buffer.
        values = headers.values()  # one per field: a repeated name counts each time (len(headers) would not)
        if len(values) > MAX_HEADERS or sum(map(len, values)) > MAX_HEADER_BYTES:
            self._answer(scope, proto, _headers_too_large, "")
            return
        del values  # this frame lives as long as a stream: its locals too (~0.3 KB per open stream)
        if self.cors is not None:
            origin = headers.get("origin")
            if origin is not None:
                if method == "OPTIONS" and headers.get("access-control-request-method"):
                    cors_check = self.cors
                    self._answer(scope, proto, lambda gw, s, p: cors_check.preflight(s, p, origin), "")
                    return
                if self.cors.allows(origin):
                    cors = Cors.headers(origin)
                    proto = WithHeaders(proto, lambda: cors)
        route = ROUTES.get(path)
        if route is not None:
            if method == "POST":
                await self.gateway.proxy.handle(route, scope, proto)
                return
            self._answer(scope, proto, None, "POST")
            return
        handler = OWN.get(path)
        if handler is None and path.startswith(_MODEL_PREFIX) and len(path) > len(_MODEL_PREFIX):
            handler = model
        if handler is not None:
            if method in ("GET", "HEAD"):
                self._answer(scope, proto, handler, "GET, HEAD")
            else:
                self._answer(scope, proto, None, "GET, HEAD")
            return
        if path.startswith("/v1/") and method == "POST":
            await self.gateway.proxy.handle(PASSTHROUGH, scope, proto)
            return
        self._answer(scope, proto, None, "")

    def _answer(self, scope: Any, proto: Any, handler: Any, allow: str) -> None:
        """Run a handler of the gateway's own (None: 404 or 405) and write its access line."""
        started = time.perf_counter()
        try:
            guard = self.gateway.guard
            if handler is None:
                if scope.path.startswith("/v1/"):
                    guard.authenticate(scope.headers)  # 401 before saying what exists under /v1/
                if allow:
                    raise GatewayError(
                        405,
                        "method_not_allowed",
                        f"{scope.method} is not allowed on {scope.path}",
                        headers=(("allow", allow),),
                    )
                raise GatewayError(404, "not_found", f"no route for {scope.path}")
            if scope.path in ADMIN_PATHS:
                guard.check_admin(scope.headers)
            status = handler(self.gateway, scope, proto)
        except GatewayError as err:
            status = err.status
            proto.response_bytes(status, [*JSON_HEADERS, *err.headers], err.body())
        except Exception:
            log.exception("%s %s failed inside the gateway", scope.method, scope.path)
            status = 500
            proto.response_bytes(
                500, JSON_HEADERS, GatewayError(500, "internal_error", "internal error").body()
            )
        logs.log_access(
            "-", scope.method, scope.path, "-", status, "-", 0, (time.perf_counter() - started) * 1000.0, None
        )


def _headers_too_large(gw: Gateway, scope: Any, proto: Any) -> int:
    raise GatewayError(
        431,
        "request_header_fields_too_large",
        f"request headers exceed {MAX_HEADERS} fields or {MAX_HEADER_BYTES} bytes of values",
    )
