"""What an L1 miss that hits Redis costs, in-process, against a real `redis-server` (issue 13).

Starts its own `redis-server` on a free port, stores `--entries` answers of `--size` bytes there in
the tier's value format, then times `RedisTier.get` (one bounded GET, decode, checksum, L1 fill)
over distinct keys, one at a time (the latency a request adds) and `--concurrency` at a time (the
CPU the gateway's one Python thread spends per read). Three clients are compared on the same keys:

- `redis-py + hiredis`: what the gateway uses (`RedisTier` itself);
- `redis-py + hiredis, bare GET`: the same client without the tier's timeout, pool bound, L1 fill;
- `redis-py, Python parser`: that client with hiredis switched off;
- `raw protocol + hiredis`: a 40-line asyncio protocol writing RESP and parsing with hiredis, the
  floor for any asyncio client (no pool, no timeouts, no reconnects: not a product option).

Usage: `.venv/bin/python bench/redis_tier.py [--entries 2000] [--size 600] [--rounds 3]`.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import hiredis
import msgspec

from ntonix._core import ResponseCache
from ntonix.cache.redis_tier import RedisTier, decode_value, encode_value
from ntonix.config import CacheConfig


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RawClient(asyncio.Protocol):
    """GET over one connection: RESP out, hiredis in, one future per request in order."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.waiters: list[asyncio.Future[Any]] = []
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            self.waiters.pop(0).set_result(reply)

    def get(self, name: bytes) -> asyncio.Future[Any]:
        assert self.transport is not None
        self.transport.write(b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(name), name))
        future = asyncio.get_running_loop().create_future()
        self.waiters.append(future)
        return future


async def timed(
    label: str, read: Callable[[int], Awaitable[Any]], keys: list[int], concurrency: int, rounds: int
) -> dict[str, float]:
    best_wall = best_cpu = float("inf")
    for _ in range(rounds):
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        for key in keys:  # one at a time: a request's added latency
            await read(key)
        wall = (time.perf_counter() - start_wall) / len(keys)
        best_wall = min(best_wall, wall)
        start_cpu = time.process_time()
        for i in range(0, len(keys), concurrency):  # many in flight: CPU per read
            await asyncio.gather(*(read(k) for k in keys[i : i + concurrency]))
        best_cpu = min(best_cpu, (time.process_time() - start_cpu) / len(keys))
    row = {"latency_us": best_wall * 1e6, "cpu_us": best_cpu * 1e6}
    print(f"{label:28s} {row['latency_us']:8.1f} us latency   {row['cpu_us']:8.1f} us CPU per read")
    return row


async def run(args: argparse.Namespace, url: str) -> None:
    cfg = CacheConfig(redis_url=url, redis_timeout_ms=args.timeout_ms)
    l1 = ResponseCache(256 * 1024 * 1024, 3600.0)
    tier = RedisTier(cfg, l1)
    tier.start(asyncio.get_running_loop())
    while not tier.up:
        await asyncio.sleep(0.01)
    body = (b'{"id":"chatcmpl-bench","object":"chat.completion","choices":[' + b"x" * args.size)[: args.size]
    keys = [(i * 0x9E3779B97F4A7C15) & ((1 << 128) - 1) for i in range(1, args.entries + 1)]
    value = encode_value(body, "application/json", False, 200, time.time() + 3600)
    async with tier.client.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.set(f"{tier.prefix}{key:032x}", value, px=3_600_000)
        await pipe.execute()

    async def tier_get(key: int) -> Any:
        return await tier.get(key, False)

    await asyncio.gather(*(tier_get(k) for k in keys[: args.concurrency]))  # open the pool's connections

    from redis.asyncio import Redis

    try:
        from redis._parsers import _AsyncRESP2Parser
    except ImportError:  # older redis-py
        from redis.asyncio.connection import PythonParser as _AsyncRESP2Parser  # type: ignore

    pure = Redis.from_url(url, parser_class=_AsyncRESP2Parser)
    plain = Redis.from_url(url)  # hiredis, redis-py's default when installed

    async def plain_get(key: int) -> Any:
        raw = await plain.get(f"{tier.prefix}{key:032x}")
        return decode_value(raw)

    async def pure_get(key: int) -> Any:
        raw = await pure.get(f"{tier.prefix}{key:032x}")
        return decode_value(raw)

    loop = asyncio.get_running_loop()
    host, port = url.split("//")[1].split("/")[0].split(":")
    _, raw = await loop.create_connection(RawClient, host, int(port))

    async def raw_get(key: int) -> Any:
        value = await raw.get(f"{tier.prefix}{key:032x}".encode())
        return decode_value(value)

    cpu = platform.processor() or platform.machine()
    print(f"{args.entries} distinct keys, {args.size}-byte answers, {cpu}")
    results = {
        "redis_py_hiredis": await timed(
            "redis-py + hiredis (tier)", tier_get, keys, args.concurrency, args.rounds
        ),
        "redis_py_hiredis_bare": await timed(
            "redis-py + hiredis, bare GET", plain_get, keys, args.concurrency, args.rounds
        ),
        "redis_py_python": await timed(
            "redis-py, Python parser", pure_get, keys, args.concurrency, args.rounds
        ),
        "raw_hiredis": await timed("raw protocol + hiredis", raw_get, keys, args.concurrency, args.rounds),
    }
    print(msgspec.json.encode(results).decode())
    stats = tier.stats()
    print("tier counters:", stats)
    if stats["errors"] or stats["skipped"] or stats["misses"]:
        raise SystemExit("some tier reads were not hits: the tier figure is not valid")
    await pure.aclose()
    await plain.aclose()
    await tier.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=2000)
    parser.add_argument("--size", type=int, default=600)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    # generous: this measures cost, not the bound (a timed-out read would be a skipped, free one)
    parser.add_argument("--timeout-ms", type=float, default=1000.0)
    args = parser.parse_args()
    server_bin = shutil.which("redis-server")
    if server_bin is None:
        raise SystemExit("redis-server is not installed (make redis-deps)")
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        server = subprocess.Popen(
            [server_bin, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", tmp],
            stdout=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)
            asyncio.run(run(args, f"redis://127.0.0.1:{port}/0"))
        finally:
            server.kill()
            server.wait(10)


if __name__ == "__main__":
    main()
