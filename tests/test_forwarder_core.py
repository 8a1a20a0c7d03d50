"""`ntonix._core.Forwarder` driven directly on an asyncio loop against scripted local servers.

Each server is a raw asyncio TCP server on 127.0.0.1:0 that reads one request
head, then plays a script (headers now, a chunk later, or silence) while it
watches for the client closing the connection; `closed` is set on EOF, so a
test can tell whether cancelling the Python side really closed the upstream
connection (issue 9 items 10 and 24).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from ntonix._core import Forwarder, UpstreamResponse

Script = Callable[[asyncio.StreamWriter], Awaitable[None]]
SSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
CHUNK = b"data: {}\n\n"
EOF_DEADLINE = 1.0  # the upstream connection must be closed this soon after a cancel


def chunk(data: bytes) -> bytes:
    """One HTTP/1.1 chunk carrying `data`."""
    return b"%x\r\n%s\r\n" % (len(data), data)


@dataclass
class Server:
    """A scripted one-request-per-connection server; what it saw is kept for the test."""

    script: Script
    url: str = ""
    heads: list[bytes] = field(default_factory=list)
    got_request: asyncio.Event = field(default_factory=asyncio.Event)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.lower().split(b"\r\n"):
                if line.startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed.set()
            writer.close()
            return
        self.heads.append(head)
        self.got_request.set()
        play = asyncio.ensure_future(self.script(writer))
        try:
            while await reader.read(4096):  # whatever the script does, notice the client leaving
                pass
        except ConnectionError:
            pass
        self.closed.set()
        play.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await play
        writer.close()


@contextlib.asynccontextmanager
async def serve(script: Script) -> AsyncIterator[Server]:
    server = Server(script)
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    server.url = f"http://127.0.0.1:{port}/v1/chat/completions"
    try:
        yield server
    finally:
        listener.close()
        for writer in server.writers:  # connections the pool still holds
            writer.close()
        await listener.wait_closed()


@contextlib.contextmanager
def forwarder(**timeouts: float) -> Iterator[Forwarder]:
    loop = asyncio.get_running_loop()
    fwd = Forwarder(loop, **timeouts)
    loop.add_reader(fwd.wake_fd, fwd.drain)
    try:
        yield fwd
    finally:
        loop.remove_reader(fwd.wake_fd)


def run(coro: Awaitable[Any]) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, 20)

    return asyncio.run(bounded())


async def silence(writer: asyncio.StreamWriter) -> None:
    await asyncio.sleep(30)


async def first_chunk_then_silence(writer: asyncio.StreamWriter) -> None:
    writer.write(SSE_HEAD + chunk(CHUNK))
    await writer.drain()
    await asyncio.sleep(30)


def request(fwd: Forwarder, url: str, buffer: bool = False) -> Awaitable[UpstreamResponse]:
    return fwd.request("POST", url, [("content-type", "application/json")], b"{}", buffer)


async def closed_soon(server: Server) -> float:
    """Seconds until the server saw the connection closed; fails past EOF_DEADLINE."""
    started = time.perf_counter()
    try:
        await asyncio.wait_for(server.closed.wait(), EOF_DEADLINE)
    except TimeoutError:
        pytest.fail(f"the upstream connection was still open {EOF_DEADLINE}s after the cancel")
    return time.perf_counter() - started


def test_cancelling_a_task_awaiting_a_pending_closes_the_upstream_connection() -> None:
    async def main() -> None:
        async with serve(silence) as server:
            with forwarder(first_byte_timeout=30.0) as fwd:

                async def call() -> UpstreamResponse:
                    return await request(fwd, server.url)

                task = asyncio.create_task(call())
                await asyncio.wait_for(server.got_request.wait(), 5)
                task.cancel()
                await closed_soon(server)
                with pytest.raises(asyncio.CancelledError):
                    await task

    run(main())


def test_wait_for_running_out_on_a_pending_closes_the_upstream_connection() -> None:
    async def main() -> None:
        async with serve(silence) as server:
            with forwarder(first_byte_timeout=30.0) as fwd:
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(request(fwd, server.url), 0.3)
                await closed_soon(server)

    run(main())


def test_cancelling_a_task_awaiting_next_chunk_closes_the_upstream_connection() -> None:
    async def main() -> None:
        async with serve(first_chunk_then_silence) as server:
            with forwarder(idle_timeout=30.0) as fwd:
                response = await request(fwd, server.url)
                assert response.body == CHUNK

                async def next_chunk() -> bytes | None:
                    return await response.next_chunk()

                task = asyncio.create_task(next_chunk())
                await asyncio.sleep(0)  # the task starts and awaits the chunk
                assert not task.done()
                task.cancel()
                await closed_soon(server)
                with pytest.raises(asyncio.CancelledError):
                    await task
                # the rest of the body was given up with the cancelled read
                assert await response.next_chunk() is None

    run(main())


def test_headers_are_answered_before_a_late_first_chunk() -> None:
    """Issue 9 item 24: a backend in a long prefill must not hold the client's status line back."""

    async def late_chunk(writer: asyncio.StreamWriter) -> None:
        writer.write(SSE_HEAD)
        await writer.drain()
        await asyncio.sleep(0.5)
        writer.write(chunk(CHUNK) + b"0\r\n\r\n")
        await writer.drain()

    async def main() -> None:
        async with serve(late_chunk) as server:
            with forwarder(first_byte_timeout=10.0, idle_timeout=0.2) as fwd:
                started = time.perf_counter()
                response = await request(fwd, server.url)
                waited = time.perf_counter() - started
                assert waited < 0.2, f"the headers were held {waited:.3f}s"
                assert response.status == 200
                assert response.content_type == "text/event-stream"
                assert response.body is None
                # the first chunk waits under the first-byte limit (10 s), not the idle one (0.2 s)
                assert await response.next_chunk() == CHUNK
                assert time.perf_counter() - started >= 0.45
                assert await response.next_chunk() is None

    run(main())


def test_a_first_chunk_sent_with_the_headers_comes_as_body() -> None:
    async def together(writer: asyncio.StreamWriter) -> None:
        writer.write(SSE_HEAD + chunk(CHUNK) + chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        await writer.drain()

    async def main() -> None:
        async with serve(together) as server:
            with forwarder() as fwd:
                response = await request(fwd, server.url)
                assert response.body == CHUNK
                assert await response.next_chunk() == b"data: [DONE]\n\n"
                assert await response.next_chunk() is None

    run(main())


def test_a_buffered_answer_is_whole_and_its_headers_are_built_once() -> None:
    async def answer(writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-backend: a\r\n"
            b'content-length: 11\r\n\r\n{"ok":true}'
        )
        await writer.drain()
        await asyncio.sleep(30)

    async def main() -> None:
        async with serve(answer) as server:
            with forwarder() as fwd:
                response = await request(fwd, server.url, buffer=True)
                assert response.body == b'{"ok":true}'
                headers = response.headers
                assert headers == [("content-type", "application/json"), ("x-backend", "a")]
                assert response.headers is headers  # one list, not rebuilt per access

    run(main())
