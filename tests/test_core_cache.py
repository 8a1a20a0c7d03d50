"""`ntonix._core.ResponseCache` through its Python API: exact round trips, counters, the byte cap
under random sizes, TTL expiry, remove/clear, refusal of oversize entries, scan resistance, use
from several threads, and clean exceptions (never a crash) for bad arguments."""

from __future__ import annotations

import random
import threading
import time

import pytest

from ntonix._core import ResponseCache

CT = "application/json"
HOUR = 3600.0
STATS_KEYS = {"hits", "misses", "evictions", "expired", "entries", "size_bytes", "max_size_bytes"}
# Upper bound of what the cache charges per entry beyond body and content type (key + overhead).
PER_ENTRY_MAX = 1024


def wait_until_gone(cache: ResponseCache, key: int, deadline_s: float = 5.0) -> float:
    """Polls until `key` misses; returns the seconds it took. Fails at the deadline."""
    start = time.monotonic()
    while cache.get(key) is not None:
        if time.monotonic() - start > deadline_s:
            pytest.fail(f"key {key} still cached after {deadline_s} s")
        time.sleep(0.01)
    return time.monotonic() - start


def test_round_trip_is_exact() -> None:
    cache = ResponseCache(1 << 20, HOUR)
    body = bytes(range(256)) * 4 + b"\x00end"
    key = 2**128 - 1  # the largest xxh3_128 digest
    assert cache.put(key, body, "text/event-stream; charset=utf-8")
    hit = cache.get(key)
    assert hit is not None
    got_body, got_type = hit
    assert type(got_body) is bytes
    assert got_body == body
    assert got_type == "text/event-stream; charset=utf-8"
    assert cache.put(0, b"", "application/json; charset=\u00e9")
    assert cache.get(0) == (b"", "application/json; charset=\u00e9")
    assert cache.get(12345) is None
    assert len(cache) == 2


def test_stats_keys_and_counters_move() -> None:
    cache = ResponseCache(1 << 20, HOUR, shards=4)
    stats = cache.stats()
    assert set(stats) == STATS_KEYS
    assert all(type(v) is int for v in stats.values())
    assert stats == dict.fromkeys(STATS_KEYS, 0) | {"max_size_bytes": 1 << 20}

    assert cache.get(1) is None
    assert cache.put(1, b"x" * 100, CT)
    assert cache.get(1) is not None
    assert cache.get(1) is not None
    stats = cache.stats()
    assert (stats["hits"], stats["misses"], stats["entries"]) == (2, 1, 1)
    assert 100 + len(CT) < stats["size_bytes"] <= 100 + len(CT) + PER_ENTRY_MAX

    # Replacing a key charges its new size once.
    assert cache.put(1, b"x" * 1000, CT)
    replaced = cache.stats()
    assert replaced["entries"] == 1
    assert replaced["size_bytes"] == stats["size_bytes"] + 900


def test_cap_never_exceeded_with_random_sizes() -> None:
    max_bytes = 64 * 1024
    cache = ResponseCache(max_bytes, HOUR)
    rng = random.Random(1234)
    for _ in range(5_000):
        key = rng.randrange(2**128)
        # Mostly small answers, now and then one taking up to half the cache: all fit, so all
        # must be admitted.
        size = rng.randrange(max_bytes // 2) if rng.random() < 0.02 else rng.randrange(2_000)
        assert cache.put(key, bytes(size), CT)
        stats = cache.stats()
        assert stats["size_bytes"] <= max_bytes
        assert stats["entries"] == len(cache)
    assert cache.stats()["evictions"] > 0


def test_entry_as_large_as_the_cache_is_admitted() -> None:
    max_bytes = 100_000
    cache = ResponseCache(max_bytes, HOUR, shards=16)
    for key in range(50):
        assert cache.put(key, bytes(1_000), CT)
    big = bytes(max_bytes - PER_ENTRY_MAX - len(CT))
    assert cache.put(10_000, big, CT), "an entry that fits must never be refused"
    assert cache.get(10_000) == (big, CT)
    assert cache.stats()["size_bytes"] <= max_bytes


def test_oversize_entry_is_refused() -> None:
    cache = ResponseCache(10_000, HOUR)
    assert cache.put(1, b"small", CT)
    before = cache.stats()
    assert cache.put(2, bytes(10_000), CT) is False
    assert cache.get(2) is None
    after = cache.stats()
    assert (after["entries"], after["size_bytes"], after["evictions"]) == (
        before["entries"],
        before["size_bytes"],
        0,
    )
    # A refused put for a present key leaves no older answer behind.
    assert cache.put(1, bytes(10_000), CT) is False
    assert cache.get(1) is None


def test_zero_capacity_stores_nothing() -> None:
    cache = ResponseCache(0, HOUR)
    assert cache.put(1, b"", CT) is False
    assert cache.get(1) is None
    assert cache.stats()["size_bytes"] == 0
    assert len(cache) == 0


def test_entries_expire_after_default_ttl() -> None:
    cache = ResponseCache(1 << 20, 0.2)
    assert cache.put(7, b"soon gone", CT)
    assert cache.get(7) == (b"soon gone", CT)
    waited = wait_until_gone(cache, 7)
    assert waited > 0.0
    stats = cache.stats()
    assert stats["expired"] == 1
    assert (stats["entries"], stats["size_bytes"]) == (0, 0)


def test_per_entry_ttl_overrides_the_default() -> None:
    cache = ResponseCache(1 << 20, HOUR)
    assert cache.put(1, b"short", CT, ttl_seconds=0.1)
    assert cache.put(2, b"long", CT)
    assert cache.put(3, b"also long", CT, None)
    wait_until_gone(cache, 1)
    assert cache.get(2) == (b"long", CT)
    assert cache.get(3) == (b"also long", CT)
    assert cache.put(4, b"forever", CT, ttl_seconds=float("inf"))
    assert cache.get(4) == (b"forever", CT)


def test_remove_and_clear() -> None:
    cache = ResponseCache(1 << 20, HOUR)
    for key in range(20):
        assert cache.put(key, b"v%d" % key, CT)
    assert cache.remove(3) is True
    assert cache.remove(3) is False
    assert cache.remove(999) is False
    assert cache.get(3) is None
    assert len(cache) == 19
    hits_before = cache.stats()["hits"]
    cache.clear()
    assert len(cache) == 0
    stats = cache.stats()
    assert (stats["entries"], stats["size_bytes"]) == (0, 0)
    assert stats["hits"] == hits_before, "clear keeps the history counters"
    assert cache.get(4) is None
    assert cache.put(4, b"again", CT)
    assert cache.get(4) == (b"again", CT)


def test_one_off_requests_do_not_flush_a_popular_answer() -> None:
    # Room for about ten entries; one shard so the policy is observed directly.
    cache = ResponseCache(10 * (600 + PER_ENTRY_MAX), HOUR, shards=1)
    assert cache.put(0, bytes(600), CT)
    assert cache.get(0) is not None
    for key in range(1, 200):
        assert cache.put(key, bytes(600), CT)
    assert cache.get(0) is not None, "a read answer outlives a scan of one-off prompts"
    assert cache.stats()["evictions"] > 150


def test_threads_share_one_cache() -> None:
    max_bytes = 256 * 1024
    cache = ResponseCache(max_bytes, HOUR, shards=8)
    gets = [0] * 4
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            rng = random.Random(t)
            for _ in range(3_000):
                key = rng.randrange(300)
                if rng.random() < 0.6:
                    gets[t] += 1
                    hit = cache.get(key)
                    if hit is not None:
                        assert hit[0] == bytes([key % 256]) * len(hit[0])
                else:
                    assert cache.put(key, bytes([key % 256]) * rng.randrange(4_000), CT)
                assert cache.stats()["size_bytes"] <= max_bytes
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    stats = cache.stats()
    assert stats["hits"] + stats["misses"] == sum(gets)
    assert stats["entries"] == len(cache)


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ((-1, HOUR), ValueError),
        ((1 << 20, 0.0), ValueError),
        ((1 << 20, -5.0), ValueError),
        ((1 << 20, float("nan")), ValueError),
        ((1 << 20, HOUR, 0), ValueError),
        ((1 << 20, HOUR, -3), ValueError),
        ((1 << 20, HOUR, 1_000_000), ValueError),
        ((2**70, HOUR), OverflowError),
        ((1.5, HOUR), TypeError),
        (("1024", HOUR), TypeError),
        ((1 << 20, "3600"), TypeError),
    ],
)
def test_bad_constructor_arguments(args: tuple[object, ...], error: type[Exception]) -> None:
    with pytest.raises(error):
        ResponseCache(*args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("key", "error"),
    [(-1, OverflowError), (2**128, OverflowError), ("1", TypeError), (1.0, TypeError), (None, TypeError)],
)
def test_bad_keys(key: object, error: type[Exception]) -> None:
    cache = ResponseCache(1 << 20, HOUR)
    with pytest.raises(error):
        cache.get(key)  # type: ignore[arg-type]
    with pytest.raises(error):
        cache.put(key, b"x", CT)  # type: ignore[arg-type]
    with pytest.raises(error):
        cache.remove(key)  # type: ignore[arg-type]
    assert len(cache) == 0


def test_bad_put_arguments() -> None:
    cache = ResponseCache(1 << 20, HOUR)
    with pytest.raises(TypeError):
        cache.put(1, "not bytes", CT)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        cache.put(1, b"x", b"application/json")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        cache.put(1, b"x", CT, ttl_seconds=0)
    with pytest.raises(ValueError):
        cache.put(1, b"x", CT, ttl_seconds=-1.0)
    with pytest.raises(TypeError):
        cache.put(1, b"x", CT, ttl_seconds="1")  # type: ignore[arg-type]
    assert len(cache) == 0
    assert cache.stats()["size_bytes"] == 0
