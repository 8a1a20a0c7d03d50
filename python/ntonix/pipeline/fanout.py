"""Live fan-out of one upstream stream to every identical streaming request (`X-Cache: COALESCED`).

A `StreamGroup` belongs to the generation, not to the first client: a producer
task reads the upstream stream into one shared chunk log (each chunk one
`bytes` object, however many clients get it) and every attached client — the
first one included — sends from that log at its own pace: a late joiner first
gets every chunk already sent, then the rest as it arrives, byte-identical.

Lifetime: the producer ends when the stream ends, or when the last attached
client has left (it is cancelled then, which drops the upstream request and
closes its connection, so the GPU stops). A client that leaves early never cuts
the others off. A stream that breaks upstream ends every client with the same
in-band error event (it is appended to the log like any chunk).

Slow clients (`Pace`): Granian's `send_bytes` never pushes back, so each
client is paced by what its TCP connection has acknowledged (peer.py). A client
handed `cache.follower_lag_kb` more than it acknowledged is held back (polled,
not sent to) until it reads; one that falls more than that bound behind the
live head (beyond what it had to catch up with when it joined), or that
acknowledges nothing for `STALL_S` while held back, is disconnected: its
connection is shut down, which frees what Granian had queued for it.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Final

from ntonix.pipeline.peer import PeerSocket

# A held-back client is polled this often at first, backing off to POLL_MAX_S.
POLL_FIRST_S: Final = 0.002
POLL_MAX_S: Final = 0.05
# A held-back client that acknowledges nothing for this long is disconnected.
STALL_S: Final = 30.0


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


class Pace:
    """How far one client of a group is behind: in the group's log, and on its own connection."""

    __slots__ = ("bound", "check_at", "delay", "joined_at", "last_acked", "peer", "since", "where")

    def __init__(self, bound: int, joined_at: int, where: tuple[str, str] | None) -> None:
        self.bound = bound
        self.joined_at = joined_at  # the log's size when the client joined: what it had to catch up with
        self.where = where  # (scope.client, scope.server) until its socket has been looked for
        self.peer: PeerSocket | None = None
        self.check_at = bound // 2  # bytes handed before the connection is first looked at
        self.delay = POLL_FIRST_S
        self.last_acked = -1
        self.since = 0.0  # when the client last acknowledged anything while held back

    def behind(self, head: int, sent: int) -> bool:
        """More than `bound` behind the live head, beyond the backlog it found when it joined."""
        return head - sent > self.bound + max(0, self.joined_at - sent)

    def ahead(self, sent: int) -> bool:
        """Handed more than `bound` bytes its connection has not acknowledged: hold it back."""
        if sent < self.check_at:
            return False
        peer = self._socket()
        acked = peer.acked() if peer is not None else None
        if acked is None:  # not Linux, socket not found or gone: no pacing for this client
            self.check_at = sys.maxsize
            return False
        if sent - acked > self.bound:
            if acked != self.last_acked:
                self.last_acked, self.since, self.delay = acked, time.monotonic(), POLL_FIRST_S
            return True
        self.check_at = sent + self.bound // 8
        return False

    async def wait(self) -> None:
        await asyncio.sleep(self.delay)
        self.delay = min(self.delay * 2, POLL_MAX_S)

    def stalled(self) -> bool:
        return time.monotonic() - self.since > STALL_S

    def cut(self) -> None:
        peer = self._socket()
        if peer is not None:
            peer.cut()

    def _socket(self) -> PeerSocket | None:
        """The client's socket, looked for once (the first time it is needed)."""
        if self.peer is None and self.where is not None:
            where, self.where = self.where, None
            self.peer = PeerSocket.find(*where)
        return self.peer

    def close(self) -> None:
        if self.peer is not None:
            self.peer.close()
            self.peer = None
