"""What the upstream client (`ntonix._core.Forwarder`, rust/forward) holds per open stream, alone.

No Granian, no pipeline: one asyncio loop in this process drives a `Forwarder` (the gateway's
settings: tokio threads = cores) against a slow `ntonix mock` (5 tokens over 20 s, like the memory
benchmark), opens N streaming requests at once and, once every status line arrived, samples this
process's RSS while each stream waits in `next_chunk()`; then every stream is read to `[DONE]`.
The growth per stream is the Rust side (hyper connection, its buffers and task, the pool entry, the
pending `next_chunk` task) plus the few Python objects of a bare read loop (`--trace` counts them).

    python bench/forward_memory.py --streams 1000 [--trace]

Extra environment variables (`MALLOC_ARENA_MAX=2 ...`) apply to this process as usual.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import harness
from traced_run import mallinfo

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, os.environ.get("NTONIX_PYTHON", str(ROOT / "python")))  # another build: NTONIX_PYTHON

from ntonix._core import Forwarder, init_runtime  # noqa: E402


def rss_kb() -> int:
    return harness.rss_kb([os.getpid()])


async def hold(port: int, count: int, trace: bool) -> dict[str, object]:
    init_runtime(os.cpu_count() or 1)
    loop = asyncio.get_running_loop()
    forwarder = Forwarder(loop)
    loop.add_reader(forwarder.wake_fd, forwarder.drain)
    url = f"http://{harness.HOST}:{port}/v1/chat/completions"
    headers = [("content-type", "application/json")]
    # Warm-up: pool, runtime threads, first allocations.
    for _ in range(20):
        await (await forwarder.request("GET", f"http://{harness.HOST}:{port}/health", [], b"", True)).read()
    await asyncio.sleep(0.5)
    idle = int(statistics.median(rss_kb() for _ in range(5)))
    malloc_idle = mallinfo()
    if trace:
        tracemalloc.start(1)
        before = tracemalloc.take_snapshot()
    opened = asyncio.Event()
    state = {"opened": 0, "done": 0, "first_chunk_with_headers": 0}

    async def one() -> None:
        response = await forwarder.request("POST", url, headers, harness.STREAM_REQUEST, False)
        assert response.status == 200, response.status
        state["opened"] += 1
        if state["opened"] == count:
            opened.set()
        body = [response.body] if response.body else []
        state["first_chunk_with_headers"] += bool(body)
        while (chunk := await response.next_chunk()) is not None:
            body.append(chunk)
        if b"".join(body).rstrip().endswith(b"[DONE]"):
            state["done"] += 1

    sem = asyncio.Semaphore(200)

    async def gated() -> None:
        async with sem:
            task = asyncio.ensure_future(one())
            await asyncio.sleep(0)
        await task

    started = time.monotonic()
    tasks = [asyncio.ensure_future(gated()) for _ in range(count)]
    await asyncio.wait_for(opened.wait(), 17)
    open_s = time.monotonic() - started
    await asyncio.sleep(0.5)
    held = int(statistics.median(rss_kb() for _ in range(5)))
    malloc_held = mallinfo()
    result: dict[str, object] = {
        "streams": count,
        "open_seconds": round(open_s, 1),
        "idle_mib": round(idle / 1024, 1),
        "open_mib": round(held / 1024, 1),
        "kib_per_stream": round((held - idle) / count, 2),
        # bytes malloc handed out (chunk sizes, touched or not) and the arenas' size, per stream
        "malloc_in_use_per_stream": (malloc_held["uordblks"] - malloc_idle["uordblks"]) // count,
        "malloc_arena_per_stream": (malloc_held["arena"] - malloc_idle["arena"]) // count,
        "malloc_mmapped_per_stream": (malloc_held["hblkhd"] - malloc_idle["hblkhd"]) // count,
    }
    if trace:
        after = tracemalloc.take_snapshot()
        result["python_bytes_per_stream"] = round(
            sum(s.size_diff for s in after.compare_to(before, "filename")) / count, 1
        )
        result["top"] = [
            (round(s.size_diff / count, 1), f"{s.traceback[0].filename}:{s.traceback[0].lineno}")
            for s in after.compare_to(before, "lineno")[:8]
        ]
    await asyncio.gather(*tasks)
    result["completed_with_done"] = state["done"]
    result["first_chunk_with_headers"] = state["first_chunk_with_headers"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--trace", action="store_true")
    args = parser.parse_args()
    harness.raise_nofile()
    if harness.pinning():
        os.sched_setaffinity(0, {1})  # servers on core 0
    hold_s = max(20.0, args.streams / 200.0)
    workdir = Path(tempfile.mkdtemp(prefix="forward-memory-"))
    procs = harness.Procs(workdir, None)
    try:
        port = harness.free_port()
        cmd = [sys.executable, "-m", "ntonix", "mock", "--host", harness.HOST, "--port", str(port)]
        cmd += ["--tokens", "5", "--token-rate", f"{5 / hold_s:g}", "--threads", "2"]
        cmd += ["--model", "bench-model"]
        mock = procs.start("mock", cmd, {"PYTHONPATH": str(ROOT / "python")})
        problem = harness.wait_ready(mock, port, "/health", 20.0)
        if problem:
            raise SystemExit(f"mock: {problem}")
        print(json.dumps(asyncio.run(hold(port, args.streams, args.trace))))
    finally:
        procs.stop_all()


if __name__ == "__main__":
    main()
