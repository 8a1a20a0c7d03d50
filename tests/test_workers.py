"""`server.workers` (issue 13): several gateway processes on one port under a supervisor.

Real processes: a supervisor started with `--workers 2`, its workers found through `/metrics`
(`process.pid`, `process.worker`: each worker answers for itself), and a mock backend.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Proc, Processes, chat_body, wait_for
from tests.test_redis_tier import REDIS_SERVER, RedisServer

CHAT = "/v1/chat/completions"


def process_of(gw: Proc) -> dict[str, Any]:
    """The `/metrics` of whichever worker the kernel handed this new connection to."""
    with httpx.Client(timeout=5) as client:  # one connection per call
        document: dict[str, Any] = client.get(gw.url + "/metrics").json()
    return document


def workers_seen(gw: Proc, count: int = 2, timeout: float = 30.0) -> dict[int, dict[str, Any]]:
    """Poll new connections until `count` different workers answered; worker number -> its /metrics."""
    seen: dict[int, dict[str, Any]] = {}

    def enough() -> bool:
        document = process_of(gw)
        seen[document["process"]["worker"]] = document
        return len(seen) >= count

    wait_for(enough, timeout, interval=0.01, what=f"{count} workers answering")
    return seen


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as fh:
        return int(fh.read().rsplit(")", 1)[1].split()[1])


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie has exited
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def workers_gateway(procs: Processes, mock: Proc, config: dict[str, Any] | None = None) -> Proc:
    extra = ["--workers", "2", "--threads", "1"]
    return procs.gateway([f"127.0.0.1:{mock.port}"], config=config, extra=extra)


def test_two_workers_answer_on_one_port_and_both_serve(procs: Processes) -> None:
    mock = procs.mock()
    gw = workers_gateway(procs, mock)
    seen = workers_seen(gw)
    assert set(seen) == {1, 2}
    pids = {doc["process"]["pid"] for doc in seen.values()}
    assert len(pids) == 2 and gw.popen.pid not in pids
    assert all(parent_of(pid) == gw.popen.pid for pid in pids)
    # proxied requests on new connections: every one answered, by both workers
    for i in range(40):
        with httpx.Client(timeout=10) as client:
            assert client.post(gw.url + CHAT, json=chat_body(f"w {i}")).status_code == 200
    assert mock_requests(mock) == 40
    served = {w for w, doc in workers_seen(gw).items() if doc["requests_total"] > 0}
    assert served == {1, 2}


def mock_requests(mock: Proc) -> int:
    return int(httpx.get(mock.url + "/mock/stats", timeout=5).json()["chat_requests"])


def test_sigterm_drains_every_worker_and_sighup_reaches_every_worker(procs: Processes) -> None:
    mock = procs.mock()
    gw = workers_gateway(procs, mock, config={"cache": {"enabled": False}})
    pids = {w: d["process"]["pid"] for w, d in workers_seen(gw).items()}
    gw.signal(signal.SIGHUP)
    wait_for(lambda: gw.log().count("backends reloaded") >= 2, 10, what="both workers reloaded")

    results: list[int] = []
    lock = threading.Lock()

    def slow(i: int) -> None:
        with httpx.Client(timeout=30) as client:
            status = client.post(
                gw.url + CHAT, json=chat_body(f"slow {i}"), headers={"x-mock-latency-ms": "2000"}
            ).status_code
        with lock:
            results.append(status)

    threads = [threading.Thread(target=slow, args=(i,)) for i in range(10)]
    for thread in threads:
        thread.start()

    def both_busy() -> bool:
        busy = {w for w, d in workers_seen(gw).items() if d["requests_active"] > 0}
        return busy == {1, 2}

    wait_for(both_busy, 10, interval=0.05, what="slow requests in flight on both workers")
    gw.signal(signal.SIGTERM)
    for thread in threads:
        thread.join(30)
    assert results == [200] * 10  # drained, not cut
    gw.popen.wait(timeout=30)
    assert gw.popen.returncode == 0
    wait_for(lambda: not any(alive(pid) for pid in pids.values()), 10, what="workers gone")
    assert "all workers stopped" in gw.log()


def test_a_dead_worker_is_restarted_and_logged(procs: Processes) -> None:
    mock = procs.mock()
    gw = workers_gateway(procs, mock)
    seen = workers_seen(gw)
    victim = seen[2]["process"]["pid"]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: f"worker 2 (pid {victim}) died with signal 9" in gw.log(), 10, what="the death logged")

    def replaced() -> bool:
        doc = process_of(gw)
        return doc["process"]["worker"] == 2 and doc["process"]["pid"] != victim

    wait_for(replaced, 30, interval=0.01, what="worker 2 restarted")
    assert gw.alive()


def test_supervisor_killed_takes_its_workers_along(procs: Processes) -> None:
    mock = procs.mock()
    gw = workers_gateway(procs, mock)
    pids = [d["process"]["pid"] for d in workers_seen(gw).values()]
    gw.popen.kill()
    gw.popen.wait(timeout=10)
    wait_for(lambda: not any(alive(pid) for pid in pids), 10, what="orphaned workers to exit")
    with socket.socket() as probe:  # and the port is free again
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        wait_for(lambda: probe.bind(("127.0.0.1", gw.port)) is None, 10, what="the port to be free")


def test_a_port_held_by_another_program_is_still_an_error(procs: Processes, tmp_path: Path) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        proc = procs.spawn(
            ["run", "--port", str(port), "--bind", "127.0.0.1", "--backend", "127.0.0.1:9", "--workers", "2"],
            port,
        )
        proc.popen.wait(timeout=30)
        assert proc.popen.returncode == 2
        assert f"cannot listen on 127.0.0.1:{port}: port already in use" in proc.log()
        assert "Traceback" not in proc.log()
    finally:
        holder.close()


@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed (make redis-deps)")
def test_workers_share_the_redis_tier(procs: Processes, tmp_path: Path) -> None:
    server = RedisServer(tmp_path).start()
    try:
        mock = procs.mock()
        gw = workers_gateway(procs, mock, {"cache": {"redis_url": server.url}})
        workers_seen(gw)
        wait_for(lambda: _redis_up_everywhere(gw), 20, what="every worker connected to redis")
        first = httpx.post(gw.url + CHAT, json=chat_body("shared by workers"), timeout=10)
        assert first.headers["x-cache"] == "MISS"
        wait_for(lambda: server.client().keys("ntonix:v1:*"), 10, what="the write")
        for _ in range(20):  # new connections: both workers answer
            with httpx.Client(timeout=10) as client:
                again = client.post(gw.url + CHAT, json=chat_body("shared by workers"))
            assert again.headers["x-cache"] == "HIT" and again.content == first.content
        assert mock_requests(mock) == 1  # the other worker read Redis instead of the backend
    finally:
        server.kill()


def _redis_up_everywhere(gw: Proc) -> bool:
    """Ten answers in a row on new connections (so from both workers, almost surely) say connected."""
    for _ in range(10):
        with httpx.Client(timeout=5) as client:
            if not client.get(gw.url + "/cache/stats").json()["redis"]["connected"]:
                return False
    return True
