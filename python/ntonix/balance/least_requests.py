"""`least_requests`: the candidate with the fewest requests in flight relative to its weight.

A stream counts until it ends (the pool releases it then), so a backend stuck on
long generations stops getting new work. Ties go round the candidates in turn
rather than always to the first, so an idle pool still spreads its requests.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ntonix.balance.base import PickContext
    from ntonix.upstream.backend import Backend


class LeastRequests:
    name = "least_requests"

    def __init__(self) -> None:
        self.turn = 0

    def select(self, ctx: PickContext, candidates: Sequence[Backend]) -> Backend:
        self.turn += 1
        count = len(candidates)
        best = candidates[self.turn % count]
        best_load = best.in_flight / best.weight
        for i in range(count):
            backend = candidates[(self.turn + i) % count]
            load = backend.in_flight / backend.weight
            if load < best_load:
                best, best_load = backend, load
        return best

    def on_complete(self, ctx: PickContext, backend: Backend, cached_tokens: int | None) -> None:
        return None
