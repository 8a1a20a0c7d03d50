"""A fixed-bucket histogram of millisecond values (a leaf: imports nothing of the gateway)."""

from __future__ import annotations

import bisect

# Bucket bounds in milliseconds, from sub-millisecond proxying to minute-long generations.
BUCKETS_MS: tuple[float, ...] = (
    0.5,
    1,
    2.5,
    5,
    10,
    25,
    50,
    100,
    250,
    500,
    1000,
    2500,
    5000,
    10000,
    30000,
    60000,
    120000,
)


class Histogram:
    """Cumulative-on-render histogram of millisecond values."""

    __slots__ = ("count", "counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS_MS) + 1)
        self.count = 0
        self.total = 0.0

    def observe(self, value_ms: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS_MS, value_ms)] += 1
        self.count += 1
        self.total += value_ms


def percentiles(hist: Histogram, points: tuple[float, ...] = (0.5, 0.9, 0.99)) -> dict[str, float | None]:
    """Approximate percentiles (upper bound of the bucket they fall in; None with no samples)."""
    out: dict[str, float | None] = {}
    for point in points:
        name = f"p{round(point * 100)}"
        if not hist.count:
            out[name] = None
            continue
        rank = point * hist.count
        running = 0
        value = float(BUCKETS_MS[-1])
        for bound, count in zip(BUCKETS_MS, hist.counts, strict=False):
            running += count
            if running >= rank:
                value = float(bound)
                break
        out[name] = value
    return out
