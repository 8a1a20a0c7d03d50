"""Memory an open stream holds (issue 16 item 5): a long prompt is not kept for the stream's life.

A stream stays open for minutes; the gateway used to keep its request body and the decoded request
(two copies of the prompt) until the end, and each follower of a shared stream its own copy of the
body. 300 streams are held open through a real gateway against a slow mock, proxied one by one
(cache off) and coalesced onto one generation (the default), once with a 32 KiB prompt and once
with a tiny one, each in a fresh gateway. What a stream costs apart from its prompt (connections,
buffers, tasks) differs by machine, so the test compares the two: the 32 KiB prompt may add well
under one copy of itself per open stream. Streams are opened a few at a time, so the prompts in
flight at once (freed, but kept by the allocator) stay a handful. Granian's Rust side allocates with
jemalloc, which keeps freed pages for 10 s before it gives them back: the request buffers that read
the prompts would count for 25 KiB per stream (measured). The gateway runs with jemalloc's decay at
0 here, so its RSS shows what is held rather than what was freed a moment ago; with tiny prompts
(the benchmark's) the decay changes RSS by ~1 KiB per stream (docs/benchmarks.md). Measured on this
machine: the 32 KiB prompt adds ~4 KiB per open stream (~25 with jemalloc's decay; one kept copy of
the prompt would add 32 or more). Every stream must end with `[DONE]`.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import HTTP, Processes, backend_entry, wait_for

# jemalloc's options in Granian's extension (tikv-jemallocator reads this prefixed variable)
JEMALLOC_NO_DECAY = {"_RJEM_MALLOC_CONF": "dirty_decay_ms:0,muzzy_decay_ms:0"}
STREAMS = 300
PROMPT_KIB = 32
OPENING = 4  # streams being opened at once (each one's prompt is in flight until its head arrives)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def stream_request(port: int, prompt_kib: int) -> bytes:
    content = "word " * (prompt_kib * 1024 // 5) if prompt_kib else "hi"
    body = json.dumps(
        {"model": "mock-model", "stream": True, "messages": [{"role": "user", "content": content}]}
    ).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def hold(port: int, pid: int, idle: int, prompt_kib: int) -> tuple[float, int]:
    """Open STREAMS streams, read the gateway's RSS growth per stream while all are open, finish them."""
    request = stream_request(port, prompt_kib)
    opened = asyncio.Event()
    state = {"open": 0, "done": 0}

    async def one(gate: asyncio.Semaphore) -> None:
        async with gate:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
        try:
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

    gate = asyncio.Semaphore(OPENING)
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


def per_open_stream(procs: Processes, config: dict[str, Any], prompt_kib: int) -> float:
    """RSS growth per open stream in a fresh gateway (and mock), every stream ending with [DONE]."""
    # 3 events over ~12 s: every stream is open (and waiting for its next chunk) when RSS is read.
    mock = procs.mock("--tokens", "3", "--token-rate", "0.25")
    gateway = procs.gateway_for(
        [backend_entry(mock)], config={"logging": {"level": "warning"}, **config}, env=JEMALLOC_NO_DECAY
    )
    for _ in range(20):  # warm up: pools, allocator, first requests
        assert HTTP.get(gateway.url + "/health", timeout=5).status_code == 200
    wait_for(lambda: HTTP.get(gateway.url + "/metrics", timeout=5).json()["requests_active"] <= 1, 10)
    idle = sorted(rss_kib(gateway.popen.pid) for _ in range(5))[2]
    per_stream, done = asyncio.run(hold(gateway.port, gateway.popen.pid, idle, prompt_kib))
    assert done == STREAMS, f"only {done} of {STREAMS} streams ended with [DONE]"
    gateway.kill()
    mock.kill()
    return per_stream


@pytest.mark.parametrize("config", [{"cache": {"enabled": False}}, {}], ids=["forwarded", "coalesced"])
def test_an_open_stream_does_not_keep_its_prompt(procs: Processes, config: dict[str, Any]) -> None:
    tiny = per_open_stream(procs, config, 0)
    long = per_open_stream(procs, config, PROMPT_KIB)
    added = long - tiny
    print(
        f"per open stream: {tiny:.1f} KiB with a tiny prompt, {long:.1f} with {PROMPT_KIB} KiB (+{added:.1f})"
    )
    # one kept copy of the prompt (the body, or the decoded request) would add PROMPT_KIB or more
    assert added < PROMPT_KIB / 2, (
        f"a {PROMPT_KIB} KiB prompt adds {added:.1f} KiB per open stream "
        f"({tiny:.1f} KiB with a tiny prompt, {long:.1f} with the long one)"
    )
