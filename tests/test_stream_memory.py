"""Memory an open stream holds (issue 16 item 5): a long prompt is not kept for the stream's life.

A stream stays open for minutes; the gateway used to keep its request body and the decoded request
(two copies of the prompt) until the end, and each follower of a shared stream its own copy of the
body. 300 identical streams with a 32 KiB prompt are held open through a real gateway against a slow
mock, proxied one by one (cache off) and coalesced onto one generation (the default), and the
gateway's RSS growth per open stream must stay well below what the copies would add. Measured on
this machine: forwarded ~89 KiB per stream (~130 with the copies), coalesced ~46 (~79). Every
stream must still end with `[DONE]`.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import HTTP, Processes, backend_entry, wait_for

STREAMS = 300
PROMPT_KIB = 32


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def hold(port: int, pid: int, idle: int) -> tuple[float, int]:
    content = "word " * (PROMPT_KIB * 1024 // 5)
    body = json.dumps(
        {"model": "mock-model", "stream": True, "messages": [{"role": "user", "content": content}]}
    ).encode()
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body
    opened = asyncio.Event()
    state = {"open": 0, "done": 0}

    async def one(gate: asyncio.Semaphore) -> None:
        async with gate:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), head[:200]
            state["open"] += 1
            if state["open"] == STREAMS:
                opened.set()
            rest = bytearray()
            while b"[DONE]" not in rest:
                data = await reader.read(65536)
                if not data:
                    break
                rest += data
            state["done"] += b"[DONE]" in rest
        finally:
            writer.close()

    gate = asyncio.Semaphore(100)
    tasks = [asyncio.create_task(one(gate)) for _ in range(STREAMS)]
    await asyncio.wait_for(opened.wait(), 60)
    # every stream answered on the client side; wait until the gateway also counts them all open
    await asyncio.to_thread(
        wait_for,
        lambda: HTTP.get(f"http://127.0.0.1:{port}/metrics", timeout=5).json()["streams_active"] == STREAMS,
        30,
        what=f"{STREAMS} streams active in the gateway",
    )
    samples = sorted(rss_kib(pid) for _ in range(5))
    per_stream = (samples[2] - idle) / STREAMS
    await asyncio.wait_for(asyncio.gather(*tasks), 120)
    return per_stream, state["done"]


# Limits halfway between the measurements with and without the copies (see above).
@pytest.mark.parametrize(
    ("config", "limit_kib"),
    [({"cache": {"enabled": False}}, 110), ({}, 62)],
    ids=["forwarded", "coalesced"],
)
def test_an_open_stream_does_not_keep_its_prompt(
    procs: Processes, config: dict[str, Any], limit_kib: int
) -> None:
    # 3 events over ~24 s: every stream is open (and waiting for its next chunk) when RSS is read.
    mock = procs.mock("--tokens", "3", "--token-rate", "0.125")
    gateway = procs.gateway_for([backend_entry(mock)], config={"logging": {"level": "warning"}, **config})
    for _ in range(20):  # warm up: pools, allocator, first requests
        assert HTTP.get(gateway.url + "/health", timeout=5).status_code == 200
    wait_for(lambda: HTTP.get(gateway.url + "/metrics", timeout=5).json()["requests_active"] <= 1, 10)
    idle = sorted(rss_kib(gateway.popen.pid) for _ in range(5))[2]
    per_stream, done = asyncio.run(hold(gateway.port, gateway.popen.pid, idle))
    assert done == STREAMS, f"only {done} of {STREAMS} streams ended with [DONE]"
    assert per_stream < limit_kib, (
        f"{per_stream:.1f} KiB per open stream with a {PROMPT_KIB} KiB prompt (limit {limit_kib})"
    )
