"""Live fan-out of identical streams (SPEC §10, issue 12) through a real gateway in front of `ntonix mock`.

Identical streaming requests that arrive while one is generating share that one
upstream generation: one request reaches the mock, every client gets the same
bytes (`X-Cache: COALESCED` for the followers), a client that leaves early cuts
no one off, and the upstream request ends when the last client left.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from typing import Any

import httpx

from tests.conftest import Processes, chat_body, wait_for

CHAT = "/v1/chat/completions"


def stats(proc: Any, path: str = "/mock/stats") -> dict[str, Any]:
    return dict(httpx.get(proc.url + path, timeout=5.0).json())


def stream_request(prompt: str, tokens: int, rate: float) -> tuple[bytes, dict[str, str]]:
    body = json.dumps(chat_body(prompt, stream=True)).encode()
    headers = {
        "content-type": "application/json",
        "x-mock-tokens": str(tokens),
        "x-mock-token-rate": str(rate),
    }
    return body, headers


async def until_upstream(mock: Any, client: httpx.AsyncClient, timeout: float = 10.0) -> None:
    """Poll (without blocking the loop) until the mock has one stream in flight."""
    deadline = asyncio.get_running_loop().time() + timeout
    while (await client.get(mock.url + "/mock/stats")).json()["in_flight"] < 1:
        assert asyncio.get_running_loop().time() < deadline, "the stream never reached the mock"
        await asyncio.sleep(0.01)


async def read_stream(
    client: httpx.AsyncClient, url: str, body: bytes, headers: dict[str, str]
) -> tuple[str, bytes]:
    async with client.stream("POST", url + CHAT, content=body, headers=headers) as response:
        assert response.status_code == 200
        data = b"".join([chunk async for chunk in response.aiter_raw()])
        return response.headers.get("x-cache", "-"), data


def test_fifty_identical_streams_share_one_generation(procs: Processes) -> None:
    mock = procs.mock()
    gateway = procs.gateway(backends=[f"127.0.0.1:{mock.port}"])
    body, headers = stream_request("fan out to fifty", 40, 10)

    async def run() -> list[tuple[str, bytes]]:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(timeout=30.0, limits=limits) as client:
            first = asyncio.create_task(read_stream(client, gateway.url, body, headers))
            await until_upstream(mock, client)
            rest = await asyncio.gather(*(read_stream(client, gateway.url, body, headers) for _ in range(49)))
            return [await first, *rest]

    results = asyncio.run(run())
    assert stats(mock)["chat_requests"] == 1, [cache for cache, _ in results]
    bodies = {data for _, data in results}
    assert len(bodies) == 1
    (data,) = bodies
    assert data.rstrip().endswith(b"data: [DONE]")
    caches = [cache for cache, _ in results]
    assert caches[0] == "MISS"
    assert caches.count("COALESCED") == 49
    metrics = httpx.get(gateway.url + "/metrics", timeout=5).json()
    assert metrics["streams_coalesced"] == 49
    assert metrics["stream_group_clients_max"] >= 2
    assert metrics["streams_active"] == 0


def test_first_client_leaving_does_not_cut_the_others_off(procs: Processes) -> None:
    mock = procs.mock()
    gateway = procs.gateway(backends=[f"127.0.0.1:{mock.port}"])
    body, headers = stream_request("leave early", 10, 20)

    async def run() -> list[bytes]:
        async with httpx.AsyncClient(timeout=30.0) as client:

            async def leave_at_third_chunk() -> None:
                async with client.stream(
                    "POST", gateway.url + CHAT, content=body, headers=headers
                ) as response:
                    events = 0
                    async for chunk in response.aiter_raw():
                        events += chunk.count(b"\n\n")
                        if events >= 3:
                            return

            leaver = asyncio.create_task(leave_at_third_chunk())
            await until_upstream(mock, client)
            others = [read_stream(client, gateway.url, body, headers) for _ in range(3)]
            results = await asyncio.gather(*others)
            await leaver
            return [data for _, data in results]

    bodies = asyncio.run(run())
    assert len(set(bodies)) == 1 and bodies[0].rstrip().endswith(b"[DONE]")
    mock_stats = stats(mock)
    assert mock_stats["chat_requests"] == 1
    assert mock_stats["streams_completed"] == 1 and mock_stats["streams_cancelled"] == 0


def test_upstream_closed_when_every_client_left(procs: Processes) -> None:
    mock = procs.mock()
    gateway = procs.gateway(backends=[f"127.0.0.1:{mock.port}"])
    body, headers = stream_request("everybody leaves", 200, 5)

    async def run() -> None:
        async with httpx.AsyncClient(timeout=30.0) as client:

            async def read_two_chunks() -> None:
                async with client.stream(
                    "POST", gateway.url + CHAT, content=body, headers=headers
                ) as response:
                    events = 0
                    async for chunk in response.aiter_raw():
                        events += chunk.count(b"\n\n")
                        if events >= 2:
                            return

            await asyncio.gather(*(read_two_chunks() for _ in range(3)))

    asyncio.run(run())
    # every client has gone: the gateway notices within its sweeper period and closes upstream
    wait_for(lambda: stats(mock)["streams_cancelled"] == 1, timeout=3.0, what="the mock seeing the close")
    assert stats(mock)["chat_requests"] == 1
    wait_for(
        lambda: httpx.get(gateway.url + "/metrics", timeout=5).json()["backends"][0]["in_flight"] == 0,
        timeout=3.0,
        what="in-flight back to 0",
    )


def test_coalescing_can_be_turned_off(procs: Processes) -> None:
    mock = procs.mock()
    gateway = procs.gateway(
        backends=[f"127.0.0.1:{mock.port}"], config={"cache": {"coalesce_streams": False}}
    )
    body, headers = stream_request("no sharing", 6, 20)

    async def run() -> list[tuple[str, bytes]]:
        async with httpx.AsyncClient(timeout=30.0) as client:
            return list(
                await asyncio.gather(*(read_stream(client, gateway.url, body, headers) for _ in range(3)))
            )

    results = asyncio.run(run())
    assert stats(mock)["chat_requests"] == 3
    assert all(data.rstrip().endswith(b"[DONE]") for _, data in results)
    assert "COALESCED" not in [cache for cache, _ in results]


# ---- slow clients: paced by what their connection acknowledged, dropped when too far behind ----


def raw_stream_request(port: int, body: bytes, headers: dict[str, str], rcvbuf: int) -> socket.socket:
    """Send a streaming request on a socket with a tiny receive buffer and never read from it."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: the window stays small
    sock.connect(("127.0.0.1", port))
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    sock.sendall(
        f"POST {CHAT} HTTP/1.1\r\nhost: x\r\ncontent-length: {len(body)}\r\n{head}\r\n".encode() + body
    )
    return sock


def test_slow_follower_is_dropped_without_affecting_the_others(procs: Processes) -> None:
    mock = procs.mock()
    gateway = procs.gateway(backends=[f"127.0.0.1:{mock.port}"], config={"cache": {"follower_lag_kb": 16}})
    # ~600 events of ~150 bytes (~90 KB) in ~3 s: the live head gets far more than 2 x 16 KiB past
    # what a client that never reads can have acknowledged (its receive buffer, a few KiB)
    body, headers = stream_request("one client stops reading", 600, 200)

    async def run() -> tuple[list[tuple[str, bytes]], socket.socket]:
        async with httpx.AsyncClient(timeout=30.0) as client:
            first = asyncio.create_task(read_stream(client, gateway.url, body, headers))
            await until_upstream(mock, client)
            slow = raw_stream_request(gateway.port, body, headers, 4096)
            readers = [read_stream(client, gateway.url, body, headers) for _ in range(2)]
            others = await asyncio.gather(*readers)
            return [await first, *others], slow

    results, slow = asyncio.run(run())
    try:
        assert stats(mock)["chat_requests"] == 1
        bodies = {data for _, data in results}
        assert len(bodies) == 1, "the readers got different bytes"
        (data,) = bodies
        assert data.rstrip().endswith(b"data: [DONE]") and len(data) > 64 * 1024, len(data)
        wait_for(
            lambda: httpx.get(gateway.url + "/metrics", timeout=5).json()["stream_followers_dropped"] == 1,
            10,
            "the slow client to be counted as dropped",
        )
        # the gateway shut its connection: reading now ends (EOF or reset) well before a whole stream
        slow.settimeout(10)
        received = 0
        with contextlib.suppress(ConnectionResetError):
            while chunk := slow.recv(65536):
                received += len(chunk)
        assert received < len(data), f"the slow client got the whole stream ({received} bytes)"
    finally:
        slow.close()
    assert "fell behind the live stream" in gateway.log()


def test_late_fast_joiner_with_a_big_backlog_is_paced_not_dropped(procs: Processes) -> None:
    """A client joining when the log already holds several times the bound catches up at its own
    pace: it is held back while its connection lags (never dropped for the backlog it found)."""
    mock = procs.mock()
    gateway = procs.gateway(backends=[f"127.0.0.1:{mock.port}"], config={"cache": {"follower_lag_kb": 16}})
    body, headers = stream_request("join late, read fast", 1500, 300)

    async def run() -> list[tuple[str, bytes]]:
        far_enough = asyncio.Event()

        async def first_reader(client: httpx.AsyncClient) -> tuple[str, bytes]:
            async with client.stream("POST", gateway.url + CHAT, content=body, headers=headers) as response:
                data = b""
                async for chunk in response.aiter_raw():
                    data += chunk
                    if len(data) > 64 * 1024:  # 4 x the bound already in the log
                        far_enough.set()
                return response.headers.get("x-cache", "-"), data

        async with httpx.AsyncClient(timeout=30.0) as client:
            first = asyncio.create_task(first_reader(client))
            await asyncio.wait_for(far_enough.wait(), 20)
            late = await read_stream(client, gateway.url, body, headers)
            return [await first, late]

    results = asyncio.run(run())
    assert [cache for cache, _ in results] == ["MISS", "COALESCED"]
    assert results[0][1] == results[1][1] and results[1][1].rstrip().endswith(b"[DONE]")
    assert httpx.get(gateway.url + "/metrics", timeout=5).json()["stream_followers_dropped"] == 0
