"""`ntonix._core.Forwarder` driven directly on an asyncio loop against scripted local servers.

Each server is a raw asyncio TCP server on 127.0.0.1:0 that reads one request
head, then plays a script (headers now, a chunk later, or silence) while it
watches for the client closing the connection; `closed` is set on EOF, so a
test can tell whether cancelling the Python side really closed the upstream
connection (issue 9 items 10 and 24). The TLS tests run a keep-alive HTTPS
server on a certificate signed by a CA made in the test with `cryptography`,
trusted through `Forwarder(ca_file=...)` (issue 10 item 2, SPEC §8).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ntonix._core import Forwarder, NtonixError, UpstreamConnectError, UpstreamProtocolError, UpstreamResponse

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
def forwarder(ca_file: str | None = None, **timeouts: float) -> Iterator[Forwarder]:
    loop = asyncio.get_running_loop()
    fwd = Forwarder(loop, ca_file=ca_file, **timeouts)
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


def test_host_is_the_backend_authority_never_the_clients() -> None:
    async def answer(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(30)

    async def main() -> None:
        async with serve(answer) as server:
            with forwarder() as fwd:
                headers = [("Host", "gateway.example:8080"), ("content-type", "application/json")]
                response = await fwd.request("POST", server.url, headers, b"{}", True)
                assert response.status == 204
        authority = server.url.split("/")[2]
        hosts = [line for line in server.heads[0].lower().split(b"\r\n") if line.startswith(b"host:")]
        assert hosts == [b"host: " + authority.encode()]

    run(main())


def test_urls_of_other_schemes_are_refused() -> None:
    async def main() -> None:
        with forwarder() as fwd:
            with pytest.raises(ValueError, match="http:// or https://"):
                fwd.request("GET", "ftp://127.0.0.1:21/x", [], b"")
            with pytest.raises(ValueError, match="http:// or https://"):
                fwd.probe("ws://127.0.0.1:1/health", 1.0)

    run(main())


# -- upstream TLS ---------------------------------------------------------------------------------


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca_and_leaf(directory: Path) -> tuple[Path, ssl.SSLContext]:
    """A CA (its PEM file) and a server context with a leaf it signed for 127.0.0.1 and localhost."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("ntonix test CA"))
        .issuer_name(_name("ntonix test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, cert_path, key_path = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    return ca_path, context


@dataclass
class KeepAliveServer:
    """Answers every request of every connection with a small JSON body; counts connections."""

    url: str = ""
    connections: int = 0
    heads: list[bytes] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.heads.append(head)
                for line in head.lower().split(b"\r\n"):
                    if line.startswith(b"content-length:"):
                        await reader.readexactly(int(line.split(b":", 1)[1]))
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    b'content-length: 12\r\n\r\n{"tls":true}'
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def serve_https(context: ssl.SSLContext, path: str) -> AsyncIterator[KeepAliveServer]:
    server = KeepAliveServer()
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0, ssl=context)
    port = listener.sockets[0].getsockname()[1]
    server.url = f"https://127.0.0.1:{port}{path}"
    try:
        yield server
    finally:
        listener.close()


def test_https_backend_with_a_path_prefix_and_a_pooled_connection(tmp_path: Path) -> None:
    ca, context = make_ca_and_leaf(tmp_path)

    async def main() -> None:
        async with serve_https(context, "/openai/v1/chat/completions") as server:
            with forwarder(ca_file=str(ca)) as fwd:
                for _ in range(5):
                    response = await request(fwd, server.url, buffer=True)
                    assert response.status == 200
                    assert response.body == b'{"tls":true}'
                health = server.url.replace("/openai/v1/chat/completions", "/openai/health")
                assert await fwd.probe(health, 5.0) == 200
        assert server.connections == 1, "each request made a TLS handshake of its own"
        assert [head.split(b"\r\n")[0] for head in server.heads] == [
            *[b"POST /openai/v1/chat/completions HTTP/1.1"] * 5,
            b"GET /openai/health HTTP/1.1",
        ]
        authority = server.url.split("/")[2].encode()
        assert all(b"\r\nhost: " + authority + b"\r\n" in head.lower() + b"\r\n" for head in server.heads)

    run(main())


def test_https_backend_not_trusted_is_a_connect_error(tmp_path: Path) -> None:
    _, context = make_ca_and_leaf(tmp_path)

    async def main() -> None:
        async with serve_https(context, "/v1/chat/completions") as server:
            # system roots only: the test CA is unknown
            with forwarder() as fwd, pytest.raises(UpstreamConnectError, match="certificate"):
                await request(fwd, server.url, buffer=True)
        assert server.heads == []  # nothing was sent: another backend may be tried

    run(main())


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "cannot be read"), (b"not a certificate\n", "holds no PEM certificate")],
)
def test_a_bad_ca_file_is_refused_at_construction(
    tmp_path: Path, content: bytes | None, message: str
) -> None:
    path = tmp_path / "ca.pem"
    if content is not None:
        path.write_bytes(content)

    async def main() -> None:
        with pytest.raises(ValueError, match=message):
            Forwarder(asyncio.get_running_loop(), ca_file=str(path))

    run(main())


# -- the body pump: one tokio task reads a streamed body for its whole life ------------------------


def test_chunks_read_while_the_loop_is_busy_are_answered_at_once_joined_and_in_order() -> None:
    events = [b'data: {"n":%d}\n\n' % n for n in range(6)]
    written = asyncio.Event()

    async def paced(writer: asyncio.StreamWriter) -> None:
        writer.write(SSE_HEAD)
        await writer.drain()
        await asyncio.sleep(0.05)  # not with the headers: the first chunk comes from next_chunk
        for event in events:
            writer.write(chunk(event))
            await writer.drain()
            await asyncio.sleep(0.01)  # one frame each, as a paced backend sends them
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        written.set()
        await asyncio.sleep(30)

    async def main() -> None:
        async with serve(paced) as server:
            with forwarder() as fwd:
                response = await request(fwd, server.url)
                assert response.body is None
                first = await response.next_chunk()  # starts the pump
                assert first == events[0]
                await asyncio.wait_for(written.wait(), 5)
                # The loop is busy (blocked) while the pump reads the rest and the end of the body.
                time.sleep(0.3)
                pending = response.next_chunk()
                assert pending.done(), "queued chunks wait for no hop"
                rest = await pending
                assert rest == b"".join(events[1:]), "the queued frames come joined, bytes and order kept"
                end = response.next_chunk()
                assert end.done()
                assert await end is None

    run(main())


def test_dropping_a_response_while_its_pump_waits_closes_the_upstream_connection() -> None:
    async def main() -> None:
        async with serve(first_chunk_then_silence) as server:
            with forwarder(idle_timeout=30.0) as fwd:
                response = await request(fwd, server.url)
                assert response.body == CHUNK
                waiting = response.next_chunk()  # the pump now waits on the silent backend
                await asyncio.sleep(0)
                assert not server.closed.is_set()
                del response  # the last reference: nobody will ever read the rest
                await closed_soon(server)
                assert await asyncio.wait_for(waiting, 5) is None

    run(main())


def test_a_second_next_chunk_while_one_is_awaited_is_refused_and_loses_nothing() -> None:
    async def main() -> None:
        async with serve(first_chunk_then_silence) as server:
            with forwarder(idle_timeout=30.0) as fwd:
                response = await request(fwd, server.url)
                waiting = response.next_chunk()
                with pytest.raises(NtonixError, match="already awaited"):
                    response.next_chunk()
                assert not waiting.done()
                assert not server.closed.is_set(), "the refused call must not give the stream up"
                response.close()
                await closed_soon(server)
                assert await asyncio.wait_for(waiting, 5) is None

    run(main())


def test_read_after_next_chunk_is_refused_and_next_chunk_after_read_is_the_end() -> None:
    async def whole(writer: asyncio.StreamWriter) -> None:
        writer.write(SSE_HEAD + chunk(CHUNK))
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        await writer.drain()

    async def main() -> None:
        async with serve(whole) as server:
            with forwarder() as fwd:
                streamed = await request(fwd, server.url)
                assert await streamed.next_chunk() == b"data: [DONE]\n\n"
                with pytest.raises(NtonixError, match="already being read"):
                    streamed.read()
                assert await streamed.next_chunk() is None
            with forwarder() as fwd:
                whole_body = await request(fwd, server.url)
                assert whole_body.body == CHUNK
                assert await whole_body.read() == b"data: [DONE]\n\n"
                assert await whole_body.next_chunk() is None

    run(main())


def test_an_error_after_queued_chunks_comes_after_them_once() -> None:
    written = asyncio.Event()

    async def broken(writer: asyncio.StreamWriter) -> None:
        writer.write(SSE_HEAD)
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(chunk(CHUNK))
        await writer.drain()
        await asyncio.sleep(0.01)
        writer.write(chunk(b"data: 2\n\n") + b"ff\r\ncut short")  # a chunk that never completes
        await writer.drain()
        written.set()
        writer.transport.abort()

    async def main() -> None:
        async with serve(broken) as server:
            with forwarder() as fwd:
                response = await request(fwd, server.url)
                assert await response.next_chunk() == CHUNK
                await asyncio.wait_for(written.wait(), 5)
                time.sleep(0.3)  # the loop is busy while the pump meets the broken chunk
                got = b""
                with pytest.raises(UpstreamProtocolError):
                    while True:
                        part = await response.next_chunk()
                        assert part is not None, "the error must not be swallowed into an end"
                        got += part
                assert got.startswith(b"data: 2\n\n"), got
                assert await response.next_chunk() is None

    run(main())
