"""Zipf replay through a real gateway: the measured hit rate against what the cache policy predicts.

Issue 3's check: "a Zipf-distributed replay of 10,000 requests over 2,000 distinct prompts reports
the hit rate the policy predicts". This script starts `ntonix mock --tokens 16` and `ntonix run`,
replays a seeded Zipf(s) trace of chat requests through the gateway and compares the hits it
counted (`/cache/stats`, and the `X-Cache` header of every answer) with three predictions made on
the same trace:

- **S3-FIFO, reference**: a Python port of `ReferenceS3Fifo` in `rust/cache/sim.rs`, capacity
  counted in entries. The gateway's cache runs this policy in each of its 16 shards, so for a cache
  that holds every prompt the prediction is exact (every first sight misses, every repeat hits:
  hit rate = 1 - distinct seen / requests); for a capped cache it is approximate (see below).
- **LRU, exact** (`ReferenceLru`) and **LRU, Che's approximation** (steady state, not the cold
  trace), the yardstick the policy has to beat.

The trace, the Zipf law (P(rank k) ∝ 1/k^s, sampled by inverting the exact CDF) and the SplitMix64
generator are those of `sim.rs`, so a seed gives the same ranks as the Rust tests and benches (seed
2024: reference S3-FIFO 0.7424, exact LRU 0.7087, Che 0.7229 at 20%, as in docs/adr/003-cache.md).

How the capped cache is made to hold a given number of entries: the cap is `cache.max_size_mb`, a
whole number of MiB, and an entry weighs key 16 + body + content type + 352 bytes
(`rust/cache/sharded.rs`). The script sends one probe request through a gateway first and reads
that entry's weight from `/cache/stats`. It then picks the smallest cap in MiB and a padding of
the prompt (which the mock echoes into its answer, byte for byte) so that every entry of the replay
weighs between cap/(C+1) and cap/C bytes: exactly C entries fit, the next one never does. The
mock's answers differ only in the hex digits of their id, which the design allows for.

Order matters for a prediction: requests are replayed on one keep-alive connection, pipelined (up
to `--depth` in flight) but served in order, since an HTTP/1.1 server answers one request of a
connection at a time; the gateway stores a miss's answer before it responds, so the cache sees
exactly the trace. No request can be coalesced with an identical one in flight (none is in flight
concurrently); a `COALESCED` answer would be counted as a hit by the client tally, like the cache's
own counters would not, and is reported.

Why the capped prediction is approximate: each of the 16 shards runs S3-FIFO on its own share of
the keys, chosen by a seed drawn at random per cache, and a put evicts in its own shard. The
script measures that spread in process: it replays the same trace through `ntonix._core.ResponseCache`
with 16 shards (a fresh random seed each time) and with 1 shard, which must agree with the
reference request for request.

Usage: `.venv/bin/python bench/zipf.py [--requests 10000] [--distinct 2000] [--s 1.0]
[--cache-fraction 0.2] [--seed 2024] [--json out.json]`. Every process it starts is stopped by PID
when it ends, however it ends.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MASK64 = (1 << 64) - 1
MIB = 1024 * 1024
KEY_BYTES = 16  # rust/cache/sharded.rs KEY_BYTES
ENTRY_OVERHEAD = 352  # rust/cache/sharded.rs ENTRY_OVERHEAD; checked against /cache/stats at run time
CONTENT_TYPE = "application/json"
HOST = "127.0.0.1"
CHAT_PATH = "/v1/chat/completions"
MOCK_TOKENS = 16
UNCAPPED_MB = 1024  # "large enough for everything": far more than any replay here stores


# ---------------------------------------------------------------------------------------------
# The workload and the policies: a port of rust/cache/sim.rs, one definition for bench and tests.


class SplitMix64:
    """sim.rs `SplitMix64`: the same seed gives the same stream as the Rust generator."""

    def __init__(self, seed: int) -> None:
        self.state = seed & MASK64

    def next_u64(self) -> int:
        self.state = (self.state + 0x9E37_79B9_7F4A_7C15) & MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58_476D_1CE4_E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D0_49BB_1331_11EB) & MASK64
        return z ^ (z >> 31)

    def next_f64(self) -> float:
        """Uniform in [0, 1) from the top 53 bits."""
        return (self.next_u64() >> 11) * (1.0 / (1 << 53))


class Zipf:
    """Zipf(s) over ranks 0..n (rank 0 the most popular), sampled by inverting the exact CDF."""

    def __init__(self, n: int, s: float) -> None:
        total = 0.0
        cdf: list[float] = []
        for rank in range(1, n + 1):
            total += 1.0 / float(rank) ** s
            cdf.append(total)
        self.cdf = [c / total for c in cdf]

    def probabilities(self) -> list[float]:
        previous = 0.0
        out: list[float] = []
        for c in self.cdf:
            out.append(c - previous)
            previous = c
        return out

    def sample(self, rng: SplitMix64) -> int:
        # Rust's partition_point(|c| c <= u) is bisect_right; the last CDF value may round below 1.
        return min(bisect.bisect_right(self.cdf, rng.next_f64()), len(self.cdf) - 1)


def zipf_trace(distinct: int, requests: int, s: float, seed: int) -> list[int]:
    """`requests` ranks drawn from Zipf(`s`) over `distinct` ranks (sim.rs `zipf_trace`, ranks not keys)."""
    zipf = Zipf(distinct, s)
    rng = SplitMix64(seed)
    return [zipf.sample(rng) for _ in range(requests)]


class ReferenceLru:
    """Exact LRU over a capacity counted in entries (sim.rs `ReferenceLru`)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.order: OrderedDict[int, None] = OrderedDict()

    def access(self, key: int) -> bool:
        """A gateway request: a hit, or a miss whose answer is stored. Returns whether it hit."""
        if key in self.order:
            self.order.move_to_end(key)
            return True
        self.order[key] = None
        if len(self.order) > self.capacity:
            self.order.popitem(last=False)
        return False


class ReferenceS3Fifo:
    """S3-FIFO over a capacity counted in entries, statement for statement sim.rs `ReferenceS3Fifo`.

    A small FIFO that new keys enter (evicted from while it holds >= 10% of the entries), a main FIFO
    with a CLOCK-like second chance (a counter 0..=3), and a ghost FIFO of keys dropped from the small
    one, whose return sends a key straight to main.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.small: deque[int] = deque()
        self.main: deque[int] = deque()
        self.freq: dict[int, int] = {}
        self.ghost: deque[int] = deque()
        self.in_ghost: set[int] = set()

    def access(self, key: int) -> bool:
        f = self.freq.get(key)
        if f is not None:
            self.freq[key] = min(f + 1, 3)
            return True
        if self.capacity == 0:
            return False
        while len(self.freq) >= self.capacity:
            self._evict()
        if key in self.in_ghost:
            self.in_ghost.remove(key)
            self.ghost.remove(key)  # a key is in the ghost FIFO at most once
            self.main.append(key)
        else:
            self.small.append(key)
        self.freq[key] = 0
        return False

    def _evict(self) -> None:
        while True:
            total = len(self.small) + len(self.main)
            from_small = bool(self.small) and (len(self.small) * 10 >= total or not self.main)
            if from_small:
                key = self.small.popleft()
                if self.freq.get(key, 0) >= 1:
                    self.main.append(key)
                    continue
                del self.freq[key]
                self.ghost.append(key)
                self.in_ghost.add(key)
                while len(self.ghost) > len(self.freq):
                    self.in_ghost.discard(self.ghost.popleft())
                return
            if not self.main:
                return
            key = self.main.popleft()
            f = self.freq.get(key, 0)
            if f > 0:
                self.freq[key] = f - 1
                self.main.append(key)
            else:
                self.freq.pop(key, None)
                return


def che_lru_hit_rate(probabilities: Sequence[float], capacity: int) -> float:
    """Che's approximation of the steady-state LRU hit rate (sim.rs `che_lru_hit_rate`)."""
    if capacity >= len(probabilities):
        return 1.0

    def occupancy(t: float) -> float:
        return sum(1.0 - math.exp(-p * t) for p in probabilities)

    target = float(capacity)
    lo, hi = 0.0, 1.0
    while occupancy(hi) < target:
        hi *= 2.0
    for _ in range(100):  # the bracket is far below an ulp long before 100 halvings
        mid = 0.5 * (lo + hi)
        if occupancy(mid) < target:
            lo = mid
        else:
            hi = mid
    t = 0.5 * (lo + hi)
    return sum(p * (1.0 - math.exp(-p * t)) for p in probabilities)


def replay_hits(trace: Sequence[int], access: Callable[[int], bool]) -> list[bool]:
    """Whether each request of `trace` hit under `access`."""
    return [access(key) for key in trace]


@dataclass
class Prediction:
    """What the policies predict for one trace and one capacity in entries."""

    capacity: int
    s3fifo_hits: int
    lru_hits: int
    che_lru_rate: float
    requests: int

    @property
    def s3fifo_rate(self) -> float:
        return self.s3fifo_hits / self.requests

    @property
    def lru_rate(self) -> float:
        return self.lru_hits / self.requests


def predict(trace: Sequence[int], distinct: int, s: float, capacity: int) -> Prediction:
    s3 = ReferenceS3Fifo(capacity)
    lru = ReferenceLru(capacity)
    return Prediction(
        capacity=capacity,
        s3fifo_hits=sum(replay_hits(trace, s3.access)),
        lru_hits=sum(replay_hits(trace, lru.access)),
        che_lru_rate=che_lru_hit_rate(Zipf(distinct, s).probabilities(), capacity),
        requests=len(trace),
    )


def sharded_replay(trace: Sequence[int], max_bytes: int, weight: int, shards: int) -> list[bool]:
    """Replays `trace` through the real `ntonix._core.ResponseCache` in process, as the gateway does:
    serve a hit, else store an answer of `weight` accounted bytes. The shard seed is new each call."""
    from ntonix._core import ResponseCache  # the built extension; only this helper needs it

    cache = ResponseCache(max_bytes, 1e9, shards)
    body = b"x" * (weight - KEY_BYTES - ENTRY_OVERHEAD - len(CONTENT_TYPE))
    # Ranks to well-spread 128-bit keys, like sim.rs key_of_rank (the shard mix is seeded anyway).
    keys = {
        rank: ((rank + 1) * 0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835) & ((1 << 128) - 1) for rank in trace
    }
    out: list[bool] = []
    for rank in trace:
        key = keys[rank]
        if cache.get(key) is not None:
            out.append(True)
        else:
            cache.put(key, body, CONTENT_TYPE)
            out.append(False)
    return out


# ---------------------------------------------------------------------------------------------
# Sizing the capped cache in entries


def entry_weight(body_len: int, content_type: str = CONTENT_TYPE) -> int:
    return KEY_BYTES + body_len + len(content_type.encode()) + ENTRY_OVERHEAD


@dataclass
class CapDesign:
    """A cap in MiB and a prompt padding that make the cache hold exactly `capacity` entries."""

    capacity: int
    max_size_mb: int
    pad: int
    weight_min: int  # weights of the replay's entries, from the probe and the id digits they can have
    weight_max: int
    fits_min: int  # any weight in [fits_min, fits_max] gives exactly `capacity` entries
    fits_max: int


def design_cap(capacity: int, probe_weight: int, probe_pad: int, digit_spread: int) -> CapDesign:
    """Smallest whole-MiB cap, and the padding, such that every entry weight the replay can produce
    (`probe_weight` plus the extra padding, up to `digit_spread` bytes more) fits `capacity` times and
    not once more."""
    if capacity < 1:
        raise ValueError("the capped cache must hold at least one entry")
    mb = 1
    while True:
        cap = mb * MIB
        fits_max = cap // capacity  # capacity entries of this weight fit
        fits_min = cap // (capacity + 1) + 1  # capacity + 1 entries of this weight do not
        room = fits_max - fits_min - digit_spread
        if room >= 0 and fits_min >= probe_weight:
            low = fits_min + room // 2
            pad = probe_pad + low - probe_weight
            return CapDesign(capacity, mb, pad, low, low + digit_spread, fits_min, fits_max)
        mb += 1


def hex_digits(n: int) -> int:
    return len(f"{n:x}")


# ---------------------------------------------------------------------------------------------
# Talking to the gateway


class ReplayError(RuntimeError):
    """The gateway answered something a replay cannot count."""


def prompt_of(rank: int, width: int, pad: int) -> str:
    # The mock echoes "Echo: <prompt words>" cut or padded to 16 words, so the padding word lands in
    # the answer byte for byte and sizes the entry; the rank word tells each answer apart.
    return f"zipf {rank:0{width}d} " + "x" * pad


def tag_of(rank: int, width: int) -> bytes:
    return f"zipf {rank:0{width}d} ".encode()


def chat_body(prompt: str) -> bytes:
    document = {"model": "mock-model", "messages": [{"role": "user", "content": prompt}], "max_tokens": 64}
    return json.dumps(document, separators=(",", ":")).encode()


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    status_line = await reader.readuntil(b"\r\n")
    parts = status_line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        raise ReplayError(f"bad status line {status_line!r}")
    status = int(parts[1])
    headers: dict[str, str] = {}
    while True:
        line = await reader.readuntil(b"\r\n")
        if line == b"\r\n":
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        chunks: list[bytes] = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass
                break
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)
        body = b"".join(chunks)
    else:
        raise ReplayError(f"answer without a length: {headers}")
    return status, headers, body


async def _replay_async(port: int, bodies: Sequence[bytes], tags: Sequence[bytes], depth: int) -> list[str]:
    reader, writer = await asyncio.open_connection(HOST, port, limit=1 << 20)
    slots = asyncio.Semaphore(depth)
    head = (
        b"POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\nContent-Length: %%d\r\n\r\n"
        % (
            CHAT_PATH.encode(),
            HOST.encode(),
            port,
        )
    )

    async def send() -> None:
        for body in bodies:
            await slots.acquire()
            writer.write(head % len(body) + body)
            await writer.drain()

    sender = asyncio.create_task(send())
    outcomes: list[str] = []
    try:
        for n, tag in enumerate(tags):
            status, headers, body = await _read_response(reader)
            slots.release()
            if status != 200:
                raise ReplayError(f"request {n}: status {status}: {body[:300]!r}")
            if tag not in body:  # the answer must be this request's: the replay stayed in order
                raise ReplayError(f"request {n}: answer is not for {tag!r}: {body[:300]!r}")
            outcomes.append(headers.get("x-cache", "-"))
        await sender
    finally:
        sender.cancel()
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    return outcomes


def replay_through(port: int, bodies: Sequence[bytes], tags: Sequence[bytes], depth: int) -> list[str]:
    """Sends `bodies` in order on one keep-alive connection, at most `depth` pipelined; the X-Cache
    value of each answer, in order."""
    return asyncio.run(_replay_async(port, bodies, tags, depth))


def http(url: str, body: bytes | None = None, timeout: float = 10.0) -> bytes:
    """GET `url`, or POST `body` as JSON; the answer's body (an error status raises)."""
    request = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET")
    if body is not None:
        request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return bytes(response.read())


def cache_stats(port: int) -> dict[str, Any]:
    stats: dict[str, Any] = json.loads(http(f"http://{HOST}:{port}/cache/stats"))
    return stats


# ---------------------------------------------------------------------------------------------
# Processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@dataclass
class Service:
    """A process this script started: stopped by its PID, its output kept in a file."""

    name: str
    popen: subprocess.Popen[bytes]
    port: int
    log_path: Path

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10)


class Services:
    """Starts `ntonix mock` and `ntonix run` processes in `workdir`; `close()` stops each by PID."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[Service] = []

    def spawn(self, name: str, args: list[str], port: int) -> Service:
        log_path = self.workdir / f"{name}.log"
        with open(log_path, "wb") as log_file:
            popen = subprocess.Popen(
                [sys.executable, "-m", "ntonix", *args],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.workdir,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        service = Service(name, popen, port, log_path)
        self.started.append(service)
        deadline = time.monotonic() + 30.0
        while True:
            if popen.poll() is not None:
                raise ReplayError(f"{name} exited ({popen.returncode}):\n{service.log_tail()}")
            with contextlib.suppress(OSError):
                if http(f"http://{HOST}:{port}/health", timeout=1.0):
                    return service
            if time.monotonic() > deadline:
                raise ReplayError(f"{name} not healthy after 30 s:\n{service.log_tail()}")
            time.sleep(0.05)

    def mock(self) -> Service:
        port = free_port()
        args = ["mock", "--host", HOST, "--port", str(port), "--tokens", str(MOCK_TOKENS), "--name", "zipf"]
        return self.spawn("mock", args, port)

    def gateway(self, name: str, backend: Service, max_size_mb: int) -> Service:
        port = free_port()
        config = {
            "server": {"threads": 1, "shutdown_grace_seconds": 1},
            "logging": {"level": "warning", "access_log": False, "enable_colors": False},
            "cache": {"enabled": True, "max_size_mb": max_size_mb, "ttl_seconds": 86_400},
        }
        config_path = self.workdir / f"{name}.json"
        config_path.write_text(json.dumps(config))
        args = ["run", "--config", str(config_path), "--port", str(port), "--bind", HOST]
        return self.spawn(name, [*args, "--backend", f"{HOST}:{backend.port}"], port)

    def close(self) -> None:
        for service in reversed(self.started):
            service.stop()


# ---------------------------------------------------------------------------------------------
# The experiment


@dataclass
class Params:
    requests: int = 10_000
    distinct: int = 2_000
    s: float = 1.0
    cache_fraction: float = 0.2
    seed: int = 2024
    depth: int = 16
    shard_trials: int = 20

    @property
    def capacity(self) -> int:
        return round(self.cache_fraction * self.distinct)


@dataclass
class Measured:
    """One replay through a gateway: its cache counters (deltas over the replay) and the client's tally."""

    requests: int
    hits: int
    misses: int
    evictions: int
    entries: int
    size_bytes: int
    max_size_bytes: int
    header_hits: int
    header_misses: int
    header_coalesced: int
    seconds: float

    @property
    def hit_rate(self) -> float:
        return self.hits / (self.hits + self.misses)

    @property
    def header_hit_rate(self) -> float:
        # A COALESCED answer came from the backend once for several clients: a hit for the client.
        return (self.header_hits + self.header_coalesced) / self.requests


@dataclass
class Case:
    name: str
    max_size_mb: int
    measured: Measured
    prediction: Prediction
    sharded_rates: list[float] = field(default_factory=list)  # in process, 16 shards, random seeds
    one_shard_agrees: bool | None = None  # in process, 1 shard, request for request with the reference

    def summary(self) -> dict[str, Any]:
        rates = self.sharded_rates
        return {
            "name": self.name,
            "max_size_mb": self.max_size_mb,
            "capacity_entries": self.prediction.capacity,
            "measured": {
                **asdict(self.measured),
                "hit_rate": self.measured.hit_rate,
                "header_hit_rate": self.measured.header_hit_rate,
            },
            "predicted": {
                **asdict(self.prediction),
                "s3fifo_rate": self.prediction.s3fifo_rate,
                "lru_rate": self.prediction.lru_rate,
            },
            "in_process_16_shards": {
                "trials": len(rates),
                "mean": sum(rates) / len(rates) if rates else None,
                "min": min(rates, default=None),
                "max": max(rates, default=None),
            },
            "in_process_1_shard_agrees": self.one_shard_agrees,
        }


@dataclass
class Result:
    params: Params
    distinct_seen: int
    entry_weight_probe: int
    entry_body_probe: int
    design: CapDesign
    uncapped: Case
    capped: Case
    seconds: float

    def summary(self) -> dict[str, Any]:
        return {
            "params": asdict(self.params),
            "distinct_seen": self.distinct_seen,
            "exact_uncapped_hit_rate": 1 - self.distinct_seen / self.params.requests,
            "probe": {"entry_weight": self.entry_weight_probe, "body_bytes": self.entry_body_probe},
            "design": asdict(self.design),
            "cases": [self.uncapped.summary(), self.capped.summary()],
            "seconds": self.seconds,
        }


def _measure(gateway: Service, bodies: Sequence[bytes], tags: Sequence[bytes], depth: int) -> Measured:
    before = cache_stats(gateway.port)
    started = time.perf_counter()
    outcomes = replay_through(gateway.port, bodies, tags, depth)
    seconds = time.perf_counter() - started
    after = cache_stats(gateway.port)
    return Measured(
        requests=len(outcomes),
        hits=after["hits"] - before["hits"],
        misses=after["misses"] - before["misses"],
        evictions=after["evictions"] - before["evictions"],
        entries=after["entries"],
        size_bytes=after["size_bytes"],
        max_size_bytes=after["max_size_bytes"],
        header_hits=outcomes.count("HIT"),
        header_misses=outcomes.count("MISS"),
        header_coalesced=outcomes.count("COALESCED"),
        seconds=seconds,
    )


@contextlib.contextmanager
def _services(workdir: Path | None) -> Iterator[Services]:
    with contextlib.ExitStack() as stack:
        path = workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ntonix-zipf-")))
        services = Services(path)
        try:
            yield services
        finally:
            services.close()


def run_experiment(params: Params, workdir: Path | None = None, log: Callable[[str], None] = print) -> Result:
    """Starts a mock and two gateways (uncapped, then capped), replays the trace through each and
    predicts both; every process is stopped before this returns or raises."""
    started = time.perf_counter()
    trace = zipf_trace(params.distinct, params.requests, params.s, params.seed)
    width = len(str(params.distinct))
    with _services(workdir) as services:
        mock = services.mock()
        uncapped_gw = services.gateway("gateway-uncapped", mock, UNCAPPED_MB)

        # Probe: one entry, of a prompt outside the trace, gives the real entry weight.
        probe_pad = 1
        probe_prompt = prompt_of(params.distinct, width, probe_pad)
        answer = http(f"http://{HOST}:{uncapped_gw.port}{CHAT_PATH}", chat_body(probe_prompt))
        probe_stats = cache_stats(uncapped_gw.port)
        if probe_stats["entries"] != 1:
            raise ReplayError(f"probe: expected one cache entry, got {probe_stats}")
        probe_weight = int(probe_stats["size_bytes"])
        if probe_weight != entry_weight(len(answer)):
            raise ReplayError(
                f"probe: the entry weighs {probe_weight} B, not key {KEY_BYTES} + body {len(answer)} + "
                f"content type {len(CONTENT_TYPE)} + overhead {ENTRY_OVERHEAD}: has ENTRY_OVERHEAD changed?"
            )
        counter = int(str(json.loads(answer)["id"]).rsplit("-", 1)[1], 16)
        # Later answers' ids carry up to this many more hex digits (at most one backend call per request).
        digit_spread = hex_digits(counter + 2 * params.requests + 16) - hex_digits(counter)
        design = design_cap(params.capacity, probe_weight, probe_pad, digit_spread)
        log(
            f"probe: one entry weighs {probe_weight} B on /cache/stats = key {KEY_BYTES} + a "
            f"{len(answer)}-byte answer + content type {len(CONTENT_TYPE)} + overhead {ENTRY_OVERHEAD}"
        )
        log(
            f"capped cache: {design.max_size_mb} MiB; prompts padded to entries of {design.weight_min}-"
            f"{design.weight_max} B, of which exactly {design.capacity} fit "
            f"(any weight in {design.fits_min}-{design.fits_max} B)"
        )

        bodies = [chat_body(prompt_of(rank, width, design.pad)) for rank in trace]
        tags = [tag_of(rank, width) for rank in trace]
        distinct_seen = len(set(trace))

        log(f"replaying {params.requests:,} requests through the uncapped gateway ...")
        measured_a = _measure(uncapped_gw, bodies, tags, params.depth)
        uncapped_gw.stop()
        uncapped = Case(
            "uncapped", UNCAPPED_MB, measured_a, predict(trace, params.distinct, params.s, params.distinct)
        )

        capped_gw = services.gateway("gateway-capped", mock, design.max_size_mb)
        log(f"replaying {params.requests:,} requests through the capped gateway ...")
        measured_b = _measure(capped_gw, bodies, tags, params.depth)
        capped_gw.stop()

    prediction = predict(trace, params.distinct, params.s, params.capacity)
    capped = Case("capped", design.max_size_mb, measured_b, prediction)
    cap_bytes = design.max_size_mb * MIB
    weight = (design.weight_min + design.weight_max) // 2
    reference = replay_hits(trace, ReferenceS3Fifo(params.capacity).access)
    capped.one_shard_agrees = sharded_replay(trace, cap_bytes, weight, 1) == reference
    capped.sharded_rates = [
        sum(sharded_replay(trace, cap_bytes, weight, 16)) / params.requests
        for _ in range(params.shard_trials)
    ]
    return Result(
        params,
        distinct_seen,
        probe_weight,
        len(answer),
        design,
        uncapped,
        capped,
        time.perf_counter() - started,
    )


def report(result: Result) -> str:
    p = result.params
    lines = [
        f"Zipf s={p.s:g}: {p.requests:,} requests over {p.distinct:,} prompts (seed {p.seed}), "
        f"{result.distinct_seen:,} distinct seen; exact uncapped hit rate "
        f"1 - {result.distinct_seen}/{p.requests} = {1 - result.distinct_seen / p.requests:.4f}",
        "",
        f"{'cache':<24} {'stats':>7} {'X-Cache':>7} {'S3-FIFO':>7} {'LRU':>7} {'Che LRU':>7} "
        f"{'16 shards in process':>22} {'replay':>8}",
    ]
    for case in (result.uncapped, result.capped):
        m, pr = case.measured, case.prediction
        cap = f"{case.max_size_mb} MiB" + (
            " (all)" if case is result.uncapped else f" = {pr.capacity} entries"
        )
        rates = case.sharded_rates
        spread = f"{sum(rates) / len(rates):.4f} [{min(rates):.4f}-{max(rates):.4f}]" if rates else "-"
        lines.append(
            f"{cap:<24} {m.hit_rate:>7.4f} {m.header_hit_rate:>7.4f} {pr.s3fifo_rate:>7.4f} "
            f"{pr.lru_rate:>7.4f} {pr.che_lru_rate:>7.4f} {spread:>22} {m.seconds:>7.1f}s"
        )
    u, c = result.uncapped, result.capped
    lines += [
        "",
        f"uncapped: {u.measured.hits:,} hits measured, {u.prediction.s3fifo_hits:,} predicted (exact), "
        f"{u.measured.evictions} evictions",
        f"capped: {c.measured.hits:,} hits measured vs {c.prediction.s3fifo_hits:,} reference S3-FIFO "
        f"({c.measured.hit_rate - c.prediction.s3fifo_rate:+.4f}), {c.prediction.lru_hits:,} exact LRU "
        f"({c.measured.hit_rate - c.prediction.lru_rate:+.4f}); {c.measured.entries} entries held at the "
        f"end, {c.measured.size_bytes:,} of {c.measured.max_size_bytes:,} B",
        f"in process: 1 shard agrees with the reference request for request: {c.one_shard_agrees}; "
        f"16 shards over {len(c.sharded_rates)} random shard seeds shown above",
        f"coalesced answers: {result.uncapped.measured.header_coalesced + c.measured.header_coalesced} "
        f"(in-order replay: none expected); total {result.seconds:.1f} s",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--distinct", type=int, default=2_000)
    parser.add_argument("--s", type=float, default=1.0, help="Zipf exponent")
    parser.add_argument(
        "--cache-fraction", type=float, default=0.2, help="share of the prompts the cache holds"
    )
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--depth", type=int, default=16, help="requests pipelined on the one connection")
    parser.add_argument("--shard-trials", type=int, default=20, help="in-process 16-shard replays")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.distinct < 1 or args.depth < 1 or args.shard_trials < 0:
        parser.error("--requests, --distinct and --depth must be >= 1")
    params = Params(
        requests=args.requests,
        distinct=args.distinct,
        s=args.s,
        cache_fraction=args.cache_fraction,
        seed=args.seed,
        depth=args.depth,
        shard_trials=args.shard_trials,
    )
    if params.capacity < 1:
        parser.error("--cache-fraction x --distinct must round to at least one entry")
    result = run_experiment(params)
    print(report(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result.summary(), indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
