"""CPU of the Python pipeline alone, per cache hit and per miss: no Granian, no sockets, no Rust client.

    .venv/bin/python bench/pipeline_cpu.py                                  # this tree: hit and miss
    .venv/bin/python bench/pipeline_cpu.py --ab base=/work/wt-base --ab new=.  # interleaved A/B of trees

`App.__rsgi__` (router, pipeline, the real response cache, metrics and the access log with the
defaults: text lines to stderr, here a file) is driven in-process with stand-in scope and protocol
objects; the forwarder is replaced by one that answers `bench/response.json` at the loop's next turn
(its `body` a fresh copy per access, like the Rust one). The figure is the loop thread's CPU
(`time.thread_time`) per request, the minimum of `--repeat` passes of `--requests` requests:

- hit: cache on, the same request as `bench/post.lua` (primed by one miss), 8 per loop turn;
- miss: cache off, 32 requests at once, so each finishes in its own task like behind Granian.

A/B mode runs each tree in its own interpreter (`PYTHONPATH=TREE/python`), rounds interleaved, and
prints the medians; the trees' `_core` is not exercised beyond the cache.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
BODY = (
    b'{"model":"bench-model","messages":[{"role":"system","content":"You are a terse assistant."},'
    b'{"role":"user","content":"Name three prime numbers."}],"temperature":0,"max_tokens":64}'
)
ANSWER = (BENCH / "response.json").read_bytes()
PER_TURN = 8  # hits finished per loop turn before the access lines are written
CONCURRENT = 32  # misses in flight at once


class _Scope:
    proto = "http"
    method = "POST"
    path = "/v1/chat/completions"
    query_string = ""
    client = "127.0.0.1:40000"
    server = "127.0.0.1:18080"
    scheme = "http"
    http_version = "1.1"

    def __init__(self) -> None:
        self.headers = {
            "host": "127.0.0.1:18080",
            "content-type": "application/json",
            "content-length": str(len(BODY)),
        }


class _Proto:
    __slots__ = ("status",)

    def __init__(self) -> None:
        self.status = 0

    async def __call__(self) -> bytes:
        return BODY

    def response_bytes(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.status = status


class _Answer:
    status = 200

    def __init__(self) -> None:
        self.headers = [
            ("server", "nginx/1.22.1"),
            ("date", "Tue, 01 Dec 2026 17:00:00 GMT"),
            ("content-type", "application/json"),
            ("content-length", str(len(ANSWER))),
        ]
        self._body = bytearray(ANSWER)

    @property
    def body(self) -> bytes:
        return bytes(self._body)


class _Forwarder:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def request(self, method: str, url: str, headers: Any, body: bytes, buffer: bool) -> Any:
        future = self.loop.create_future()
        self.loop.call_soon(future.set_result, _Answer())  # answered a turn later, as by the bridge
        return future


async def _measure(mode: str, requests: int, repeat: int) -> float:
    from ntonix.app import App
    from ntonix.config import load_settings
    from ntonix.logs import setup_logging

    config = json.loads((BENCH / "ntonix-bench.json").read_text())
    config["cache"]["enabled"] = mode == "hit"
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as file:
        json.dump(config, file)
    settings = load_settings(file.name, {}, None)
    os.unlink(file.name)
    setup_logging(settings.logging)
    app = App(settings)
    loop = asyncio.get_running_loop()
    app.__rsgi_init__(loop)
    app.gateway.proxy.forwarder = _Forwarder(loop)  # type: ignore[assignment]
    proto = _Proto()
    await app.__rsgi__(_Scope(), proto)  # primes the cache (hit mode)
    if proto.status != 200:
        raise RuntimeError(f"status {proto.status}")

    async def client(count: int) -> None:
        mine = _Proto()
        for _ in range(count):
            await app.__rsgi__(_Scope(), mine)
        if mine.status != 200:
            raise RuntimeError(f"status {mine.status}")

    best = float("inf")
    for _ in range(repeat):
        started = time.thread_time()
        if mode == "miss":
            await asyncio.gather(*(client(requests // CONCURRENT) for _ in range(CONCURRENT)))
            done = requests // CONCURRENT * CONCURRENT
        else:
            for _ in range(requests // PER_TURN):
                for _ in range(PER_TURN):
                    await app.__rsgi__(_Scope(), proto)
                await asyncio.sleep(0)
            done = requests // PER_TURN * PER_TURN
        best = min(best, (time.thread_time() - started) / done * 1e6)
    app.__rsgi_del__(loop)
    return best


def _one(args: argparse.Namespace) -> int:
    if "PYTHONPATH" not in os.environ:  # this tree's ntonix (A/B mode sets each tree's)
        sys.path.insert(0, str(BENCH.parent / "python"))
    # the access lines' stderr for the whole run: a file, as behind `make bench`
    log = open(args.log, "w") if args.log else tempfile.TemporaryFile("w")  # noqa: SIM115
    sys.stderr = log
    try:
        import uvloop

        run: Any = uvloop.run
    except ImportError:
        run = asyncio.run
    for mode in args.cases.split(","):
        print(f"{mode} {run(_measure(mode, args.requests, args.repeat)):.2f}", flush=True)
    return 0


def _ab(args: argparse.Namespace) -> int:
    trees = [text.partition("=")[::2] for text in args.ab]
    results: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for label, tree in trees:
            cmd = [sys.executable, __file__, "--cases", args.cases, "--requests", str(args.requests)]
            cmd += ["--repeat", str(args.repeat)]
            env = {**os.environ, "PYTHONPATH": str(Path(tree).resolve() / "python")}
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, timeout=600)
            for line in out.stdout.splitlines():
                mode, value = line.split()
                results.setdefault((mode, label), []).append(float(value))
                print(f"{mode} {label}: {value} µs", file=sys.stderr)
    for mode in args.cases.split(","):
        base = None
        for label, _ in trees:
            runs = results[(mode, label)]
            median = statistics.median(runs)
            base = base or median
            print(f"{mode:5} {label:12} µs/request median {median:.2f} ({median / base:.2f}x) {runs}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", default="hit,miss")
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=4, help="A/B: interleaved rounds")
    parser.add_argument("--log", help="where the access lines go (default: a temporary file)")
    parser.add_argument("--ab", action="append", metavar="LABEL=TREE", help="A/B mode")
    args = parser.parse_args(argv)
    return _ab(args) if args.ab else _one(args)


if __name__ == "__main__":
    sys.exit(main())
