"""Chaos: 2,000 mixed requests while three mock backends are killed and restarted at random (issue 4).

One gateway in front of three `ntonix mock` processes on fixed ports; 50 concurrent asyncio clients
send 2,000 chat requests, half of them streamed, while two chaos loops each SIGKILL a random backend
that is up, wait until the gateway has taken it out of rotation and restart it on the same port (so
one or two are down at a time), and one blackout kills all three at once, then restarts them.
Every request must end, within the client timeout, as one of:

- a success (200 with a whole answer; a stream ending with `data: [DONE]`),
- a stream cut by its backend's death after it started, ended cleanly by the gateway with an in-band
  OpenAI error event (the status line was already sent, so this is the documented way to fail),
- a documented gateway error: 502, 503 or 504 with an OpenAI-shaped JSON body.

Afterwards the gateway's resident memory and open descriptors must come back near their warm baseline.
The figures are printed (`pytest -s`) for the report.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import LOAD_SLACK, Proc, Processes, chat_body, free_port, wait_for

CHAT = "/v1/chat/completions"
TOTAL_REQUESTS = 2000
CONCURRENCY = 50
WARMUP_REQUESTS = 300
GATEWAY_REQUEST_TIMEOUT = 8.0
# Above the gateway's own limit by 2 s, plus what a loaded machine can stall the gateway, the mock and
# this client for (one request took over 10 s in a `make test-under-load` run: 2 s was not enough).
CLIENT_TIMEOUT = GATEWAY_REQUEST_TIMEOUT + 2.0 + 2 * LOAD_SLACK
DOCUMENTED_ERRORS = {502: "upstream_error", 503: "service_unavailable", 504: "timeout_error"}
# Before the fix of proxy.py _DisconnectWatch.stop every stream leaked ~6 KB: ~12 MiB over this run.
RSS_SLACK_KB = 8 * 1024
# Descriptors other than the upstream pool's sockets (clients, pipes, files, listeners) must come back.
OTHER_FD_SLACK = 5
TCP_ESTABLISHED, TCP_CLOSE_WAIT = "01", "08"


def vm_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def fd_census(pid: int, backend_ports: set[int]) -> dict[str, int]:
    """Open descriptors of a process: sockets to the backends by TCP state, and all the others."""
    sockets: dict[str, tuple[int, str]] = {}  # inode -> (remote port, state)
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                sockets[fields[9]] = (int(fields[2].rsplit(":", 1)[1], 16), fields[3])
    census = {
        "total": 0,
        "upstream_established": 0,
        "upstream_close_wait": 0,
        "upstream_other": 0,
        "other": 0,
    }
    for fd in os.listdir(f"/proc/{pid}/fd"):
        census["total"] += 1
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        remote = sockets.get(target[len("socket:[") : -1]) if target.startswith("socket:[") else None
        if remote is None or remote[0] not in backend_ports:
            census["other"] += 1
        elif remote[1] == TCP_ESTABLISHED:
            census["upstream_established"] += 1
        elif remote[1] == TCP_CLOSE_WAIT:
            census["upstream_close_wait"] += 1
        else:
            census["upstream_other"] += 1
    return census


class Outcomes:
    def __init__(self) -> None:
        self.kinds: Counter[str] = Counter()
        self.latencies: list[float] = []
        self.unexpected: list[str] = []

    def add(self, kind: str, latency: float, detail: str = "") -> None:
        self.kinds[kind] += 1
        self.latencies.append(latency)
        if detail:
            self.unexpected.append(detail)


async def one_request(client: httpx.AsyncClient, url: str, index: int, rng: random.Random) -> tuple[str, str]:
    """Send one chat request; classify how it ended."""
    stream = rng.random() < 0.5
    body = json.dumps(chat_body(f"chaos {index}", stream=stream)).encode()
    if stream:
        headers = {"x-mock-tokens": "16", "x-mock-token-rate": str(rng.choice((50, 100, 200)))}
    else:
        headers = {"x-mock-latency-ms": str(rng.randint(50, 400))}
    headers["content-type"] = "application/json"
    async with client.stream("POST", url + CHAT, content=body, headers=headers) as response:
        raw = b"".join([piece async for piece in response.aiter_raw()])
    status = response.status_code
    if status in DOCUMENTED_ERRORS:
        error = json.loads(raw)["error"]
        if {"message", "type", "code"} <= set(error) <= {"message", "type", "code", "param"} and error[
            "type"
        ] == DOCUMENTED_ERRORS[status]:
            return str(status), ""
        return "bad_error_body", f"{status}: {raw[:200]!r}"
    if status != 200:
        return f"status_{status}", raw[:200].decode(errors="replace")
    if not stream:
        document = json.loads(raw)
        if document["choices"][0]["message"]["content"].startswith("Echo: chaos"):
            return "ok", ""
        return "bad_answer", raw[:200].decode(errors="replace")
    if raw.endswith(b"data: [DONE]\n\n") and raw.count(b"\n\n") == 16 + 3:
        return "ok", ""
    last = [block for block in raw.split(b"\n\n") if block][-1] if raw.strip() else b""
    if raw.endswith(b"\n\n") and b"upstream_stream_broken" in last:
        return "stream_broken", ""
    return "bad_stream", raw[-200:].decode(errors="replace")


async def run_load(url: str, count: int, outcomes: Outcomes, seed: int) -> None:
    rng = random.Random(seed)
    next_index = iter(range(count))
    limits = httpx.Limits(max_connections=CONCURRENCY * 2, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT, limits=limits) as client:

        async def worker() -> None:
            for index in next_index:
                started = time.monotonic()
                try:
                    kind, detail = await asyncio.wait_for(
                        one_request(client, url, index, rng), timeout=CLIENT_TIMEOUT + 1.0
                    )
                except (TimeoutError, httpx.TimeoutException) as err:
                    kind, detail = "client_timeout", repr(err)
                except (httpx.HTTPError, ValueError, KeyError, IndexError) as err:
                    kind, detail = "client_error", repr(err)
                outcomes.add(kind, time.monotonic() - started, detail)

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))


class Chaos:
    """Two killer loops, each: SIGKILL a random backend that is up, wait until the gateway noticed,
    restart it on the same port, wait until it is back; plus one blackout of all three at once."""

    def __init__(self, procs: Processes, mocks: list[Proc], gateway: Proc) -> None:
        self.procs = procs
        self.mocks = mocks
        self.gateway = gateway
        self.kills = 0
        self.blackouts = 0
        self.down: set[int] = set()
        self.out_of_rotation: list[float] = []  # kill -> circuit open or marked unhealthy, first of the two
        self.marked_unhealthy: list[float] = []  # kill -> active health checks mark it unhealthy
        self.back_in_rotation: list[float] = []  # restart -> healthy again
        self.rng = random.Random(7)

    async def state(self, client: httpx.AsyncClient, port: int) -> dict[str, Any]:
        document = (await client.get(self.gateway.url + "/metrics")).json()
        return dict(next(entry for entry in document["backends"] if entry["port"] == port))

    async def kill(self, client: httpx.AsyncClient, index: int) -> None:
        """Kill one backend and time how long the gateway takes to take it out of rotation."""
        victim = self.mocks[index]
        await asyncio.to_thread(victim.kill)
        killed_at = time.monotonic()
        self.kills += 1
        out = unhealthy = None
        while unhealthy is None and time.monotonic() - killed_at < 5.0:
            entry = await self.state(client, victim.port)
            now = time.monotonic() - killed_at
            if out is None and (not entry["healthy"] or entry["circuit_state"] != "closed"):
                out = now
            if not entry["healthy"]:
                unhealthy = now
            await asyncio.sleep(0.01)
        assert unhealthy is not None and out is not None, "a killed backend was never marked unhealthy"
        self.out_of_rotation.append(out)
        self.marked_unhealthy.append(unhealthy)

    async def restart(self, client: httpx.AsyncClient, index: int) -> None:
        port = self.mocks[index].port
        self.mocks[index] = await asyncio.to_thread(self.procs.mock, port=port, name=f"chaos-{index}")
        restarted_at = time.monotonic()
        while not (await self.state(client, port))["healthy"]:
            assert time.monotonic() - restarted_at < 5.0, "a restarted backend never came back"
            await asyncio.sleep(0.01)
        self.back_in_rotation.append(time.monotonic() - restarted_at)

    async def killer(self, stop: asyncio.Event, blackout: asyncio.Lock) -> None:
        async with httpx.AsyncClient(timeout=5.0) as client:
            while not stop.is_set():
                async with blackout:
                    pass  # no new kill while the blackout runs
                up = [i for i in range(len(self.mocks)) if i not in self.down]
                if len(up) < 2:  # keep one up outside the blackout
                    await asyncio.sleep(0.05)
                    continue
                index = self.rng.choice(up)
                self.down.add(index)
                await self.kill(client, index)
                await asyncio.sleep(self.rng.uniform(0.0, 0.5))
                await self.restart(client, index)
                self.down.discard(index)
                await asyncio.sleep(self.rng.uniform(0.1, 0.8))

    async def blackout(self, after: float, lock: asyncio.Lock) -> None:
        """After `after` seconds: wait until every backend is up, then kill all three at once."""
        await asyncio.sleep(after)
        async with lock, httpx.AsyncClient(timeout=5.0) as client:
            while self.down:
                await asyncio.sleep(0.01)
            everyone = range(len(self.mocks))
            self.down.update(everyone)
            await asyncio.gather(*(self.kill(client, i) for i in everyone))
            self.blackouts += 1
            await asyncio.gather(*(self.restart(client, i) for i in everyone))
            self.down.clear()


async def chaos_run(procs: Processes, mocks: list[Proc], gateway: Proc, outcomes: Outcomes) -> Chaos:
    chaos = Chaos(procs, mocks, gateway)
    stop = asyncio.Event()
    lock = asyncio.Lock()
    tasks = [
        asyncio.create_task(chaos.killer(stop, lock)),
        asyncio.create_task(chaos.killer(stop, lock)),
        asyncio.create_task(chaos.blackout(6.0, lock)),
    ]
    try:
        await run_load(gateway.url, TOTAL_REQUESTS, outcomes, seed=11)
    finally:
        stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=20)
    return chaos


def summary(values: list[float]) -> str:
    if not values:
        return "n/a"
    return f"mean {statistics.mean(values):.2f}s, max {max(values):.2f}s"


@pytest.mark.slow
def test_chaos_backends_killed_and_restarted_under_load(procs: Processes) -> None:
    ports = [free_port() for _ in range(3)]
    mocks = [procs.mock(port=port, name=f"chaos-{i}") for i, port in enumerate(ports)]
    gateway = procs.gateway(
        config={
            "cache": {"enabled": False},
            "logging": {"level": "warning"},
            "backends": [{"host": "127.0.0.1", "port": port} for port in ports],
            "health_check": {
                "interval_seconds": 0.2,
                "timeout_seconds": 0.5,
                "unhealthy_threshold": 2,
                "healthy_threshold": 1,
            },
            "circuit_breaker": {"failure_threshold": 3, "open_seconds": 1.0},
            "proxy": {
                "connect_timeout_seconds": 0.5,
                "ttfb_timeout_seconds": 5,
                "stream_idle_timeout_seconds": 3,
                "request_timeout_seconds": GATEWAY_REQUEST_TIMEOUT,
                "retries": 2,
            },
        }
    )
    pid = gateway.popen.pid

    def settled() -> bool:
        return bool(httpx.get(gateway.url + "/metrics", timeout=5).json()["requests_active"] == 0)

    warm = Outcomes()
    asyncio.run(run_load(gateway.url, WARMUP_REQUESTS, warm, seed=3))
    assert warm.kinds == {"ok": WARMUP_REQUESTS}, (warm.kinds, warm.unexpected[:5])
    wait_for(settled, what="warm-up requests to finish")
    base_rss, base_fds = vm_rss_kb(pid), fd_census(pid, set(ports))

    outcomes = Outcomes()
    started = time.monotonic()
    chaos = asyncio.run(chaos_run(procs, mocks, gateway, outcomes))
    elapsed = time.monotonic() - started

    kinds = outcomes.kinds
    others = {
        kind: n for kind, n in kinds.items() if kind not in ("ok", "stream_broken", "502", "503", "504")
    }
    print(
        f"\nchaos: {sum(kinds.values())} requests in {elapsed:.1f}s, concurrency {CONCURRENCY}, "
        f"{chaos.kills} backend kills ({chaos.blackouts} blackout of all three)"
        f"\n  successes {kinds['ok']}, streams cut cleanly by a dying backend {kinds['stream_broken']}, "
        f"502 {kinds['502']}, 503 {kinds['503']}, 504 {kinds['504']}"
        f"\n  other outcomes: {others}"
        f"\n  latency max {max(outcomes.latencies):.2f}s, p50 {statistics.median(outcomes.latencies):.3f}s"
        f"\n  dead backend out of rotation after kill: {summary(chaos.out_of_rotation)}"
        f"; marked unhealthy by active checks: {summary(chaos.marked_unhealthy)}"
        f"\n  restarted backend healthy again: {summary(chaos.back_in_rotation)}"
    )
    assert sum(kinds.values()) == TOTAL_REQUESTS
    allowed = {"ok", "stream_broken", *map(str, DOCUMENTED_ERRORS)}
    assert set(kinds) <= allowed, (kinds, outcomes.unexpected[:10])
    assert max(outcomes.latencies) < CLIENT_TIMEOUT
    assert chaos.kills >= 5, "the load ended before the chaos did much: make it longer"
    assert kinds["ok"] >= 0.8 * TOTAL_REQUESTS, kinds
    assert chaos.blackouts == 1
    assert kinds["503"] >= 1, "nothing answered 503 while every backend was down"
    assert max(chaos.marked_unhealthy) < 0.2 * 2 + 0.5 + 1.0  # interval x threshold + probe timeout + slack

    # everything comes back: all backends healthy, every request served
    wait_for(
        lambda: all(e["healthy"] for e in httpx.get(gateway.url + "/metrics", timeout=5).json()["backends"]),
        what="all backends healthy after the chaos",
    )
    after = Outcomes()
    asyncio.run(run_load(gateway.url, 100, after, seed=5))
    assert after.kinds == {"ok": 100}, (after.kinds, after.unexpected[:5])
    wait_for(settled, what="requests to finish")

    def near_baseline() -> bool:
        fds = fd_census(pid, set(ports))
        return (
            vm_rss_kb(pid) <= base_rss + RSS_SLACK_KB
            and fds["other"] <= base_fds["other"] + OTHER_FD_SLACK
            and fds["upstream_close_wait"] == fds["upstream_other"] == 0  # no upstream socket left behind
            and fds["upstream_established"] <= len(ports) * CONCURRENCY  # the pool's bound
        )

    try:
        wait_for(near_baseline, timeout=15.0, interval=0.2, what="memory and fds near baseline")
    finally:
        print(
            f"  gateway VmRSS {base_rss / 1024:.1f} MiB warm -> {vm_rss_kb(pid) / 1024:.1f} MiB after; "
            f"fds {base_fds} -> {fd_census(pid, set(ports))}"
        )
    assert gateway.alive()
