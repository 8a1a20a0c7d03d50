"""Errors the gateway itself answers, in the OpenAI error shape.

Every answer NTONIX makes on its own (bad input, no backend, upstream failure)
is JSON `{"error": {"message", "type", "code"}}` with the right status. The
upstream exception classes raised by the Rust extension are re-exported here so
the pipeline can map them to statuses in one place.
"""

from __future__ import annotations

import msgspec

from ntonix._core import (
    NtonixError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeoutError,
)

__all__ = [
    "GatewayError",
    "NtonixError",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamProtocolError",
    "UpstreamTimeoutError",
    "error_body",
]

_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class _ErrorDetail(msgspec.Struct, omit_defaults=True):
    message: str
    type: str
    code: str
    param: str | None = None


class _ErrorEnvelope(msgspec.Struct):
    error: _ErrorDetail


_encode = msgspec.json.Encoder().encode


def error_body(status: int, message: str, code: str, param: str | None = None) -> bytes:
    """Encode an OpenAI-shaped error object for `status`."""
    kind = _TYPES.get(status, "api_error")
    return _encode(_ErrorEnvelope(_ErrorDetail(message=message, type=kind, code=code, param=param)))


# Seconds a client should wait before retrying a 503 (no healthy backend): about one health interval.
RETRY_AFTER_SECONDS = "5"


class GatewayError(Exception):
    """An answer the gateway makes itself: status, machine-readable code, message and extra headers."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        param: str | None = None,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        if status == 503 and not any(name == "retry-after" for name, _ in headers):
            headers = (*headers, ("retry-after", RETRY_AFTER_SECONDS))
        self.headers = headers

    def body(self) -> bytes:
        return error_body(self.status, self.message, self.code, self.param)
