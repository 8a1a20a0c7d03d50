"""Live fan-out of one upstream stream to every identical streaming request (`X-Cache: COALESCED`).

A `StreamGroup` belongs to the generation, not to the first client: a producer
task reads the upstream stream into one shared chunk log (each chunk one
`bytes` object, however many clients get it) and every attached client — the
first one included — sends from that log at its own pace: a late joiner first
gets every chunk already sent, then the rest as it arrives, byte-identical.

Lifetime: the producer ends when the stream ends, or when the last attached
client has left (it is cancelled then, which drops the upstream request and
closes its connection, so the GPU stops). A client that leaves early never cuts
the others off. A follower whose unsent backlog grows past `LAG_BOUND_BYTES`
beyond what it had to catch up with when it joined is disconnected instead of
being waited for. A stream that breaks upstream ends every client with the
same in-band error event (it is appended to the log like any chunk).
"""

from __future__ import annotations

import asyncio
from typing import Final

# How far (bytes of unsent chunks) a follower may fall behind the live head before it is dropped.
LAG_BOUND_BYTES: Final = 1 << 20


class StreamGroup:
    """One live generation shared by its attached clients."""

    __slots__ = ("chunks", "done", "head", "members", "peak", "size", "task", "wake")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.chunks: list[bytes] = []
        self.size = 0  # bytes in `chunks`
        self.done = False
        self.members = 0
        self.peak = 0
        # (status, headers) once the backend answered, or the gateway error every member answers with
        self.head: asyncio.Future[tuple[int, list[tuple[str, str]]]] = loop.create_future()
        self.wake: asyncio.Future[None] = loop.create_future()
        self.task: asyncio.Task[None] | None = None

    def join(self) -> None:
        self.members += 1
        self.peak = max(self.peak, self.members)

    def leave(self) -> bool:
        """One client left; True when it was the last one and the generation is still running."""
        self.members -= 1
        if self.members <= 0 and not self.done and self.task is not None:
            self.task.cancel()
            return True
        return False

    def append(self, chunk: bytes) -> None:
        self.chunks.append(chunk)
        self.size += len(chunk)
        self._notify()

    def finish(self) -> None:
        self.done = True
        self._notify()

    def _notify(self) -> None:
        wake, self.wake = self.wake, asyncio.get_running_loop().create_future()
        wake.set_result(None)
