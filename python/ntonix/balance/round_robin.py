"""Smooth weighted round-robin (nginx's algorithm).

Each pick adds every candidate's weight to its running score, takes the highest
and subtracts the total, so a weight-2 backend gets twice the picks of a
weight-1 one, interleaved rather than in bursts.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ntonix.upstream.backend import Backend


class SmoothWeightedRoundRobin:
    """nginx's smooth weighted round-robin over the available backends."""

    def __init__(self, backends: Sequence[Backend]) -> None:
        self.backends: tuple[Backend, ...] = tuple(backends)

    def select(self, exclude: Collection[Backend] = ()) -> Backend | None:
        now = time.monotonic()
        best: Backend | None = None
        total = 0
        for backend in self.backends:
            if backend in exclude or not backend.available(now):
                continue
            backend.current_weight += backend.weight
            total += backend.weight
            if best is None or backend.current_weight > best.current_weight:
                best = backend
        if best is None:
            return None
        best.current_weight -= total
        best.breaker.on_selected(now)
        return best
