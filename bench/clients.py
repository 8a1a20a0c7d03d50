"""Load clients for the streaming benchmarks: TTFT over one connection, and many open streams.

``stream_latency`` sends sequential streaming chat requests over one raw keep-alive
socket and timestamps, per request, the arrival of the first ``data:`` event (time to
first token) and of the end of the response (total stream time). ``hold_streams``
opens N concurrent streaming requests with asyncio, samples a callback (the gateway's
RSS) while all of them are open, then checks that every one ends with ``[DONE]``.
Both parse HTTP/1.1 by hand (status line, Content-Length or chunked bodies), so the
client adds the same small, constant cost to every contestant. Every loop is bounded
in count and by a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field


class ProtocolError(Exception):
    """The server's answer is not the HTTP/1.1 we expect."""


class ResponseParser:
    """Incremental HTTP/1.1 response parser keeping the decoded body."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.status = 0
        self.headers: dict[str, str] = {}
        self.headers_done = False
        self.body = bytearray()
        self.complete = False
        self.keep_alive = True
        self._length: int | None = None
        self._chunked = False
        self._chunk_left = -1  # -1: expecting a size line; -2: expecting trailers
        self._until_close = False

    def feed(self, data: bytes) -> None:
        """Consume bytes received from the socket; sets ``complete`` at the end of the body."""
        self._buf += data
        if not self.headers_done:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buf) > 65536:
                    raise ProtocolError("response headers larger than 64 KiB")
                return
            self._parse_head(bytes(self._buf[:end]))
            del self._buf[: end + 4]
        if self._chunked:
            self._decode_chunked()
        elif self._length is not None:
            take = min(len(self._buf), self._length - len(self.body))
            self.body += self._buf[:take]
            del self._buf[:take]
            if len(self.body) >= self._length:
                self.complete = True
        else:
            self.body += self._buf
            self._buf.clear()

    def feed_eof(self) -> None:
        if self._until_close and self.headers_done:
            self.complete = True
        elif not self.complete:
            raise ProtocolError("connection closed before the response was complete")

    def _parse_head(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
            raise ProtocolError(f"bad status line {lines[0]!r}")
        self.status = int(parts[1])
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()
        self.headers_done = True
        conn = self.headers.get("connection", "").lower()
        self.keep_alive = conn != "close" and parts[0] == "HTTP/1.1"
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            self._chunked = True
        elif "content-length" in self.headers:
            self._length = int(self.headers["content-length"])
            if self._length == 0:
                self.complete = True
        elif self.status in (204, 304) or 100 <= self.status < 200:
            self.complete = True
        else:
            self._until_close = True
            self.keep_alive = False

    def _decode_chunked(self) -> None:
        buf = self._buf
        while not self.complete:
            if self._chunk_left == -1:
                eol = buf.find(b"\r\n")
                if eol < 0:
                    return
                size_text = bytes(buf[:eol]).split(b";", 1)[0].strip()
                try:
                    size = int(size_text, 16)
                except ValueError as exc:
                    raise ProtocolError(f"bad chunk size {size_text!r}") from exc
                del buf[: eol + 2]
                self._chunk_left = size if size > 0 else -2
            elif self._chunk_left == -2:
                eol = buf.find(b"\r\n")
                if eol < 0:
                    return
                empty = eol == 0
                del buf[: eol + 2]
                if empty:
                    self.complete = True
            else:
                if len(buf) < self._chunk_left + 2:
                    take = min(len(buf), self._chunk_left)
                    self.body += buf[:take]
                    del buf[:take]
                    self._chunk_left -= take
                    if self._chunk_left > 0 or len(buf) < 2:
                        return
                    # Payload consumed; only the CRLF is left to check below.
                else:
                    self.body += buf[: self._chunk_left]
                    del buf[: self._chunk_left]
                    self._chunk_left = 0
                if bytes(buf[:2]) != b"\r\n":
                    raise ProtocolError("chunk not followed by CRLF")
                del buf[:2]
                self._chunk_left = -1


def build_request(host: str, port: int, body: bytes, extra: dict[str, str] | None = None) -> bytes:
    headers = {
        "Host": f"{host}:{port}",
        "Content-Type": "application/json",
        "Accept": "text/event-stream",
        "Content-Length": str(len(body)),
        **(extra or {}),
    }
    head = "POST /v1/chat/completions HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return head.encode("latin-1") + b"\r\n" + body


def count_events(body: bytes) -> tuple[int, bool]:
    """Number of ``data:`` events that are not ``[DONE]``, and whether ``[DONE]`` was seen."""
    events = [line[5:].strip() for line in body.split(b"\n") if line.startswith(b"data:")]
    done = b"[DONE]" in events
    return len([e for e in events if e != b"[DONE]"]), done


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile (the same definition for every contestant)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(pct / 100.0 * len(ordered))))
    return ordered[rank - 1]


@dataclass
class StreamLatency:
    requests: int
    errors: int
    min_events: int
    ttft_p50_ms: float
    ttft_p99_ms: float
    total_p50_ms: float
    total_p99_ms: float
    error_samples: list[str] = field(default_factory=list)


def stream_latency(
    host: str, port: int, body: bytes, count: int, deadline_s: float, timeout_s: float = 10.0
) -> StreamLatency:
    """Send ``count`` streaming requests one after the other on one keep-alive connection."""
    request = build_request(host, port, body)
    ttft: list[float] = []
    total: list[float] = []
    errors: list[str] = []
    min_events = 1 << 30
    stop_at = time.monotonic() + deadline_s
    sock: socket.socket | None = None
    try:
        for _ in range(count):
            if time.monotonic() > stop_at:
                errors.append("deadline reached before all requests were sent")
                break
            if sock is None:
                sock = socket.create_connection((host, port), timeout=timeout_s)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            parser = ResponseParser()
            first: float | None = None
            t0 = time.perf_counter()
            try:
                sock.sendall(request)
                while not parser.complete:
                    data = sock.recv(65536)
                    now = time.perf_counter()
                    if not data:
                        parser.feed_eof()
                        break
                    parser.feed(data)
                    if first is None and b"data:" in parser.body:
                        first = now
                end = time.perf_counter()
            except (OSError, ProtocolError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                sock.close()
                sock = None
                continue
            events, done = count_events(bytes(parser.body))
            if parser.status != 200 or first is None or not done:
                errors.append(
                    f"status {parser.status}, {events} events, [DONE] {'seen' if done else 'missing'}"
                )
            else:
                ttft.append((first - t0) * 1000.0)
                total.append((end - t0) * 1000.0)
                min_events = min(min_events, events)
            if not parser.keep_alive:
                sock.close()
                sock = None
    finally:
        if sock is not None:
            sock.close()
    return StreamLatency(
        requests=len(ttft),
        errors=len(errors),
        min_events=min_events if ttft else 0,
        ttft_p50_ms=percentile(ttft, 50),
        ttft_p99_ms=percentile(ttft, 99),
        total_p50_ms=percentile(total, 50),
        total_p99_ms=percentile(total, 99),
        error_samples=errors[:5],
    )


@dataclass
class HoldResult:
    requested: int
    opened: int
    completed: int
    peak_open: int
    all_open: bool
    open_seconds: float
    total_seconds: float
    samples_all_open: list[int]
    rss_all_open_kb: int
    rss_peak_kb: int
    errors: int
    error_samples: list[str] = field(default_factory=list)


async def _hold_streams(
    host: str,
    port: int,
    body: bytes,
    count: int,
    sample: Callable[[], int],
    connect_concurrency: int,
    open_deadline_s: float,
    total_deadline_s: float,
    progress: Callable[[str], None] | None,
) -> HoldResult:
    request = build_request(host, port, body)
    gate = asyncio.Semaphore(connect_concurrency)
    state = {"opened": 0, "completed": 0, "peak": 0}
    errors: list[str] = []
    all_open = asyncio.Event()
    writers: list[asyncio.StreamWriter] = []

    async def one() -> None:
        parser = ResponseParser()
        writer: asyncio.StreamWriter | None = None
        try:
            async with gate:
                reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
                writers.append(writer)
                writer.write(request)
                await writer.drain()
                while not parser.headers_done:
                    data = await reader.read(65536)
                    if not data:
                        parser.feed_eof()
                        break
                    parser.feed(data)
            if parser.status != 200:
                raise ProtocolError(f"status {parser.status}")
            state["opened"] += 1
            state["peak"] = max(state["peak"], state["opened"] - state["completed"])
            if state["opened"] == count:
                all_open.set()
            while not parser.complete:
                data = await reader.read(65536)
                if not data:
                    parser.feed_eof()
                    break
                parser.feed(data)
            _, done = count_events(bytes(parser.body))
            if not done:
                raise ProtocolError("stream ended without [DONE]")
            state["completed"] += 1
        except (OSError, ProtocolError, asyncio.IncompleteReadError) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            if writer is not None:
                writer.close()

    start = time.monotonic()
    tasks = [asyncio.create_task(one()) for _ in range(count)]
    rss_peak = 0
    samples_all_open: list[int] = []
    open_seconds = float("nan")
    sampler_deadline = start + total_deadline_s
    next_report = start + 5.0

    def report() -> None:
        if progress is not None:
            progress(
                f"streams: {state['opened']} opened, {state['completed']} completed, "
                f"{len(errors)} errors after {time.monotonic() - start:.0f} s"
            )

    # Sample while streams open; once all are open, take a few samples and stop sampling.
    while time.monotonic() < sampler_deadline and not all(t.done() for t in tasks):
        rss_peak = max(rss_peak, sample())
        if all_open.is_set() and state["completed"] == 0:
            if not samples_all_open:
                open_seconds = time.monotonic() - start
            samples_all_open.append(sample())
            if len(samples_all_open) >= 5:
                break
        elif time.monotonic() - start > open_deadline_s and not all_open.is_set():
            errors.append(f"only {state['opened']} of {count} streams open after {open_deadline_s:.0f} s")
            # The server holds no more: give up now rather than wait for the open ones to finish.
            sampler_deadline = time.monotonic()
            break
        if time.monotonic() >= next_report:
            report()
            next_report += 5.0
        await asyncio.sleep(0.2)
    report()
    remaining = max(0.1, sampler_deadline - time.monotonic())
    _done, pending = await asyncio.wait(tasks, timeout=remaining)
    for task in pending:
        task.cancel()
    if pending:
        errors.append(f"{len(pending)} streams still open at the deadline")
        await asyncio.wait(pending, timeout=5)
    for writer in writers:
        with contextlib.suppress(Exception):
            writer.close()
    rss_peak = max(rss_peak, sample())
    return HoldResult(
        requested=count,
        opened=state["opened"],
        completed=state["completed"],
        peak_open=state["peak"],
        all_open=bool(samples_all_open),
        open_seconds=open_seconds,
        total_seconds=time.monotonic() - start,
        samples_all_open=samples_all_open,
        rss_all_open_kb=int(statistics.median(samples_all_open)) if samples_all_open else 0,
        rss_peak_kb=rss_peak,
        errors=len(errors),
        error_samples=errors[:5],
    )


def hold_streams(
    host: str,
    port: int,
    body: bytes,
    count: int,
    sample: Callable[[], int],
    connect_concurrency: int = 200,
    open_deadline_s: float = 60.0,
    total_deadline_s: float = 180.0,
    progress: Callable[[str], None] | None = None,
) -> HoldResult:
    """Open ``count`` streams at once, sample ``sample()`` (RSS in KiB) while all are open."""
    return asyncio.run(
        _hold_streams(
            host, port, body, count, sample, connect_concurrency, open_deadline_s, total_deadline_s, progress
        )
    )
