"""GCRA limits with a fake clock (exact counts, Retry-After, headers) and the stream usage tap."""

from __future__ import annotations

import hashlib

import pytest

from ntonix.auth.keys import Principal
from ntonix.errors import GatewayError
from ntonix.limits.limiter import Limiter
from ntonix.limits.stream import UsageTap


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def principal(rpm: int | None = None, tpm: int | None = None, name: str = "team-a") -> Principal:
    return Principal(hashlib.sha256(name.encode()).digest(), name, None, rpm, tpm)


def rejected(limiter: Limiter, who: Principal) -> GatewayError:
    with pytest.raises(GatewayError) as info:
        limiter.admit(who)
    assert info.value.status == 429
    assert info.value.code == "rate_limit_exceeded"
    return info.value


def header(err: GatewayError, name: str) -> str:
    return dict(err.headers)[name]


@pytest.mark.parametrize("rpm", [1, 3, 7, 60, 1000])
def test_exactly_rpm_requests_in_a_burst(rpm: int) -> None:
    clock = Clock()
    limiter, who = Limiter(clock=clock), principal(rpm=rpm)
    for i in range(rpm):
        limiter.admit(who)
        assert dict(limiter.headers(who))["x-ratelimit-remaining-requests"] == str(rpm - i - 1)
    err = rejected(limiter, who)
    assert header(err, "retry-after") == str(max(1, round(60 / rpm)))
    assert header(err, "x-ratelimit-remaining-requests") == "0"
    assert header(err, "x-ratelimit-limit-requests") == str(rpm)


def test_one_request_comes_back_every_period_over_rpm() -> None:
    clock = Clock()
    limiter, who = Limiter(clock=clock), principal(rpm=3)
    for _ in range(3):
        limiter.admit(who)
    clock.now += 19.9
    rejected(limiter, who)
    clock.now += 0.1  # 20 s = 60 / 3 after the burst: one request is back, one only
    limiter.admit(who)
    rejected(limiter, who)
    clock.now += 60
    for _ in range(3):
        limiter.admit(who)
    rejected(limiter, who)


def test_rejections_spend_nothing() -> None:
    clock = Clock()
    limiter, who = Limiter(clock=clock), principal(rpm=2)
    limiter.admit(who)
    limiter.admit(who)
    for _ in range(50):
        rejected(limiter, who)
    clock.now += 30  # one interval later exactly one request is back despite the 50 refusals
    limiter.admit(who)
    rejected(limiter, who)
    assert limiter.rejected == 51


def test_tokens_are_charged_after_the_answer_into_debt() -> None:
    clock = Clock()
    limiter, who = Limiter(clock=clock), principal(tpm=100)
    for used in (30, 30, 30):
        limiter.admit(who)
        limiter.charge(who, used)
    assert dict(limiter.headers(who))["x-ratelimit-remaining-tokens"] == "10"
    limiter.admit(who)  # 10 tokens left: admitted, and its answer runs the key into debt
    limiter.charge(who, 40)
    assert dict(limiter.headers(who))["x-ratelimit-remaining-tokens"] == "0"
    err = rejected(limiter, who)
    # 130 tokens used of 100/min: one token is back once 31 tokens have drained, 18.6 s
    assert header(err, "retry-after") == "19"
    clock.now += 18.5
    rejected(limiter, who)
    clock.now += 0.2
    limiter.admit(who)


def test_keys_are_limited_apart_and_unlimited_keys_get_no_headers() -> None:
    limiter = Limiter(clock=Clock())
    a, b, free = principal(rpm=1, name="a"), principal(rpm=1, name="b"), principal(name="free")
    limiter.admit(a)
    limiter.admit(b)
    rejected(limiter, a)
    for _ in range(100):
        limiter.admit(free)
    assert limiter.headers(free) == []
    assert [n for n, _ in limiter.headers(a)] == [
        "x-ratelimit-limit-requests",
        "x-ratelimit-remaining-requests",
    ]


def test_the_longer_wait_names_the_limit() -> None:
    clock = Clock()
    limiter, who = Limiter(clock=clock), principal(rpm=100, tpm=10)
    limiter.admit(who)
    limiter.charge(who, 15)  # 15 tokens at 10/min take 90 s to drain; one is back after 36 s
    err = rejected(limiter, who)
    assert "10 tokens" in err.message
    assert header(err, "retry-after") == "36"
    assert header(err, "x-ratelimit-remaining-requests") == "99"


# ---- the usage tap ---------------------------------------------------------------------------

ROLE = b'data: {"id":"c","choices":[{"index":0,"delta":{"role":"assistant"}}]}\n\n'
TOKEN = b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
USAGE = (
    b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":5,"total_tokens":8}}\n\n'
)
DONE = b"data: [DONE]\n\n"


def test_tap_passes_frames_without_usage_as_the_same_object() -> None:
    tap = UsageTap()
    assert tap.feed(ROLE) is ROLE
    assert tap.feed(TOKEN) is TOKEN
    assert tap.usage is None


@pytest.mark.parametrize(
    "frames",
    [
        [ROLE, TOKEN, USAGE, DONE],
        [ROLE, TOKEN + USAGE + DONE],
        [ROLE + TOKEN, USAGE[:30], USAGE[30:] + DONE],  # the usage event cut across frames
        [ROLE, TOKEN, USAGE[:-1], USAGE[-1:], DONE],
    ],
)
def test_tap_drops_only_the_usage_event(frames: list[bytes]) -> None:
    tap = UsageTap()
    out = b"".join(tap.feed(f) for f in frames) + tap.flush()
    assert out == ROLE + TOKEN + DONE
    assert tap.usage is not None
    assert (tap.usage.prompt, tap.usage.completion) == (3, 5)


def test_tap_keeps_a_content_chunk_that_also_carries_usage() -> None:
    both = b'data: {"choices":[{"index":0,"delta":{"content":"x"}}],"usage":{"prompt_tokens":1}}\n\n'
    tap = UsageTap()
    assert tap.feed(both) == both
    assert tap.usage is None
