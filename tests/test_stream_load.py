"""The pure logic of the `stream_load` bench phase (bench/stream_load.py): the capacity search, the
CPU-per-chunk arithmetic and the target verdicts. The load client's own arithmetic (gap delays,
percentiles, chunked decoding) is tested by `cargo test --manifest-path bench/streamload/Cargo.toml`.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parent.parent


def _load() -> ModuleType:
    # Loaded by path, not by adding bench/ to sys.path, where its other modules could shadow packages.
    spec = importlib.util.spec_from_file_location(
        "ntonix_bench_stream_load", REPO / "bench" / "stream_load.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


sl = _load()


def knee(at: int) -> tuple[list[int], Callable[[int], float | None]]:
    """A proxy whose p99 is 1 ms up to `at` streams and 50 ms beyond; records what was asked."""
    asked: list[int] = []

    def measure(n: int) -> float | None:
        asked.append(n)
        return 1.0 if n <= at else 50.0

    return asked, measure


def test_doubling_then_bisection_brackets_the_knee() -> None:
    asked, measure = knee(3000)
    found = sl.capacity_search(measure, 1000, 125, 8000, 10.0, max_trials=10)
    assert asked[:3] == [1000, 2000, 4000]
    assert found.capacity is not None and found.first_fail is not None
    assert found.capacity <= 3000 < found.first_fail
    assert found.first_fail <= found.capacity * 1.25
    assert not found.at_limit
    assert [t.passed for t in found.trials] == [t.streams <= 3000 for t in found.trials]


def test_a_failing_start_halves_and_failures_count_as_over_the_threshold() -> None:
    asked: list[int] = []

    def measure(n: int) -> float | None:
        asked.append(n)
        return None if n > 300 else 2.0  # None: the run had errors

    found = sl.capacity_search(measure, 1000, 125, 8000, 10.0, max_trials=3)
    assert asked == [1000, 500, 250]
    assert (found.capacity, found.first_fail) == (250, 500)
    assert len(found.trials) == 3  # the budget stops the bisection


def test_the_search_stops_at_its_bounds() -> None:
    _, measure = knee(10**6)
    top = sl.capacity_search(measure, 1000, 125, 8000, 10.0, max_trials=10)
    assert (top.capacity, top.first_fail, top.at_limit) == (8000, None, True)
    _, measure = knee(0)
    bottom = sl.capacity_search(measure, 1000, 125, 8000, 10.0, max_trials=10)
    assert (bottom.capacity, bottom.first_fail) == (None, 125)


def test_cpu_per_thousand_chunks_and_target_verdicts() -> None:
    assert sl.per_thousand(2.0, 40_000) == 0.05
    assert sl.per_thousand(None, 40_000) is None
    assert sl.per_thousand(1.0, 0) is None
    ntonix = {"cpu_s_per_1k_chunks": 0.4, "delay_p99_ms": 2.5, "probe_ttft_p99_ms": 1.5}
    nginx = {"cpu_s_per_1k_chunks": 0.1, "delay_p99_ms": 0.3, "probe_ttft_p99_ms": 0.6}
    direct = {"probe_ttft_p99_ms": 0.9}
    capacity = {"ntonix": {"capacity": 2000}, "nginx": {"capacity": 3000}}
    rows = {r["target"]: r for r in sl.judge(ntonix, nginx, direct, capacity)}
    assert rows["CPU per chunk vs nginx"]["value"] == 4.0
    assert rows["CPU per chunk vs nginx"]["met"] is False
    assert rows["added inter-chunk delay p99 ms"]["met"] is False
    assert abs(rows["TTFT added p99 ms (vs direct)"]["value"] - 0.6) < 1e-9
    assert rows["TTFT added p99 ms (vs direct)"]["met"] is True
    assert rows["capacity vs nginx"]["met"] is True
    missing = sl.judge({}, nginx, direct, {})
    assert all(r["met"] is None for r in missing)


def test_flatten_adds_probe_errors_to_stream_errors() -> None:
    summary = {
        "errors": 2,
        "probe_errors": 1,
        "delay_ms": {"p50": 0.01, "p99": 0.5, "p999": 1.0, "max": 3.0, "count": 10},
        "probe_ttft_ms": {"p50": 0.4, "p99": 0.9},
    }
    flat = sl.flatten(summary)
    assert flat["errors"] == 3
    assert (flat["delay_p99_ms"], flat["probe_ttft_p99_ms"]) == (0.5, 0.9)
