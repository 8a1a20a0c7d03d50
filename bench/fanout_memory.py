"""Gateway memory per follower of one live stream (issue 12: target < 10 KB beyond the shared chunk log).

Starts `ntonix mock` and `ntonix run` on free loopback ports, opens one slow
streaming chat (the leader), reads the gateway's RSS (/proc/PID/status VmRSS),
attaches N identical streaming requests (followers, raw asyncio sockets that
keep reading), waits until the gateway reports all of them attached
(`streams_active`) and caught up with the log, reads the RSS again, and does
that again for a second batch of N while the first stays attached. The first
batch pays one-time costs (allocator arenas, Granian's and asyncio's first
growth); the second batch's growth per follower, less the chunk log's growth
meanwhile, is the marginal cost to quote (freed memory of an earlier round
cannot hide it: nothing was freed). Last, the same number of idle keep-alive
connections (one `/health` each) is opened: run on a fresh gateway (`--rounds
0`) it gives the share a bare HTTP connection costs in Granian (hyper's state
and buffers); after rounds it mostly reuses freed memory. Bounded by
deadlines; every process is killed by PID at the end.

    python bench/fanout_memory.py [--followers 1000] [--batches 2]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def wait_for(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            value = predicate()
            if value:
                return value
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {what}")


def start(args: list[str], port: int, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ntonix", *args], stdout=out, stderr=subprocess.STDOUT)
    wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200, 30, "health")
    return proc


class Follower:
    """One streaming client on a raw socket that reads everything it is sent."""

    def __init__(self) -> None:
        self.received = 0
        self.writer: asyncio.StreamWriter | None = None
        self.task: asyncio.Task[None] | None = None

    async def run(self, port: int, request: bytes) -> None:
        reader, self.writer = await asyncio.open_connection("127.0.0.1", port)
        self.writer.write(request)
        while True:
            data = await reader.read(65536)
            if not data:
                return
            self.received += len(data)

    def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
        if self.writer is not None:
            self.writer.close()


def stream_request(port: int, prompt: str) -> bytes:
    body = json.dumps(
        {"model": "mock-model", "messages": [{"role": "user", "content": prompt}], "stream": True}
    ).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n"
        "content-type: application/json\r\nx-mock-tokens: 2000\r\nx-mock-token-rate: 5\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def one_round(gateway_port: int, pid: int, followers: int, batches: int, prompt: str) -> dict[str, Any]:
    url = f"http://127.0.0.1:{gateway_port}"
    request = stream_request(gateway_port, prompt)
    async with httpx.AsyncClient(timeout=10.0) as client:

        async def metric(name: str) -> int:
            return int((await client.get(url + "/metrics")).json()[name])

        leader = Follower()
        leader.task = asyncio.create_task(leader.run(gateway_port, request))
        deadline = time.monotonic() + 30
        while leader.received < 2000:  # headers and a few chunks: the generation is live
            assert time.monotonic() < deadline, "the leader got nothing"
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        gate = asyncio.Semaphore(100)
        clients: list[Follower] = []
        steps: list[tuple[int, float]] = [(rss_kb(pid), leader.received / 1024)]

        async def attach(f: Follower) -> None:
            async with gate:
                f.task = asyncio.create_task(f.run(gateway_port, request))
                await asyncio.sleep(0)

        for _ in range(batches):
            log_before = leader.received
            batch = [Follower() for _ in range(followers)]
            clients += batch
            await asyncio.gather(*(attach(f) for f in batch))
            deadline = time.monotonic() + 120
            while await metric("streams_active") < len(clients) + 1:
                assert time.monotonic() < deadline, "followers did not all attach"
                await asyncio.sleep(0.2)
            while min(f.received for f in batch) < log_before:  # each caught up with the log
                assert time.monotonic() < deadline, "followers did not catch up"
                await asyncio.sleep(0.2)
            await asyncio.sleep(1.0)
            steps.append((rss_kb(pid), leader.received / 1024))
        for f in [leader, *clients]:
            f.close()
        deadline = time.monotonic() + 30
        while await metric("streams_active") > 0:
            assert time.monotonic() < deadline, "streams did not end"
            await asyncio.sleep(0.2)
        per_batch = [
            (rss - steps[i][0] - (log - steps[i][1])) / followers for i, (rss, log) in enumerate(steps[1:])
        ]
        return {
            "followers_per_batch": followers,
            "rss_kb": [rss for rss, _ in steps],
            "chunk_log_kb": round(steps[-1][1], 1),  # about what the leader received (headers included)
            "kb_per_follower_by_batch": [round(x, 2) for x in per_batch],
        }


async def idle_connections(gateway_port: int, pid: int, count: int) -> dict[str, Any]:
    """The same number of keep-alive connections that each asked `/health` once: Granian's own share."""
    request = f"GET /health HTTP/1.1\r\nhost: 127.0.0.1:{gateway_port}\r\n\r\n".encode()
    before = rss_kb(pid)
    writers = []
    for _ in range(count):
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway_port)
        writer.write(request)
        await reader.readuntil(b"\r\n\r\n")
        writers.append(writer)
    await asyncio.sleep(1.0)
    after = rss_kb(pid)
    for writer in writers:
        writer.close()
    await asyncio.sleep(1.0)
    return {"idle_connections": count, "kb_per_connection": (after - before) / count}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--followers", type=int, default=1000)
    parser.add_argument("--batches", type=int, default=2, help="batches of followers attached per stream")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fanout-memory-"))
    mock_port, gateway_port = free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(
            start(["mock", "--host", "127.0.0.1", "--port", str(mock_port)], mock_port, tmp / "mock.log")
        )
        config = tmp / "gateway.json"
        config.write_text(json.dumps({"logging": {"level": "warning"}, "server": {"threads": 1}}))
        gateway_args = ["run", "--config", str(config), "--port", str(gateway_port), "--bind", "127.0.0.1"]
        gateway_args += ["--backend", f"127.0.0.1:{mock_port}"]
        gateway = start(gateway_args, gateway_port, tmp / "gateway.log")
        procs.append(gateway)
        for n in range(args.rounds):
            result = asyncio.run(
                one_round(gateway_port, gateway.pid, args.followers, args.batches, f"memory round {n}")
            )
            print(json.dumps({"round": n + 1, **result}))
        print(json.dumps(asyncio.run(idle_connections(gateway_port, gateway.pid, args.followers))))
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, 9)
            proc.wait(timeout=10)


if __name__ == "__main__":
    main()
