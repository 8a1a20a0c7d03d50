"""The shared Redis tier (issue 13) with a real `redis-server` and real gateways.

Each test starts its own `redis-server` on a free port (killed by PID in a
finaliser) and gateways that name it. Writes to Redis are asynchronous, so a
test waits for the writing gateway's `redis.writes` counter before it asks
another gateway: one request there, never a poll that would fill its own L1.
"""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from ntonix.cache.redis_tier import HEADER, BadValueError, decode_value, encode_value
from tests.conftest import Proc, Processes, chat_body, free_port, wait_for

REDIS_SERVER = shutil.which("redis-server")
TIMEOUT_MS = 25
# Tests of what is shared (not of how long a read may take) give Redis reads this long: at 25 ms a
# read stalled by a loaded machine counts as an error and turns a hit into a miss (seen under load).
GENEROUS_MS = 1000


class RedisServer:
    """A `redis-server` of the test's own, on a free port, without persistence."""

    def __init__(self, tmp_path: Path) -> None:
        self.port = free_port()
        self.dir = tmp_path
        self.popen: subprocess.Popen[bytes] | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        # No skip: a missing redis-server is a broken set-up (`make test` installs it via redis-deps).
        assert REDIS_SERVER is not None, "redis-server is not installed: run `make redis-deps`"
        log = open(self.dir / f"redis-{self.port}.log", "ab")  # noqa: SIM115 (closed with the process)
        self.popen = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
                "--enable-debug-command",
                "yes",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        wait_for(lambda: self.client().ping(), 10, what="redis-server PING")
        return self

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def kill(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(timeout=10)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    try:
        yield server.start()
    finally:
        server.kill()


def gateway(procs: Processes, mock: Proc, url: str, **cache: Any) -> Proc:
    config = {"cache": {"redis_url": url, "redis_timeout_ms": TIMEOUT_MS, "streaming": True, **cache}}
    return procs.gateway([f"127.0.0.1:{mock.port}"], config=config)


def one_then_two(
    send: Callable[[str, Proc], None], one: Proc, two: Proc, first_in: Callable[[], Any], what: str
) -> None:
    """`send("one", one)`, then, once `first_in()` holds, `send("two", two)`; both on threads, joined."""
    first = threading.Thread(target=send, args=("one", one))
    first.start()
    wait_for(first_in, 10, what=what)
    second = threading.Thread(target=send, args=("two", two))
    second.start()
    first.join(30)
    second.join(30)


def redis_stats(gw: Proc) -> dict[str, Any]:
    stats: dict[str, Any] = httpx.get(gw.url + "/cache/stats", timeout=5).json()["redis"]
    return stats


def connected(gw: Proc, timeout: float = 10.0) -> None:
    wait_for(lambda: redis_stats(gw)["connected"], timeout, what=f"{gw.url} connected to redis")


def wait_writes(gw: Proc, count: int) -> None:
    wait_for(lambda: redis_stats(gw)["writes"] >= count, 10, what=f"{count} redis writes")


def backend_requests(gw: Proc) -> int:
    return int(httpx.get(gw.url + "/metrics", timeout=5).json()["backends"][0]["requests"])


ROUTES = [
    ("/v1/chat/completions", chat_body("shared tier chat")),
    ("/v1/completions", {"model": "mock-model", "prompt": "shared tier completion"}),
    ("/v1/embeddings", {"model": "mock-model", "input": ["alpha", "beta"]}),
    ("/v1/chat/completions", chat_body("shared tier stream", stream=True)),
]


def post(gw: Proc, path: str, payload: Any, timeout: float = 30) -> httpx.Response:
    return httpx.post(gw.url + path, json=payload, timeout=timeout)


# -- the value format ---------------------------------------------------------------------------


def test_value_round_trip_and_foreign_values_are_rejected() -> None:
    value = encode_value(b'{"a":1}', "application/json\ngzip", False, 200, 1e12)
    assert decode_value(value) == (b'{"a":1}', "application/json\ngzip", False, 200, 1e12)
    stream = encode_value(b"\x92\xa1a\xa1b", "text/event-stream", True, 200, 5.0)
    assert decode_value(stream)[2] is True
    other_version = value[:4] + bytes([2]) + value[5:]
    for bad in (b"", b"hello world", b"x" * HEADER.size, value[:-1], value + b"!", other_version):
        with pytest.raises(BadValueError):
            decode_value(bad)
    flipped = value[:-2] + bytes([value[-2] ^ 1]) + value[-1:]
    with pytest.raises(BadValueError, match="checksum"):
        decode_value(flipped)


# -- sharing ------------------------------------------------------------------------------------


def test_a_miss_on_one_gateway_is_a_hit_on_the_other(procs: Processes, redis_server: RedisServer) -> None:
    mock = procs.mock()
    one = gateway(procs, mock, redis_server.url, redis_timeout_ms=GENEROUS_MS)
    two = gateway(procs, mock, redis_server.url, redis_timeout_ms=GENEROUS_MS)
    connected(one)
    connected(two)
    for path, payload in ROUTES:
        written = redis_stats(one)["writes"]
        first = post(one, path, payload)
        assert first.status_code == 200, first.text
        assert first.headers["x-cache"] == "MISS"
        wait_writes(one, written + (2 if path == "/v1/embeddings" else 1))  # embeddings: one per input
        second = post(two, path, payload)
        assert second.status_code == 200
        assert second.headers["x-cache"] == "HIT", path
        assert second.content == first.content, path  # ids and timestamps too: the same bytes
        assert second.headers["content-type"] == first.headers["content-type"]
        third = post(two, path, payload)  # now from two's own L1
        assert third.headers["x-cache"] == "HIT" and third.content == first.content
    assert backend_requests(two) == 0
    assert backend_requests(one) == len(ROUTES)
    stats = redis_stats(two)
    assert stats["hits"] == len(ROUTES) + 1 and stats["errors"] == 0 and stats["corrupt"] == 0
    keys = redis_server.client().keys("ntonix:v1:global:*")
    assert len(keys) == len(ROUTES) + 1
    assert all(len(k.rsplit(b":", 1)[1]) == 32 for k in keys)
    ttl = redis_server.client().pttl(keys[0])
    assert 3_000_000 < ttl <= 3_600_000  # written with the entry's TTL (cache.ttl_seconds, 1 h)
    prometheus = httpx.get(two.url + "/metrics/prometheus", timeout=5).text
    assert "ntonix_redis_connected 1" in prometheus
    assert f"ntonix_redis_hits_total {len(ROUTES) + 1}" in prometheus


def test_entries_over_the_size_cap_stay_local_and_streams_need_cache_streaming(
    procs: Processes, redis_server: RedisServer
) -> None:
    mock = procs.mock()
    gw = gateway(procs, mock, redis_server.url, redis_max_entry_mb=0.0001, streaming=False)  # ~100 bytes
    connected(gw)
    assert post(gw, *ROUTES[0]).status_code == 200
    wait_for(lambda: redis_stats(gw)["too_large"] == 1, 5, what="too_large counted")
    assert redis_stats(gw)["writes"] == 0
    assert redis_server.client().keys("ntonix:*") == []
    assert redis_stats(gw)["misses"] == 1
    # without cache.streaming a stream is coalesced, never stored: no Redis read for it either
    assert post(gw, *ROUTES[3]).status_code == 200
    stats = redis_stats(gw)
    assert (stats["misses"], stats["skipped"], stats["hits"]) == (1, 0, 0)


def test_a_corrupt_or_foreign_value_is_a_miss_logged_once(
    procs: Processes, redis_server: RedisServer
) -> None:
    mock = procs.mock()
    writer = gateway(procs, mock, redis_server.url, redis_timeout_ms=GENEROUS_MS)
    connected(writer)
    payloads = [chat_body(f"to be corrupted {i}") for i in range(3)]
    for payload in payloads:
        assert post(writer, "/v1/chat/completions", payload).status_code == 200
    wait_writes(writer, 3)
    client = redis_server.client()
    keys = client.keys("ntonix:v1:*")
    good = client.get(keys[0])
    assert isinstance(good, bytes)
    client.set(keys[0], b"garbage from another program")
    client.set(keys[1], good[:4] + bytes([9]) + good[5:])  # a future format version
    client.set(keys[2], good[:-3])  # truncated
    reader = gateway(procs, mock, redis_server.url, redis_timeout_ms=GENEROUS_MS)
    connected(reader)
    for payload in payloads:
        answer = post(reader, "/v1/chat/completions", payload)
        assert answer.status_code == 200
        assert answer.headers["x-cache"] == "MISS"
    stats = redis_stats(reader)
    assert stats["corrupt"] == 3 and stats["hits"] == 0 and stats["errors"] == 0
    assert stats["connected"] is True  # a bad value is not a failing Redis
    wait_for(lambda: "not an NTONIX v1 entry" in reader.log(), 5, what="the corrupt-value warning")
    assert reader.log().count("not an NTONIX v1 entry") == 1


# -- failures -----------------------------------------------------------------------------------


class Load:
    """Clients sending chat requests (a few distinct prompts, mostly L1 misses) and timing them."""

    def __init__(self, gw: Proc, threads: int = 4) -> None:
        self.gw = gw
        self.results: list[tuple[float, float, int]] = []  # (start, latency s, status)
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)

    def _run(self, index: int) -> None:
        n = 0
        with httpx.Client(timeout=30) as client:
            while not self.stop.is_set():
                n += 1
                # Cache-Control: no-cache skips L1 *and* Redis; so vary the prompt instead: every
                # request is an L1 miss that reads Redis.
                payload = chat_body(f"load {index} {n}")
                started = time.perf_counter()
                try:
                    status = client.post(self.gw.url + "/v1/chat/completions", json=payload).status_code
                except httpx.HTTPError:
                    status = -1
                with self.lock:
                    self.results.append((started, time.perf_counter() - started, status))

    def window(self, start: float, end: float) -> list[tuple[float, float, int]]:
        with self.lock:
            return [r for r in self.results if start <= r[0] < end]


def p99(rows: list[tuple[float, float, int]]) -> float:
    latencies = sorted(r[1] for r in rows)
    return latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]


def test_redis_killed_under_load_fails_no_request_and_comes_back(
    procs: Processes, redis_server: RedisServer
) -> None:
    mock = procs.mock()
    gw = gateway(procs, mock, redis_server.url)
    connected(gw)
    with Load(gw) as load:
        wait_for(lambda: len(load.results) >= 200, 30, what="load before the kill")
        killed_at = time.perf_counter()
        redis_server.kill()
        wait_for(lambda: not redis_stats(gw)["connected"], 10, what="connected: false")
        wait_for(lambda: len(load.window(killed_at, 1e18)) >= 200, 30, what="load after the kill")
        back_at = time.perf_counter()
        redis_server.start()  # the same port
        connected(gw, timeout=10)
        reconnect_seconds = time.perf_counter() - back_at
        wait_for(lambda: len(load.window(time.perf_counter() - 0.5, 1e18)) >= 20, 30, what="load after")
    assert load.results and all(status == 200 for _, _, status in load.results), "a request failed"
    before = load.window(0, killed_at)
    after = load.window(killed_at, back_at)
    added_ms = (p99(after) - p99(before)) * 1000
    print(f"p99 before {p99(before) * 1000:.1f} ms, while down {p99(after) * 1000:.1f} ms")
    print(f"reconnected {reconnect_seconds:.2f} s after redis came back")
    # NOTE: the bound is the read timeout plus slack for this shared 2-core machine's scheduling noise.
    # Most runs add 0-5 ms; 3 of 7 runs of this file beside test_issue9.py (session 4) added 98-103 ms
    # (the p99 of a ~1 s window is its two or three slowest requests, so one stall at the kill moves
    # it), hence 150 ms of slack. Requests stalled longer than that still fail this, and no request
    # may fail at all (above).
    assert added_ms <= TIMEOUT_MS + 150
    assert reconnect_seconds < 5
    stats = redis_stats(gw)
    assert stats["skipped"] > 0 and stats["errors"] >= 1
    # used again: a fresh answer is written, and read back by a new gateway
    payload = chat_body("after the outage")
    assert post(gw, "/v1/chat/completions", payload).headers["x-cache"] == "MISS"
    wait_for(lambda: redis_server.client().keys("ntonix:*"), 10, what="a write after the outage")


def test_gateway_starts_with_redis_down_and_uses_it_when_it_comes_up(
    procs: Processes, tmp_path: Path
) -> None:
    server = RedisServer(tmp_path)
    mock = procs.mock()
    try:
        gw = gateway(procs, mock, server.url)
        assert redis_stats(gw)["connected"] is False
        answer = post(gw, "/v1/chat/completions", chat_body("redis is down"))
        assert answer.status_code == 200 and answer.headers["x-cache"] == "MISS"
        assert redis_stats(gw)["skipped"] >= 1
        server.start()
        connected(gw, timeout=10)
        assert post(gw, "/v1/chat/completions", chat_body("redis is up")).status_code == 200
        wait_writes(gw, 1)
        assert server.client().keys("ntonix:v1:*")
    finally:
        server.kill()


def test_a_slow_redis_still_bounds_every_request(procs: Processes, redis_server: RedisServer) -> None:
    mock = procs.mock()
    gw = gateway(procs, mock, redis_server.url)
    connected(gw)
    sleeper = threading.Thread(target=lambda: redis_server.client().execute_command("DEBUG", "SLEEP", "3"))
    with Load(gw, threads=3) as load:
        wait_for(lambda: len(load.results) >= 50, 30, what="load before the sleep")
        slept_at = time.perf_counter()
        sleeper.start()
        wait_for(lambda: not redis_stats(gw)["connected"], 5, what="the circuit to open")
        sleeper.join(10)
        woke_at = time.perf_counter()
        connected(gw, timeout=10)
    during = load.window(slept_at, woke_at)
    assert len(during) >= 20
    assert all(status == 200 for _, _, status in load.results)
    worst = max(r[1] for r in during)
    print(
        f"3 s DEBUG SLEEP: {len(during)} requests, worst {worst * 1000:.0f} ms, p99 {p99(during) * 1000:.0f}"
    )
    # NOTE: Redis is frozen for 3 s; each request waits at most the 25 ms read timeout (then the circuit
    # skips Redis). 0.5 s is generous for scheduling noise and still far below the sleep.
    assert worst < 0.5
    assert redis_stats(gw)["errors"] >= 1


def test_config_rejects_a_url_that_is_not_redis(procs: Processes) -> None:
    gw = procs.gateway(["127.0.0.1:9"], config={"cache": {"redis_url": "http://x"}}, wait=False)
    gw.popen.wait(timeout=30)
    assert gw.popen.returncode == 2
    assert "cache.redis_url" in gw.log()


# -- fleet single-flight (cache.redis_lock_ms) ------------------------------------------------


def mock_stats(mock: Proc) -> dict[str, Any]:
    stats: dict[str, Any] = httpx.get(mock.url + "/mock/stats", timeout=5).json()
    return stats


def test_fleet_single_flight_one_backend_call_for_two_gateways(
    procs: Processes, redis_server: RedisServer
) -> None:
    mock = procs.mock()
    one = gateway(procs, mock, redis_server.url, redis_lock_ms=10_000)
    two = gateway(procs, mock, redis_server.url, redis_lock_ms=10_000)
    connected(one)
    connected(two)
    payload = chat_body("one backend call for the fleet")
    slow = {"x-mock-latency-ms": "1500"}
    answers: dict[str, httpx.Response] = {}

    def send(name: str, gw: Proc) -> None:
        answers[name] = httpx.post(gw.url + "/v1/chat/completions", json=payload, headers=slow, timeout=30)

    one_then_two(send, one, two, lambda: mock_stats(mock)["in_flight"] == 1, "the first request upstream")
    assert answers["one"].status_code == answers["two"].status_code == 200
    assert answers["one"].headers["x-cache"] == "MISS"
    assert answers["two"].headers["x-cache"] == "HIT"
    assert answers["two"].content == answers["one"].content
    assert mock_stats(mock)["chat_requests"] == 1
    assert redis_stats(one)["locks"] == 1
    assert (redis_stats(two)["lock_waits"], redis_stats(two)["lock_hits"]) == (1, 1)
    wait_for(lambda: not redis_server.client().keys("ntonix:v1:*:lock:*"), 5, what="the lock released")


def test_fleet_waiter_goes_upstream_when_the_lock_holder_fails(
    procs: Processes, redis_server: RedisServer
) -> None:
    mock = procs.mock()
    one = gateway(procs, mock, redis_server.url, redis_lock_ms=20_000)
    two = gateway(procs, mock, redis_server.url, redis_lock_ms=20_000)
    connected(one)
    connected(two)
    payload = chat_body("the holder fails")
    failing = {"x-mock-latency-ms": "1000", "x-mock-status": "500"}
    answers: dict[str, httpx.Response] = {}

    def send(name: str, gw: Proc, headers: dict[str, str]) -> None:
        answers[name] = httpx.post(gw.url + "/v1/chat/completions", json=payload, headers=headers, timeout=30)

    first = threading.Thread(target=send, args=("one", one, failing))
    first.start()
    wait_for(lambda: mock_stats(mock)["in_flight"] == 1, 10, what="the first request upstream")
    started = time.monotonic()
    second = threading.Thread(target=send, args=("two", two, {}))
    second.start()
    first.join(30)
    second.join(30)
    waited = time.monotonic() - started
    assert answers["one"].status_code == 500
    assert answers["two"].status_code == 200 and answers["two"].headers["x-cache"] == "MISS"
    assert waited < 10  # released at once, not held for the lock's 20 s
    assert redis_stats(two)["lock_waits"] == 1 and redis_stats(two)["lock_hits"] == 0


def test_fleet_lock_waiter_gets_a_gzip_answer_undone_when_it_does_not_accept_gzip(
    procs: Processes, redis_server: RedisServer, httpserver: HTTPServer
) -> None:
    # A backend that gzips although asked for identity, answering only once gateway two waits on the
    # lock gateway one holds: both clients, neither accepting gzip, get the plain bytes.
    plain = json.dumps({"id": "f1", "object": "chat.completion", "choices": []}).encode()
    fleet: list[Proc] = []

    def gzip_once_two_waits(request: Request) -> Response:
        wait_for(lambda: redis_stats(fleet[1])["lock_waits"] >= 1, 20, what="gateway two on the lock")
        return Response(
            gzip.compress(plain), headers={"content-type": "application/json", "content-encoding": "gzip"}
        )

    httpserver.expect_request("/health").respond_with_json({"status": "ok"})
    httpserver.expect_request("/v1/chat/completions").respond_with_handler(gzip_once_two_waits)
    # a generous Redis timeout: a read stalled by a loaded machine is not an error here
    config = {"cache": {"redis_url": redis_server.url, "redis_timeout_ms": 1000, "redis_lock_ms": 10_000}}
    fleet.extend(procs.gateway([f"127.0.0.1:{httpserver.port}"], config=config) for _ in range(2))
    one, two = fleet
    connected(one)
    connected(two)
    payload = json.dumps(chat_body("gzipped for the fleet")).encode()
    answers: dict[str, tuple[httpx.Response, bytes]] = {}

    def send(name: str, gw: Proc) -> None:
        with httpx.Client(timeout=30) as client:
            request = client.build_request(
                "POST",
                gw.url + "/v1/chat/completions",
                content=payload,
                headers={"content-type": "application/json", "accept-encoding": "identity"},
            )
            response = client.send(request, stream=True)
            answers[name] = (response, b"".join(response.iter_raw()))
            response.close()

    one_then_two(send, one, two, lambda: redis_stats(one)["locks"] == 1, "gateway one holding the lock")
    for name, cache in (("one", "MISS"), ("two", "HIT")):
        response, raw = answers[name]
        assert response.status_code == 200 and response.headers["x-cache"] == cache, response.headers
        assert "content-encoding" not in response.headers, (name, response.headers)
        assert raw == plain, name
    assert (redis_stats(two)["lock_waits"], redis_stats(two)["lock_hits"]) == (1, 1)
    assert len([entry for entry in httpserver.log if entry[0].path == "/v1/chat/completions"]) == 1
