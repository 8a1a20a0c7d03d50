"""Does Granian's RSGI `transport.send_bytes` push back on a client that stops reading? (ADR 009)

One embedded Granian server (RSGI, loopback, free port) streams 64 KiB chunks to
a raw socket client with SO_RCVBUF 4096 that sends its request and then never
reads. For each `await transport.send_bytes(chunk)` the app notes how long it
took; the script prints the bytes "sent" without the client reading one, the
slowest await, and the server process's RSS growth, then closes the client and
reports whether a later send raises.

    python bench/granian_backpressure.py [--mb 32]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import threading
import time
from typing import Any

from granian.constants import Interfaces
from granian.log import LogLevels
from granian.server.embed import Server

CHUNK = b"x" * 65536


def rss_kb() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class App:
    def __init__(self, total: int) -> None:
        self.total = total
        self.result: dict[str, Any] = {}
        self.done = threading.Event()
        self.client_closed = threading.Event()

    async def __call__(self, scope: Any, proto: Any) -> None:
        if scope.path != "/stream":
            proto.response_bytes(200, [("content-type", "text/plain")], b"ok")
            return
        transport = proto.response_stream(200, [("content-type", "application/octet-stream")])
        before = rss_kb()
        slowest = 0.0
        sent = 0
        started = time.perf_counter()
        while sent < self.total:
            t0 = time.perf_counter()
            await transport.send_bytes(CHUNK)
            slowest = max(slowest, time.perf_counter() - t0)
            sent += len(CHUNK)
        self.result = {
            "sent_bytes": sent,
            "seconds": time.perf_counter() - started,
            "slowest_await_ms": slowest * 1000.0,
            "rss_growth_kb": rss_kb() - before,
        }
        self.done.set()
        await asyncio.get_running_loop().run_in_executor(None, self.client_closed.wait, 10.0)
        try:
            for _ in range(64):
                await transport.send_bytes(CHUNK)
                await asyncio.sleep(0.01)
            self.result["send_after_close"] = "no error"
        except Exception as err:
            self.result["send_after_close"] = f"raised {type(err).__name__}"


def stalled_client(port: int, app: App) -> None:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"GET /stream HTTP/1.1\r\nhost: x\r\n\r\n")
    app.done.wait(120.0)  # never reads a byte
    sock.close()
    app.client_closed.set()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=32, help="bytes to stream to the stalled client (MiB)")
    args = parser.parse_args()
    app = App(args.mb << 20)
    port = free_port()
    server = Server(app, address="127.0.0.1", port=port, interface=Interfaces.RSGI, log_level=LogLevels.error)
    serving = asyncio.create_task(server.serve())
    deadline = time.monotonic() + 10.0
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "server did not start"
            await asyncio.sleep(0.05)
    client = threading.Thread(target=stalled_client, args=(port, app), daemon=True)
    client.start()
    await asyncio.get_running_loop().run_in_executor(None, app.done.wait, 120.0)
    await asyncio.get_running_loop().run_in_executor(None, client.join, 15.0)
    await asyncio.sleep(1.0)
    print(app.result)
    server.stop()  # type: ignore[no-untyped-call]
    serving.cancel()


if __name__ == "__main__":
    asyncio.run(main())
