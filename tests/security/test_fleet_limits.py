"""Limits shared by two gateways through a real `redis-server` (cache.redis_url), and the local fallback
when Redis goes away (logged once)."""

from __future__ import annotations

import hashlib
from typing import Any

import httpx

from tests.conftest import Proc, Processes, wait_for
from tests.security.conftest import ADMIN, MODEL, chat
from tests.test_redis_tier import RedisServer, redis_server

__all__ = ["redis_server"]  # the fixture, used by name

KEY = "sk-fleet-Rt5Hw"


def fleet_gateway(procs: Processes, mock: Proc, url: str, **auth: Any) -> Proc:
    config = {
        "cache": {"redis_url": url, "redis_timeout_ms": 200, "redis_retry_seconds": 0.2},
        "auth": {"keys": [{"key": KEY, "name": "fleet", "rpm": 4, **auth}], "admin_key": ADMIN},
    }
    return procs.gateway([f"127.0.0.1:{mock.port}"], config=config)


def ask(gateway: Proc, content: str) -> httpx.Response:
    return httpx.post(
        gateway.url + "/v1/chat/completions",
        json=chat(content),
        headers={"authorization": f"Bearer {KEY}"},
        timeout=10,
    )


def connected(gateway: Proc) -> bool:
    stats = httpx.get(gateway.url + "/cache/stats", headers={"authorization": f"Bearer {ADMIN}"}, timeout=5)
    return bool(stats.json()["redis"]["connected"])


def test_two_gateways_share_one_rpm(procs: Processes, redis_server: RedisServer) -> None:
    mock = procs.mock("--model", MODEL)
    a = fleet_gateway(procs, mock, redis_server.url)
    b = fleet_gateway(procs, mock, redis_server.url)
    for gw in (a, b):
        wait_for(lambda gw=gw: connected(gw), 10, what="connected to redis")  # type: ignore[misc]
    statuses, remaining = [], []
    for i, gw in enumerate([a, b, a, b, a, b]):
        answer = ask(gw, f"fleet {i}")
        statuses.append(answer.status_code)
        remaining.append(answer.headers.get("x-ratelimit-remaining-requests"))
    assert statuses == [200, 200, 200, 200, 429, 429]  # 4 a minute for the fleet, not 4 per gateway
    assert remaining == ["3", "2", "1", "0", "0", "0"]
    assert 14 <= int(ask(a, "fleet 7").headers["retry-after"]) <= 15  # one back every 15 s
    assert redis_server.client().exists("ntonix:v1:limit:" + hashlib.sha256(KEY.encode()).hexdigest()[:32])
    for gw in (a, b):
        assert KEY not in gw.log()


def test_redis_down_means_local_limits_logged_once(procs: Processes, redis_server: RedisServer) -> None:
    mock = procs.mock("--model", MODEL)
    a = fleet_gateway(procs, mock, redis_server.url)
    wait_for(lambda: connected(a), 10, what="connected to redis")
    assert ask(a, "before").status_code == 200  # 1 of 4, counted in redis
    redis_server.kill()
    statuses = [ask(a, f"down {i}").status_code for i in range(6)]
    # the local limiter decides now, on its own count: 4 a minute for this gateway
    assert statuses == [200, 200, 200, 200, 429, 429], statuses
    lines = [line for line in a.log().splitlines() if "rate limits: redis unavailable" in line]
    assert len(lines) == 1, lines
