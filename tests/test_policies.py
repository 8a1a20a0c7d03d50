"""Unit tests of the balancing policies and the pool that places requests (pure Python, fast)."""

from __future__ import annotations

import collections
import random

from ntonix.balance import LeastRequests, PowerOfTwo, SessionAffinity, SmoothWeightedRoundRobin
from ntonix.config import BackendConfig, CircuitBreakerConfig
from ntonix.upstream.backend import Backend
from ntonix.upstream.pool import BackendPool

BREAKER = CircuitBreakerConfig(failure_threshold=2, open_seconds=30)


class Ctx:
    def __init__(self, session: str | None = None, prompt: str = "") -> None:
        self.session_key = session
        self.prompt = prompt

    def prompt_text(self) -> str:
        return self.prompt


def backends(*weights: int) -> list[Backend]:
    return [
        Backend(BackendConfig(host="10.0.0.1", port=8000 + i, weight=w), BREAKER)
        for i, w in enumerate(weights)
    ]


def test_swrr_interleaves_by_weight() -> None:
    a, b = backends(1, 2)
    policy = SmoothWeightedRoundRobin()
    picks = [policy.select(Ctx(), [a, b]) for _ in range(30)]
    assert picks[:3] == [b, a, b]
    assert picks.count(b) == 20 and picks.count(a) == 10


def test_least_requests_prefers_the_idle_backend_relative_to_weight() -> None:
    a, b, c = backends(1, 1, 4)
    a.in_flight, b.in_flight, c.in_flight = 3, 1, 3  # relative loads 3, 1, 0.75
    assert LeastRequests().select(Ctx(), [a, b, c]) is c


def test_least_requests_spreads_ties() -> None:
    pool = backends(1, 1, 1)
    policy = LeastRequests()
    picks = collections.Counter(policy.select(Ctx(), pool).port for _ in range(30))
    assert sorted(picks.values()) == [10, 10, 10]


def test_pool_counts_in_flight_so_a_stuck_backend_loses_new_work() -> None:
    stuck, free = backends(1, 1)
    pool = BackendPool("m", [stuck, free], LeastRequests())
    long_streams = [pool.pick(Ctx()) for _ in range(2)]  # one each
    assert {lease.backend for lease in long_streams if lease} == {stuck, free}
    free_lease = next(lease for lease in long_streams if lease and lease.backend is free)
    pool.release(Ctx(), free_lease)  # the short one ended; the stream on `stuck` goes on
    picks = []
    for _ in range(10):
        lease = pool.pick(Ctx())
        assert lease is not None
        picks.append(lease.backend)
        pool.release(Ctx(), lease)
    assert picks == [free] * 10
    assert stuck.in_flight == 1 and free.in_flight == 0


def test_pool_release_is_idempotent_and_skips_tried_and_unhealthy() -> None:
    a, b, c = backends(1, 1, 1)
    c.healthy = False
    pool = BackendPool(None, [a, b, c], SmoothWeightedRoundRobin())
    lease = pool.pick(Ctx(), tried=[a])
    assert lease is not None and lease.backend is b
    pool.release(Ctx(), lease)
    pool.release(Ctx(), lease)
    assert b.in_flight == 0
    assert pool.pick(Ctx(), tried=[a, b]) is None


def test_power_of_two_picks_the_less_loaded_of_two() -> None:
    a, b = backends(1, 1)
    a.in_flight = 5
    policy = PowerOfTwo(random.Random(7))
    assert all(policy.select(Ctx(), [a, b]) is b for _ in range(20))


def test_power_of_two_spreads_by_weight_when_idle() -> None:
    pool = backends(1, 3)
    policy = PowerOfTwo(random.Random(1))
    picks = collections.Counter(policy.select(Ctx(), pool).port for _ in range(4000))
    # with both idle the first draw wins ties: its distribution follows the weights
    assert 0.65 < picks[8001] / 4000 < 0.85


def test_session_sticks_and_moves_few_sessions_when_a_backend_is_added() -> None:
    pool = backends(1, 1, 1, 1)
    policy = SessionAffinity()
    sessions = [f"s{i}" for i in range(2000)]
    before = {s: policy.select(Ctx(s), pool) for s in sessions}
    assert all(policy.select(Ctx(s), pool) is before[s] for s in sessions[:100])  # sticky
    grown = [*pool, *backends(1, 1, 1, 1, 1)[4:]]
    after = {s: policy.select(Ctx(s), grown) for s in sessions}
    moved = sum(1 for s in sessions if after[s] is not before[s])
    assert 0.1 < moved / len(sessions) < 0.3  # ~1/5 move to the new backend, the rest stay
    assert all(after[s] is grown[4] for s in sessions if after[s] is not before[s])


def test_session_fails_over_and_comes_back() -> None:
    pool = backends(1, 1, 1)
    policy = SessionAffinity()
    home = policy.select(Ctx("user-42"), pool)
    others = [b for b in pool if b is not home]
    away = policy.select(Ctx("user-42"), others)
    assert away is not home
    assert policy.select(Ctx("user-42"), pool) is home


def test_session_without_key_balances() -> None:
    pool = backends(1, 1)
    policy = SessionAffinity()
    picks = collections.Counter(policy.select(Ctx(None), pool).port for _ in range(10))
    assert picks[8000] == picks[8001] == 5
