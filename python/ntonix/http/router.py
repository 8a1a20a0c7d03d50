"""Path and method -> handler, for every request the gateway receives.

Proxied routes (`RouteSpec`s, any other `POST /v1/...`) go to the pipeline;
the gateway's own routes answer from its state. A wrong method is 405 with
`Allow`; an unknown path 404. Every request, 404s included, gets one access line
(the pipeline writes its own; the router writes the others').
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from ntonix import logs
from ntonix.admin.endpoints import JSON_HEADERS, OWN, model
from ntonix.errors import GatewayError
from ntonix.routes.spec import PASSTHROUGH, ROUTES

if TYPE_CHECKING:
    from ntonix.gateway import Gateway

log = logging.getLogger("ntonix.http")

_MODEL_PREFIX = "/v1/models/"


class Router:
    """Dispatches one RSGI HTTP request."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def __call__(self, scope: Any, proto: Any) -> None:
        path = scope.path
        method = scope.method
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
            if handler is None:
                if allow:
                    raise GatewayError(
                        405,
                        "method_not_allowed",
                        f"{scope.method} is not allowed on {scope.path}",
                        headers=(("allow", allow),),
                    )
                raise GatewayError(404, "not_found", f"no route for {scope.path}")
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
