"""Unit tests of the slow-client pacing (pipeline/peer.py, pipeline/fanout.Pace) on real loopback sockets."""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from ntonix.pipeline.fanout import Pace
from ntonix.pipeline.peer import PeerSocket

Pair = tuple[socket.socket, socket.socket, str, str]
linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="TCP_INFO pacing is Linux-only")


@pytest.fixture
def pair() -> Iterator[Pair]:
    """(server side, client side, scope.client, scope.server) of one loopback connection."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    host, port = client.getsockname()
    where = (f"{host}:{port}", f"127.0.0.1:{server.getsockname()[1]}")
    yield server, client, *where
    server.close()
    client.close()


def read_exactly(sock: socket.socket, count: int) -> None:
    got = 0
    while got < count:
        chunk = sock.recv(65536)
        assert chunk
        got += len(chunk)


def poll(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.001)


@linux
def test_find_picks_the_connection_by_its_addresses(pair: Pair) -> None:
    server, _, client_addr, server_addr = pair
    peer = PeerSocket.find(client_addr, server_addr)
    assert peer is not None
    try:
        assert peer.sock.getpeername() == server.getpeername()
        assert peer.sock.fileno() != server.fileno()  # a duplicate: closing it leaves Granian's alone
    finally:
        peer.close()
    server.sendall(b"still open")  # the original descriptor survives the duplicate's close


@linux
def test_find_returns_none_for_unknown_or_malformed_addresses(
    pair: Pair,
) -> None:
    _, _, client_addr, server_addr = pair
    host, port = client_addr.rsplit(":", 1)
    assert PeerSocket.find(f"{host}:{int(port) + 1 if int(port) < 65535 else 1}", server_addr) is None
    assert PeerSocket.find("no-port", server_addr) is None
    assert PeerSocket.find(client_addr, "127.0.0.1:notaport") is None


@linux
def test_acked_counts_what_the_client_received(pair: Pair) -> None:
    server, client, client_addr, server_addr = pair
    peer = PeerSocket.find(client_addr, server_addr)
    assert peer is not None
    try:
        assert peer.acked() == 0
        server.sendall(b"x" * 100_000)
        read_exactly(client, 100_000)
        poll(lambda: peer.acked() == 100_000)
    finally:
        peer.close()


@linux
def test_cut_ends_the_connection_for_the_client(pair: Pair) -> None:
    _, client, client_addr, server_addr = pair
    peer = PeerSocket.find(client_addr, server_addr)
    assert peer is not None
    peer.cut()
    peer.close()
    client.settimeout(5)
    assert client.recv(10) == b""  # EOF


def test_behind_allows_the_backlog_found_at_join() -> None:
    pace = Pace(1000, joined_at=5000, where=None)
    assert not pace.behind(head=5000, sent=0)  # catching up with what it found
    assert not pace.behind(head=6000, sent=0)  # the head moved by the bound: still allowed
    assert pace.behind(head=6001, sent=0)  # by more than the bound while still catching up
    assert not pace.behind(head=7000, sent=6000)
    assert pace.behind(head=7001, sent=6000)


def test_ahead_without_a_socket_never_holds_back() -> None:
    pace = Pace(1000, joined_at=0, where=None)
    assert not pace.ahead(10)
    assert not pace.ahead(10_000_000)  # looked once, found nothing: no pacing from then on
    assert pace.check_at == sys.maxsize


@linux
def test_ahead_holds_back_until_the_client_reads(pair: Pair) -> None:
    server, client, client_addr, server_addr = pair
    pace = Pace(16 * 1024, joined_at=0, where=(client_addr, server_addr))
    try:
        assert not pace.ahead(100)  # below half the bound: the socket is not even looked at
        assert pace.peer is None
        payload = b"y" * (64 * 1024)
        server.sendall(payload)  # 64 KiB handed, none of it read yet (the client's buffer may ack some)
        # acknowledged = what fits the client's receive buffer; with 64 KiB handed and a default buffer
        # the client may have acked it all: so compare against a handed figure well beyond that
        handed = 64 * 1024 + 10 * 1024 * 1024
        assert pace.ahead(handed)
        assert pace.peer is not None
        assert not pace.stalled()
        read_exactly(client, len(payload))
        poll(lambda: not pace.ahead(len(payload)))
    finally:
        pace.close()
