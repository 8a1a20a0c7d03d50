"""The `stream_load` phase's driver: runs `streamload load`, samples the proxy, searches capacity.

`bench/streamload` (Rust) is the paced SSE mock (`serve`) and the load client (`load`); this module
starts the client pinned to the load core, takes the proxy's CPU ticks when the client reports that
the steady window opens and closes (`STEADY_START` / `STEADY_END` on its stderr), samples the
proxy's RSS inside the window, and merges both into the client's JSON summary. `capacity_search`
is the bounded doubling-then-bisection search for the stream count at which the added p99
inter-chunk delay crosses a threshold. Pure logic is tested in tests/test_stream_load.py.
"""

from __future__ import annotations

import contextlib
import json
import math
import queue
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Trial:
    streams: int
    p99_ms: float | None  # None: the run failed (errors, no steady window)
    passed: bool


@dataclass
class Capacity:
    """Largest stream count that passed and smallest that failed (None: not reached)."""

    capacity: int | None
    first_fail: int | None
    at_limit: bool
    trials: list[Trial] = field(default_factory=list)


def capacity_search(
    measure: Callable[[int], float | None],
    start: int,
    low: int,
    high: int,
    threshold_ms: float,
    max_trials: int,
    resolution: float = 1.25,
) -> Capacity:
    """Stream count at which ``measure(n)`` (added p99 delay, ms; None = failed) crosses ``threshold_ms``.

    Doubles from ``start`` while it passes (up to ``high``), halves while it fails (down to ``low``),
    then bisects between the last pass and the first fail until they are within ``resolution`` of
    each other or ``max_trials`` runs were spent. The delay is assumed to grow with the count.
    """
    trials: list[Trial] = []

    def run(n: int) -> bool:
        value = measure(n)
        ok = value is not None and not math.isnan(value) and value <= threshold_ms
        trials.append(Trial(n, value, ok))
        return ok

    good: int | None = None
    bad: int | None = None
    n = max(low, min(high, start))
    if run(n):
        good = n
        while good < high and len(trials) < max_trials:
            n = min(high, good * 2)
            if run(n):
                good = n
            else:
                bad = n
                break
    else:
        bad = n
        while bad > low and len(trials) < max_trials:
            n = max(low, bad // 2)
            if run(n):
                good = n
                break
            bad = n
    while good is not None and bad is not None and bad > good * resolution and len(trials) < max_trials:
        n = round(math.sqrt(good * bad))
        if n in (good, bad):
            break
        if run(n):
            good = n
        else:
            bad = n
    return Capacity(good, bad, at_limit=good == high, trials=trials)


def per_thousand(cpu_s: float | None, events: int | None) -> float | None:
    """CPU seconds per 1,000 chunks (None when nothing was measured)."""
    if cpu_s is None or not events:
        return None
    return cpu_s / (events / 1000.0)


@dataclass(frozen=True)
class Targets:
    """Issue 16's streaming targets."""

    cpu_vs_nginx: float = 3.0
    delay_p99_ms: float = 2.0
    ttft_added_p99_ms: float = 1.0
    capacity_vs_nginx: float = 0.5


def judge(
    ntonix: dict[str, Any], nginx: dict[str, Any], direct: dict[str, Any], capacity: dict[str, Any]
) -> list[dict[str, Any]]:
    """One row per target: the measured value, the target, whether it is met (None: not measured)."""
    t = Targets()

    def ratio(a: Any, b: Any) -> float | None:
        if not isinstance(a, int | float) or not isinstance(b, int | float) or b == 0:
            return None
        return float(a) / float(b)

    def diff(a: Any, b: Any) -> float | None:
        if not isinstance(a, int | float) or not isinstance(b, int | float):
            return None
        return float(a) - float(b)

    cap_n = (capacity.get("ntonix") or {}).get("capacity")
    cap_g = (capacity.get("nginx") or {}).get("capacity")
    rows = [
        (
            "CPU per chunk vs nginx",
            ratio(ntonix.get("cpu_s_per_1k_chunks"), nginx.get("cpu_s_per_1k_chunks")),
            "<=",
            t.cpu_vs_nginx,
        ),
        ("added inter-chunk delay p99 ms", ntonix.get("delay_p99_ms"), "<=", t.delay_p99_ms),
        (
            "TTFT added p99 ms (vs direct)",
            diff(ntonix.get("probe_ttft_p99_ms"), direct.get("probe_ttft_p99_ms")),
            "<=",
            t.ttft_added_p99_ms,
        ),
        ("capacity vs nginx", ratio(cap_n, cap_g), ">=", t.capacity_vs_nginx),
    ]
    out = []
    for name, value, op, target in rows:
        met = None if value is None else (value <= target if op == "<=" else value >= target)
        out.append({"target": name, "value": value, "op": op, "limit": target, "met": met})
    return out


def flatten(summary: dict[str, Any]) -> dict[str, Any]:
    """The figures the report shows, from a `streamload load` summary plus the harness's samples."""
    delay = summary.get("delay_ms") or {}
    probe = summary.get("probe_ttft_ms") or {}
    late = summary.get("mock_late_ms") or {}
    return {
        "delay_p50_ms": delay.get("p50"),
        "delay_p99_ms": delay.get("p99"),
        "delay_p999_ms": delay.get("p999"),
        "delay_max_ms": delay.get("max"),
        "gaps": delay.get("count"),
        "probe_ttft_p50_ms": probe.get("p50"),
        "probe_ttft_p99_ms": probe.get("p99"),
        "stream_ttft_p50_ms": (summary.get("ttft_ms") or {}).get("p50"),
        "mock_late_p99_ms": late.get("p99"),
        "errors": int(summary.get("errors", 0)) + int(summary.get("probe_errors", 0)),
        "completed": summary.get("completed"),
        "window_s": summary.get("window_s"),
        "window_events": summary.get("window_events"),
        "send_times": summary.get("send_times"),
    }


def run_load(
    cmd: list[str],
    proxy_ticks: Callable[[], int] | None,
    mock_ticks: Callable[[], int],
    rss_kb: Callable[[], int] | None,
    clk_tck: int,
    timeout_s: float,
    log: Callable[[str], None],
    stdout_path: Path,
) -> dict[str, Any]:
    """Run the load client; return its summary plus CPU seconds and RSS of the proxy over the window."""
    events: queue.Queue[tuple[str, float]] = queue.Queue()
    with stdout_path.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        assert proc.stderr is not None
        stderr = proc.stderr

        def reader() -> None:
            for raw in stderr:
                events.put((raw.decode(errors="replace").rstrip(), time.monotonic()))

        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        marks: dict[str, tuple[float, int | None, int]] = {}
        rss: list[int] = []
        other: list[str] = []
        stop_at = time.monotonic() + timeout_s
        next_rss = 0.0
        try:
            while time.monotonic() < stop_at:
                try:
                    line, _at = events.get(timeout=0.25)
                except queue.Empty:
                    line = ""
                word = line.split(" ", 1)[0]
                if word in ("STEADY_START", "STEADY_END") and word not in marks:
                    marks[word] = (time.monotonic(), proxy_ticks() if proxy_ticks else None, mock_ticks())
                elif line:
                    other.append(line)
                in_window = "STEADY_START" in marks and "STEADY_END" not in marks
                if rss_kb is not None and in_window and time.monotonic() >= next_rss:
                    rss.append(rss_kb())
                    next_rss = time.monotonic() + 1.0
                if proc.poll() is not None and events.empty() and not thread.is_alive():
                    break
            else:
                log(f"load client still running after {timeout_s:.0f} s: killed")
        finally:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
    text = stdout_path.read_text(errors="replace").strip()
    try:
        summary: dict[str, Any] = json.loads(text.splitlines()[-1]) if text else {}
    except json.JSONDecodeError:
        summary = {}
    if not summary:
        summary = {
            "errors": 1,
            "error_samples": [f"load client exit {proc.returncode}: {' | '.join(other[-3:])}"],
        }
    window = None
    if "STEADY_START" in marks and "STEADY_END" in marks:
        (t0, p0, m0), (t1, p1, m1) = marks["STEADY_START"], marks["STEADY_END"]
        window = t1 - t0
        if p0 is not None and p1 is not None:
            summary["proxy_cpu_s"] = (p1 - p0) / clk_tck
        summary["mock_cpu_s"] = (m1 - m0) / clk_tck
        summary["harness_window_s"] = window
    events_n = summary.get("window_events")
    summary["cpu_s_per_1k_chunks"] = per_thousand(summary.get("proxy_cpu_s"), events_n)
    summary["mock_cpu_s_per_1k_chunks"] = per_thousand(summary.get("mock_cpu_s"), events_n)
    summary["rss_kb"] = int(statistics.median(rss)) if rss else None
    wall = summary.get("wall_s") or 0.0
    summary["client_cpu_pct"] = 100.0 * float(summary.get("client_cpu_s", 0.0)) / wall if wall else None
    return summary
