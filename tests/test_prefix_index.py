"""`ntonix._core.PrefixIndex` through its Python API: longest matches per backend at block
granularity, characters (not bytes) for non-ASCII prompts, the memory budget under random
traffic, eviction when full, remove_backend, weaken, stats, use from several threads, and
ValueErrors (never a crash) for bad arguments."""

from __future__ import annotations

import random
import string
import threading

import pytest

from ntonix._core import PrefixIndex

STATS_KEYS = {
    "entries",
    "blocks",
    "bytes_used",
    "bytes_reserved",
    "max_bytes",
    "capacity",
    "block_chars",
    "backends",
    "lookups",
    "matched_lookups",
    "matched_chars",
    "inserts",
    "evictions",
    "weakened",
    "removed",
}


def words(rng: random.Random, n: int) -> str:
    return "".join(rng.choices(string.ascii_lowercase + " ", k=n))


def test_longest_match_per_backend() -> None:
    index = PrefixIndex(1 << 20, block_chars=16)
    system = "You are helpful." * 4  # 64 chars = 4 blocks
    first = system + "user one asks about cats......."  # 95 chars: 5 full blocks
    index.insert(first, 1)
    index.insert(system, 2)
    assert index.match_prefix(first + " and dogs") == {1: 80, 2: 64}
    assert index.match_prefix(system + "x" * 40) == {1: 64, 2: 64}
    assert index.match_prefix("something else entirely, longer than a block") == {}
    assert index.match_prefix("short") == {}
    assert len(index) == 5 + 4


def test_characters_not_bytes() -> None:
    index = PrefixIndex(1 << 20, block_chars=8)
    text = "ééééé" * 4 + "abc"  # 20 two-byte chars + 3: 43 bytes, 5 full blocks = 20 chars
    index.insert(text, 0)
    assert index.match_prefix(text) == {0: 20}
    assert index.weaken(text, 0, 8) == 3  # 8 chars = 16 bytes = 2 blocks kept
    assert index.match_prefix(text) == {0: 8}


def test_stats_count_lookups_and_matches() -> None:
    index = PrefixIndex(1 << 20, block_chars=4)
    index.insert("abcdefgh", 3)
    index.match_prefix("abcdefgh")
    index.match_prefix("abcdXXXX")
    index.match_prefix("zzzz")
    s = index.stats()
    assert set(s) == STATS_KEYS
    assert (s["lookups"], s["matched_lookups"], s["matched_chars"]) == (3, 2, 12)
    assert (s["entries"], s["blocks"], s["inserts"], s["block_chars"]) == (2, 2, 1, 4)
    assert s["max_bytes"] == 1 << 20
    assert s["bytes_used"] <= s["bytes_reserved"] <= s["max_bytes"]


def test_budget_never_exceeded_and_old_prompts_evicted() -> None:
    budget = 64 * 1024
    index = PrefixIndex(budget, block_chars=32)
    rng = random.Random(5)
    systems = [words(rng, 600) for _ in range(4)]
    for i in range(400):
        prompt = systems[i % 4] + words(rng, rng.randrange(0, 3000))
        index.insert(prompt, rng.randrange(8))
        s = index.stats()
        assert s["bytes_reserved"] <= budget
        assert s["bytes_used"] <= s["bytes_reserved"]
        assert s["blocks"] <= s["capacity"]
    s = index.stats()
    assert s["evictions"] > 0
    # The newest prompt survived eviction; its system prompt too.
    index.insert("n" * 320, 99)
    assert index.match_prefix("n" * 320) == {99: 320}


def test_remove_backend() -> None:
    index = PrefixIndex(1 << 20, block_chars=8)
    index.insert("a" * 32, 1)
    index.insert("a" * 32, 2)
    index.insert("b" * 16, 2)
    assert index.remove_backend(2) == 6
    assert index.remove_backend(2) == 0
    assert index.match_prefix("a" * 32) == {1: 32}
    assert index.match_prefix("b" * 16) == {}
    assert index.stats()["removed"] == 6


def test_weaken_and_clear() -> None:
    index = PrefixIndex(1 << 20, block_chars=8)
    text = "0123456789" * 4  # 40 chars, 5 blocks
    index.insert(text, 7)
    assert index.weaken(text, 7, 17) == 3
    assert index.match_prefix(text) == {7: 16}
    assert index.weaken(text, 7, -5) == 2  # negative counts as nothing cached
    assert index.match_prefix(text) == {}
    index.insert(text, 7)
    index.clear()
    assert len(index) == 0
    assert index.match_prefix(text) == {}


def test_long_prompts_from_threads() -> None:
    # Long prompts take the detached path; several threads must see a consistent index.
    index = PrefixIndex(8 << 20)
    base = "s" * 8192
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(50):
                prompt = base + f"{n}:{i}:" * 200
                index.insert(prompt, n)
                got = index.match_prefix(prompt)
                assert got[n] == len(prompt) // 64 * 64
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    assert set(index.match_prefix(base)) == {0, 1, 2, 3}


@pytest.mark.parametrize(
    ("max_bytes", "block_chars", "message"),
    [
        (100, 64, "max_bytes must be at least"),
        (-1, 64, "max_bytes must be >= 0"),
        (1 << 20, 0, "block_chars must be between 1"),
        (1 << 20, -3, "block_chars must be >= 1"),
    ],
)
def test_bad_construction_is_a_value_error(max_bytes: int, block_chars: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PrefixIndex(max_bytes, block_chars)


def test_bad_backend_is_a_value_error() -> None:
    index = PrefixIndex(1 << 20)
    for bad in (-1, 2**32 - 1, 2**40):
        with pytest.raises((ValueError, OverflowError)):
            index.insert("x" * 64, bad)
    with pytest.raises(ValueError, match="backend id"):
        index.remove_backend(-1)
