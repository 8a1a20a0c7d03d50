"""The answers the gateway makes from its own state: /, /health, /ready, /metrics*, /cache/stats, /v1/models.

Each handler is `handler(gateway, scope, proto) -> status`; the router writes
the access line. `/health` is liveness (the process answers); `/ready` is
readiness (at least one backend may take traffic), for load balancers and
Kubernetes.
"""

from __future__ import annotations

import os
import time
import urllib.parse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec

from ntonix import __version__
from ntonix.admin import dashboard
from ntonix.errors import GatewayError
from ntonix.routes.spec import CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES
from ntonix.system import worker_id

if TYPE_CHECKING:
    from ntonix.gateway import Gateway

JSON_HEADERS = [("content-type", "application/json")]
_encode = msgspec.json.Encoder().encode

Handler = Callable[["Gateway", Any, Any], int]

INDEX = _encode(
    {
        "name": "NTONIX",
        "version": __version__,
        "description": "OpenAI-compatible inference gateway for local LLM clusters",
        "endpoints": {
            "health": "/health",
            "ready": "/ready",
            "metrics": "/metrics",
            "cache_stats": "/cache/stats",
            "chat_completions": CHAT.path,
            "completions": COMPLETIONS.path,
            "embeddings": EMBEDDINGS.path,
            "responses": RESPONSES.path,
            "models": "/v1/models",
            "dashboard": "/dashboard",
        },
    }
)
HEALTHY = _encode({"status": "healthy"})


def index(gw: Gateway, scope: Any, proto: Any) -> int:
    proto.response_bytes(200, JSON_HEADERS, INDEX)
    return 200


def health(gw: Gateway, scope: Any, proto: Any) -> int:
    proto.response_bytes(200, JSON_HEADERS, HEALTHY)
    return 200


def ready(gw: Gateway, scope: Any, proto: Any) -> int:
    now = time.monotonic()
    healthy = sum(1 for b in gw.backends if b.available(now))
    if not healthy:
        raise GatewayError(503, "no_healthy_backend", f"not ready: 0 of {len(gw.backends)} backends healthy")
    body = _encode({"status": "ready", "healthy_backends": healthy, "backends": len(gw.backends)})
    proto.response_bytes(200, JSON_HEADERS, body)
    return 200


def cache_stats_document(gw: Gateway) -> dict[str, Any]:
    stats = gw.cache_stats()
    lookups = stats["hits"] + stats["misses"]
    document: dict[str, Any] = {
        "enabled": gw.cache is not None,
        **stats,
        "hit_rate": stats["hits"] / lookups if lookups else 0.0,
    }
    shared = gw.redis_stats()
    if shared is not None:  # only with `cache.redis_url`
        document["redis"] = shared
    return document


def cache_stats(gw: Gateway, scope: Any, proto: Any) -> int:
    proto.response_bytes(200, JSON_HEADERS, _encode(cache_stats_document(gw)))
    return 200


def metrics(gw: Gateway, scope: Any, proto: Any) -> int:
    accept = scope.headers.get("accept") or ""
    if "text/plain" in accept or "openmetrics" in accept:
        return prometheus(gw, scope, proto)
    document = gw.metrics.snapshot(gw.backends, gw.cache_stats())
    # with server.workers > 1 each worker answers for its own process only
    document["process"] = {"pid": os.getpid(), "worker": worker_id()}
    if gw.guard.keys_on:
        document["keys"] = gw.guard.snapshot()  # by name; never the keys
    proto.response_bytes(200, JSON_HEADERS, _encode(document))
    return 200


def prometheus(gw: Gateway, scope: Any, proto: Any) -> int:
    text = gw.metrics.prometheus(gw.backends, gw.cache_stats(), gw.cache is not None)
    if gw.redis is not None:
        text += gw.redis.prometheus()
    proto.response_str(200, [("content-type", "text/plain; version=0.0.4; charset=utf-8")], text)
    return 200


def page(gw: Gateway, scope: Any, proto: Any) -> int:
    dashboard.serve(scope, proto)
    return 200


def _model_object(gw: Gateway, model: str) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": gw.metrics.created, "owned_by": "ntonix"}


def models(gw: Gateway, scope: Any, proto: Any) -> int:
    principal = gw.guard.authenticate(scope.headers)  # 401 with keys on and no valid key
    registry = gw.registry
    ids = registry.model_ids()
    if principal is not None and principal.models is not None:
        ids = [m for m in ids if principal.may_use(m, registry.aliases)]  # only the key's models
    data = [_model_object(gw, m) for m in ids]
    proto.response_bytes(200, JSON_HEADERS, _encode({"object": "list", "data": data}))
    return 200


def model(gw: Gateway, scope: Any, proto: Any) -> int:
    principal = gw.guard.authenticate(scope.headers)
    wanted = urllib.parse.unquote(scope.path[len("/v1/models/") :])
    visible = principal is None or principal.may_use(wanted, gw.registry.aliases)
    if wanted not in gw.registry.known or not visible:
        raise GatewayError(404, "model_not_found", f"The model '{wanted}' does not exist", param="model")
    proto.response_bytes(200, JSON_HEADERS, _encode(_model_object(gw, wanted)))
    return 200


# GET (and HEAD) routes answered by the gateway itself.
OWN: dict[str, Handler] = {
    "/": index,
    "/health": health,
    "/ready": ready,
    "/metrics": metrics,
    "/metrics/prometheus": prometheus,
    "/cache/stats": cache_stats,
    "/dashboard": page,
    "/v1/models": models,
}
