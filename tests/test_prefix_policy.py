"""Unit tests of the `prefix` policy (`ntonix.balance.prefix.PrefixAffinity`) with plain stand-in
backends: affinity for a conversation's next turn, the shared system prompt not pulling traffic to
one backend, the load term taking over gradually, weights, ties, feedback through `cached_tokens`,
forgetting a backend, and more than 64 backend ids over time (pure Python, fast)."""

from __future__ import annotations

import collections
import random
import string
from dataclasses import dataclass

from ntonix.balance.prefix import PrefixAffinity

MB = 1 << 20


@dataclass(eq=False)
class Stub:
    id: int
    weight: int = 1
    in_flight: int = 0


class Ctx:
    def __init__(self, prompt: str) -> None:
        self.prompt = prompt
        self.session_key: str | None = None

    def prompt_text(self) -> str:
        return self.prompt


def words(rng: random.Random, n: int) -> str:
    return "".join(rng.choices(string.ascii_lowercase + " ", k=n))


def pool(n: int) -> list[Stub]:
    return [Stub(i) for i in range(n)]


def test_next_turn_goes_where_the_conversation_is() -> None:
    rng = random.Random(1)
    backends = pool(4)
    policy = PrefixAffinity(MB)
    conversations = [words(rng, 2000) for _ in range(8)]
    homes = [policy.select(Ctx(c), backends) for c in conversations]
    # Fresh conversations spread like least_requests (all idle: round the backends).
    assert sorted(collections.Counter(b.id for b in homes).values()) == [2, 2, 2, 2]
    for turn in range(3):
        for i, c in enumerate(conversations):
            conversations[i] = c + words(rng, 300)
            assert policy.select(Ctx(conversations[i]), backends) is homes[i], (turn, i)
    assert policy.affinity_picks == 3 * 8


def test_a_system_prompt_every_backend_holds_does_not_attract() -> None:
    rng = random.Random(2)
    backends = pool(3)
    policy = PrefixAffinity(MB)
    system = words(rng, 4000)
    for b in backends:  # every backend has served the system prompt
        policy.index.insert(system, b.id)
    # One backend also holds a little more of one particular prompt.
    policy.index.insert(system + "x" * 64, 2)
    picks = collections.Counter(policy.select(Ctx(system + words(rng, 500)), backends).id for _ in range(30))
    assert sorted(picks.values()) == [10, 10, 10]  # no preference: spread
    assert policy.select(Ctx(system + "x" * 64 + "more"), backends).id == 2


def test_a_system_prompt_one_backend_holds_sends_traffic_there_until_load_says_no() -> None:
    rng = random.Random(3)
    a, b = pool(2)
    policy = PrefixAffinity(MB)
    system = words(rng, 3000)
    policy.index.insert(system, a.id)
    # Idle pool: the holder wins.
    assert policy.select(Ctx(system + words(rng, 100)), [a, b]) is a
    # The holder's load rises; at some point the other takes the work, not before.
    flips = None
    for load in range(1, 20):
        a.in_flight = load
        b.in_flight = 1
        policy = PrefixAffinity(MB)
        policy.index.insert(system, a.id)
        if policy.select(Ctx(system + words(rng, 100)), [a, b]) is b:
            flips = load
            break
    assert flips is not None and flips >= 2, flips  # gradual: a few requests more, not one


def test_one_request_in_flight_at_low_load_does_not_move_a_conversation() -> None:
    # Measured in bench/routing.py: a load term relative to the mean weighed one request in flight on
    # an idle pool of 4 like 4 requests, so a conversation left its backend whenever that backend was
    # answering somebody else. The excess over the idlest candidate weighs it as one request.
    rng = random.Random(6)
    backends = pool(4)
    policy = PrefixAffinity(MB)
    system = words(rng, 1000)
    for b in backends:
        policy.index.insert(system, b.id)  # every backend holds the system prompt: it does not count
    conversation = system + words(rng, 2000)  # two thirds of the next prompt are this backend's
    home = policy.select(Ctx(conversation), backends)
    home.in_flight = 1
    conversation += words(rng, 400)
    assert policy.select(Ctx(conversation), backends) is home
    # ... and a backend far busier than the others does lose it
    home.in_flight = 12
    assert policy.select(Ctx(conversation + words(rng, 400)), backends) is not home


def test_the_load_term_is_relative_to_weight() -> None:
    rng = random.Random(4)
    small, big = Stub(0, weight=1), Stub(1, weight=4)
    policy = PrefixAffinity(MB)
    # No prefix anywhere: least loaded per unit of weight.
    small.in_flight, big.in_flight = 1, 3  # 1.0 vs 0.75
    assert policy.select(Ctx(words(rng, 500)), [small, big]) is big
    # With affinity on `big`, its weight keeps its relative load low, so it keeps the prompt.
    text = words(rng, 1000)
    policy.index.insert(text, big.id)
    small.in_flight, big.in_flight = 1, 6  # per unit of weight 1.0 vs 1.5: half a request more
    assert policy.select(Ctx(text + "!"), [small, big]) is big


def test_short_prompts_and_single_candidates() -> None:
    policy = PrefixAffinity(MB)
    a, b = pool(2)
    b.in_flight = 1
    assert policy.select(Ctx("hi"), [a, b]) is a
    assert policy.select(Ctx("x" * 500), [b]) is b
    # The single candidate's pick is still recorded.
    assert policy.index.match_prefix("x" * 500) == {b.id: 448}


def test_feedback_lowers_trust_and_confirmations_restore_it() -> None:
    rng = random.Random(5)
    a, b = pool(2)
    policy = PrefixAffinity(MB, chars_per_token=4.0)
    text = words(rng, 4000)
    policy.index.insert(text, a.id)
    ctx = Ctx(text + "next")
    assert policy.select(ctx, [a, b]) is a
    policy.on_complete(ctx, a, cached_tokens=1000)  # 4000 chars confirmed
    assert policy.trust.get(a.id, 1.0) == 1.0 and policy.feedback_confirmed == 1
    for _ in range(20):
        ctx = Ctx(text + words(rng, 50))
        assert policy.select(ctx, [a, b]) is a or policy.trust[a.id] < 0.5
        policy.on_complete(ctx, a, cached_tokens=0)  # it kept nothing
    assert policy.trust[a.id] < 0.1
    assert policy.feedback_weakened >= 10
    # At the trust floor its entries for the prompt were dropped: the prompt is cold again.
    assert policy.feedback_dropped_blocks > 0
    # Unknown contexts, missing usage and another backend's answer change nothing.
    before = dict(policy.trust)
    policy.on_complete(Ctx(text), a, cached_tokens=0)
    policy.on_complete(ctx, b, None)
    assert policy.trust == before
    # Confirmations bring it back.
    policy.index.insert(text, a.id)
    for _ in range(20):
        ctx = Ctx(text + words(rng, 50))
        if policy.select(ctx, [a, b]) is a:
            policy.on_complete(ctx, a, cached_tokens=1000)
    assert policy.trust[a.id] > 0.9


def test_forget_drops_a_backend() -> None:
    rng = random.Random(6)
    (a,) = pool(1)
    policy = PrefixAffinity(MB)
    text = words(rng, 1000)
    policy.index.insert(text, a.id)
    assert policy.forget(a.id) == 1000 // 64
    assert policy.index.match_prefix(text) == {}
    stats = policy.stats()
    assert stats["removed"] == 1000 // 64 and "feedback_confirmed" in stats


def test_more_than_64_backend_ids_over_time() -> None:
    rng = random.Random(7)
    policy = PrefixAffinity(MB)
    # Backends are replaced (reloads) without anybody calling forget: ids keep growing.
    for generation in range(40):
        backends = [Stub(generation * 2), Stub(generation * 2 + 1)]
        for _ in range(3):
            chosen = policy.select(Ctx(words(rng, 300)), backends)
            assert chosen in backends
    assert policy.index.stats()["backends"] <= 64
    # The current generation is still recorded.
    text = words(rng, 300)
    chosen = policy.select(Ctx(text), backends)
    assert chosen.id in policy.index.match_prefix(text)


def test_hotspot_tenant_spreads_by_load() -> None:
    # 80% of prompts share one tenant's long system prompt; with the pool counting in flight
    # (here: a fixed window of outstanding requests), no backend takes far more than its share.
    rng = random.Random(8)
    backends = pool(4)
    policy = PrefixAffinity(16 * MB)
    hot, cold = words(rng, 6000), [words(rng, 2000) for _ in range(8)]
    outstanding: collections.deque[Stub] = collections.deque()
    picks: collections.Counter[int] = collections.Counter()
    for i in range(2000):
        base = hot if rng.random() < 0.8 else cold[i % 8]
        chosen = policy.select(Ctx(base + words(rng, 200)), backends)
        chosen.in_flight += 1
        outstanding.append(chosen)
        picks[chosen.id] += 1
        if len(outstanding) > 12:
            outstanding.popleft().in_flight -= 1
    assert max(picks.values()) / (sum(picks.values()) / 4) <= 1.3, picks


def test_through_the_pool_with_real_backends() -> None:
    # The policy behind BackendPool, which counts in flight and passes cached_tokens back.
    from ntonix.config import BackendConfig, CircuitBreakerConfig
    from ntonix.upstream.backend import Backend
    from ntonix.upstream.pool import BackendPool

    breaker = CircuitBreakerConfig(failure_threshold=2, open_seconds=30)
    real = [Backend(BackendConfig(host="10.0.0.1", port=9000 + i, weight=1), breaker) for i in range(3)]
    policy = PrefixAffinity(MB)
    pool = BackendPool("m", real, policy)
    rng = random.Random(9)
    conversation = words(rng, 3000)
    first = pool.pick(Ctx(conversation))
    assert first is not None
    pool.release(Ctx(conversation), first, cached_tokens=0)
    conversation += words(rng, 400)
    ctx = Ctx(conversation)
    again = pool.pick(ctx)
    assert again is not None and again.backend is first.backend
    assert again.backend.in_flight == 1
    pool.release(ctx, again, cached_tokens=750)  # 3000 chars confirmed
    assert policy.feedback_confirmed == 1 and again.backend.in_flight == 0
