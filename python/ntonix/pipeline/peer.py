"""How much of a live stream a client has really received: the kernel's count of acknowledged bytes.

Granian 2.8's `send_bytes` hands a chunk to an unbounded channel and returns at once, however slowly
the client reads (bench/granian_backpressure.py), so the application never sees a backlog. The client's
TCP connection does: `TCP_INFO.tcpi_bytes_acked` counts the bytes the client has acknowledged. A
stream follower that has been handed far more than that is not keeping up. The socket is found once,
by its addresses, among this process's descriptors (Granian serves from the same process), and only for
followers that have been handed enough bytes for it to matter. Linux only; elsewhere (or when the
socket cannot be found) `PeerSocket.find` returns None and followers are never throttled or dropped.

The figure is conservative: the bytes acknowledged also count the response head, the chunked framing,
TLS records and earlier answers on the same keep-alive connection, so it can only understate how far
behind a client is, never overstate it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import sys

_FD_DIR = "/proc/self/fd"
_TCP_INFO_LEN = 128
_BYTES_ACKED = 120  # offset of tcpi_bytes_acked (u64, Linux >= 4.1) in struct tcp_info


def _address(text: str) -> tuple[str, int] | None:
    """'127.0.0.1:5000' or '[::1]:5000' (RSGI's scope.client / scope.server) as (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


class PeerSocket:
    """A duplicate descriptor of one client's TCP connection: acknowledged bytes, and a way to cut it."""

    __slots__ = ("sock",)

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    @classmethod
    def find(cls, client: str, server: str) -> PeerSocket | None:
        """The socket whose peer is `client` and whose local port is `server`'s, or None."""
        peer, local = _address(client), _address(server)
        if peer is None or local is None or not sys.platform.startswith("linux"):
            return None
        try:
            names = os.listdir(_FD_DIR)
        except OSError:
            return None
        for name in names:
            try:
                if not os.readlink(f"{_FD_DIR}/{name}").startswith("socket:"):
                    continue
                sock = socket.socket(fileno=os.dup(int(name)))
            except (OSError, ValueError):
                continue
            try:
                if sock.type == socket.SOCK_STREAM and sock.family in (socket.AF_INET, socket.AF_INET6):
                    there, here = sock.getpeername(), sock.getsockname()
                    if there[1] == peer[1] and here[1] == local[1] and _same_host(there[0], peer[0]):
                        return cls(sock)
            except OSError:
                pass
            sock.close()
        return None

    def acked(self) -> int | None:
        """Bytes the client has acknowledged on this connection so far; None once that cannot be read."""
        try:
            info = self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
        except OSError:
            return None
        if len(info) < _BYTES_ACKED + 8:
            return None
        value: int = struct.unpack_from("=Q", info, _BYTES_ACKED)[0]
        return value

    def cut(self) -> None:
        """Close the connection under Granian's feet: its queued writes fail and are freed."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.sock.close()


def _same_host(found: str, wanted: str) -> bool:
    # an IPv4 client on a dual-stack socket shows up as ::ffff:a.b.c.d
    return found == wanted or found.removeprefix("::ffff:") == wanted.removeprefix("::ffff:")
