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
    """Removes the usage-only SSE event from a stream; keeps its `Usage`.

    NOTE: an event may arrive cut across frames; the tap holds back a frame's unfinished last event
    (bounded by `_MAX_CARRY`) until its end comes, which costs the client nothing: half an event is
    of no use to it. A CRLF-framed stream is passed on untouched (its `\r` bytes can only be framing,
    since JSON escapes them in strings).
    """

    __slots__ = ("carry", "off", "usage")

    def __init__(self) -> None:
        self.carry = b""
        self.off = False
        self.usage: Usage | None = None

    def feed(self, chunk: bytes) -> bytes:
        """What of `chunk` the client gets now (b"" when all of it is held back or dropped)."""
        if self.off:
            return chunk
        if self.carry:
            chunk, self.carry = self.carry + chunk, b""
        elif chunk.endswith(b"\n\n") and b'"usage"' not in chunk:
            return chunk  # the common frame: whole events, no usage
        if b"\r" in chunk:
            self.off = True
            return chunk
        cut = chunk.rfind(b"\n\n") + 2  # 1 when there is no boundary: all of it is the tail
        head, tail = (chunk[:cut], chunk[cut:]) if cut > 1 else (b"", chunk)
        if len(tail) > _MAX_CARRY:
            head, tail = chunk, b""  # not SSE as we know it: give up holding back
        self.carry = tail
        if b'"usage"' not in head:
            return head
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
