"""One `RouteSpec` per proxied endpoint: what it forwards, how it validates, what may be cached or retried.

A new OpenAI endpoint is a new `RouteSpec` in `ROUTES`, not an edit across the
pipeline. Each spec names the upstream path, the parser that turns the body into
`RequestFacts` (the few things routing and caching need: model, stream, the
user for session stickiness), whether answers may be cached, and whether a
request may go to another backend once its bytes were sent (`/v1/responses`
and unknown routes may have side effects upstream, so never).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

import msgspec

from ntonix.errors import GatewayError

_decode = msgspec.json.Decoder().decode


class RequestFacts:
    """What the pipeline knows of one parsed request body."""

    __slots__ = ("model", "stream", "user")

    def __init__(self, model: str | None, stream: bool, user: str | None) -> None:
        self.model = model
        self.stream = stream
        self.user = user


Validator = Callable[[dict[str, Any]], None]


class RouteSpec:
    """An endpoint the gateway proxies."""

    __slots__ = ("cacheable", "json_only", "name", "path", "retry_after_send", "validate")

    def __init__(
        self,
        name: str,
        path: str,
        validate: Validator | None,
        *,
        cacheable: bool,
        retry_after_send: bool,
        json_only: bool = True,
    ) -> None:
        self.name = name
        self.path = path
        self.validate = validate
        self.cacheable = cacheable
        self.retry_after_send = retry_after_send
        self.json_only = json_only

    def parse(self, body: bytes) -> tuple[dict[str, Any] | None, RequestFacts]:
        """Decode and check a request body; 400 naming the route's required fields when it is wrong."""
        if self.validate is None:  # forwarded byte for byte: read the model if the body is JSON
            try:
                request = _decode(body) if body else None
            except msgspec.DecodeError:
                return None, RequestFacts(None, False, None)
            if not isinstance(request, dict):
                return None, RequestFacts(None, False, None)
            model = request.get("model")
            return request, RequestFacts(model if isinstance(model, str) else None, False, None)
        try:
            request = _decode(body)
        except msgspec.DecodeError as exc:
            raise GatewayError(400, "invalid_json", f"request body is not valid JSON: {exc}") from None
        if not isinstance(request, dict):
            raise GatewayError(400, "invalid_request", "request body must be a JSON object")
        self.validate(request)
        model = request.get("model")
        if model is not None and not isinstance(model, str):
            raise GatewayError(400, "invalid_request", "'model' must be a string")
        stream = request.get("stream")
        if stream is not None and not isinstance(stream, bool):
            raise GatewayError(400, "invalid_request", "'stream' must be a boolean")
        user = request.get("user")
        return request, RequestFacts(model, stream is True, user if isinstance(user, str) else None)


def _check_chat(request: dict[str, Any]) -> None:
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages:
        raise GatewayError(400, "invalid_request", "'messages' must be a non-empty array")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise GatewayError(400, "invalid_request", f"'messages[{index}]' must be an object with a 'role'")


def _is_tokens(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(type(t) is int for t in value)


def _check_completion(request: dict[str, Any]) -> None:
    prompt = request.get("prompt")
    ok = (
        isinstance(prompt, str)
        or _is_tokens(prompt)
        or (
            isinstance(prompt, list)
            and bool(prompt)
            and all(isinstance(p, str) or _is_tokens(p) for p in prompt)
        )
    )
    if not ok:
        raise GatewayError(
            400,
            "invalid_request",
            "'prompt' is required: a string, an array of strings, or an array of token arrays",
        )


def _check_embeddings(request: dict[str, Any]) -> None:
    value = request.get("input")
    ok = (
        (isinstance(value, str) and value != "")
        or _is_tokens(value)
        or (
            isinstance(value, list)
            and bool(value)
            and all((isinstance(v, str) and v != "") or _is_tokens(v) for v in value)
        )
    )
    if not ok:
        raise GatewayError(
            400,
            "invalid_request",
            "'input' is required: a non-empty string, an array of strings, or an array of token arrays",
        )


def _check_responses(request: dict[str, Any]) -> None:
    value = request.get("input")
    if not (isinstance(value, (str, list))) and "previous_response_id" not in request:
        raise GatewayError(400, "invalid_request", "'input' is required: a string or an array of items")


CHAT: Final = RouteSpec("chat", "/v1/chat/completions", _check_chat, cacheable=True, retry_after_send=True)
COMPLETIONS: Final = RouteSpec(
    "completions", "/v1/completions", _check_completion, cacheable=True, retry_after_send=True
)
EMBEDDINGS: Final = RouteSpec(
    "embeddings", "/v1/embeddings", _check_embeddings, cacheable=True, retry_after_send=True
)
RESPONSES: Final = RouteSpec(
    "responses", "/v1/responses", _check_responses, cacheable=False, retry_after_send=False
)
# Any other POST /v1/...: forwarded as it is, to a backend of the body's model when it names one.
PASSTHROUGH: Final = RouteSpec(
    "other", "/v1/*", None, cacheable=False, retry_after_send=False, json_only=False
)

ROUTES: Final = {spec.path: spec for spec in (CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES)}


def prompt_text(route: RouteSpec, request: dict[str, Any] | None) -> str:
    """The prompt as one string, in order (chat messages' contents, completion prompt), for prefix routing."""
    if request is None:
        return ""
    if route is CHAT:
        parts: list[str] = []
        for message in request.get("messages") or ():
            if not isinstance(message, dict):
                continue
            content = message.get("content")
            if isinstance(content, list):
                content = "".join(
                    str(p.get("text", "")) for p in content if isinstance(p, dict) and "text" in p
                )
            parts.append(f"{message.get('role', '')}: {content if isinstance(content, str) else ''}\n")
        return "".join(parts)
    prompt = request.get("prompt") if route is COMPLETIONS else request.get("input")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        return str(prompt[0])
    return ""
