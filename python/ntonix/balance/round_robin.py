"""Smooth weighted round-robin (nginx's algorithm), the default policy.

Each pick adds every candidate's weight to its running score, takes the highest
and subtracts the total, so a weight-2 backend gets twice the picks of a
weight-1 one, interleaved rather than in bursts. The running scores are this
policy's own state (one instance per model pool), keyed by backend id.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ntonix.balance.base import PickContext
    from ntonix.upstream.backend import Backend


class SmoothWeightedRoundRobin:
    """nginx's smooth weighted round-robin over the candidates."""

    name = "round_robin"

    def __init__(self) -> None:
        self.current: dict[int, int] = {}

    def select(self, ctx: PickContext, candidates: Sequence[Backend]) -> Backend:
        current = self.current
        best = candidates[0]
        best_score = None
        total = 0
        for backend in candidates:
            score = current.get(backend.id, 0) + backend.weight
            current[backend.id] = score
            total += backend.weight
            if best_score is None or score > best_score:
                best, best_score = backend, score
        current[best.id] -= total
        return best

    def on_complete(self, ctx: PickContext, backend: Backend, cached_tokens: int | None) -> None:
        return None
