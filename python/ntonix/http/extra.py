"""`WithHeaders`: an RSGI protocol that adds headers to whatever answer the handler writes.

Used where a header belongs on every answer of a request whichever code path
writes it (rate-limit state, CORS), so those paths need not know about it.
The headers are computed when the answer starts (a whole answer's rate-limit
headers then count its own tokens). Everything else goes to the wrapped protocol.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

Headers = list[tuple[str, str]]


class WithHeaders:
    __slots__ = ("extra", "proto")

    def __init__(self, proto: Any, extra: Callable[[], Headers]) -> None:
        self.proto = proto
        self.extra = extra

    def __call__(self) -> Any:
        return self.proto()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self.proto.__aiter__()  # type: ignore[no-any-return]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.proto, name)

    def response_empty(self, status: int, headers: Headers) -> None:
        self.proto.response_empty(status, [*headers, *self.extra()])

    def response_str(self, status: int, headers: Headers, body: str) -> None:
        self.proto.response_str(status, [*headers, *self.extra()], body)

    def response_bytes(self, status: int, headers: Headers, body: bytes) -> None:
        self.proto.response_bytes(status, [*headers, *self.extra()], body)

    def response_file(self, status: int, headers: Headers, file: str) -> None:
        self.proto.response_file(status, [*headers, *self.extra()], file)

    def response_stream(self, status: int, headers: Headers) -> Any:
        return self.proto.response_stream(status, [*headers, *self.extra()])
