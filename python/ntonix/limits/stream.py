"""Token counts of streams whose client did not ask for them.

A streamed chat or completion carries `usage` only when the request set
`stream_options.include_usage`. To count a key's tokens anyway, `ask_for_usage`
sets it on the upstream request when the client did not, and a `UsageTap`
then drops the usage-only event (`"choices": []` with a `usage` object) from
what the client receives, so the client sees exactly the stream it asked for.
The tap touches only frames that mention `"usage"` (the last one or two of a
stream); every other frame passes through as the same bytes object.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

from ntonix.pipeline.usage import Usage, usage_of_stream
from ntonix.routes.spec import CHAT, COMPLETIONS

if TYPE_CHECKING:
    from ntonix.pipeline.exchange import Exchange

_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode
# A usage event cut across frames is held back at most this long before giving up on it.
_MAX_CARRY = 65536


def ask_for_usage(ex: Exchange) -> UsageTap | None:
    """Ask the backend for the stream's usage when the client did not; the tap to strip it again."""
    if ex.route is not CHAT and ex.route is not COMPLETIONS:
        return None  # Responses streams carry usage in response.completed anyway
    request = ex.request
    if request is None:
        try:
            request = _decode(ex.body)
        except msgspec.DecodeError:
            return None
        if not isinstance(request, dict):
            return None
    options = request.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return None  # the client asked: it gets the usage event, and the proxy counts it as usual
    request = {
        **request,
        "stream_options": {**(options if isinstance(options, dict) else {}), "include_usage": True},
    }
    ex.request = request
    ex.body = _encode(request)
    return UsageTap()


def _usage_only(event: bytes) -> bool:
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            try:
                doc = _decode(line[5:].strip())
            except msgspec.DecodeError:
                return False
            return isinstance(doc, dict) and doc.get("choices") == [] and isinstance(doc.get("usage"), dict)
    return False


class UsageTap:
    """Removes the usage-only SSE event from a stream; keeps its `Usage`."""

    __slots__ = ("carry", "usage")

    def __init__(self) -> None:
        self.carry = b""
        self.usage: Usage | None = None

    def feed(self, chunk: bytes) -> bytes:
        """What of `chunk` the client gets (b"" when all of it is held back or dropped)."""
        if self.carry:
            chunk, self.carry = self.carry + chunk, b""
        if b'"usage"' not in chunk:
            return chunk
        cut = chunk.rfind(b"\n\n")
        if cut < 0:
            if len(chunk) > _MAX_CARRY:
                return chunk  # not SSE framed as we know it: pass it on untouched
            self.carry = chunk
            return b""
        head, self.carry = chunk[: cut + 2], chunk[cut + 2 :]
        events = head.split(b"\n\n")
        kept: list[bytes] = []
        for event in events[:-1]:
            if b'"usage"' in event and _usage_only(event):
                self.usage = usage_of_stream(event)
                continue
            kept.append(event + b"\n\n")
        return b"".join(kept) if len(kept) != len(events) - 1 else head

    def flush(self) -> bytes:
        """Whatever is still held back at the end of the stream (an event never completed)."""
        rest, self.carry = self.carry, b""
        return rest
