"""`session`: requests of one session stick to one backend while it is healthy.

The session is the `routing.session_header` value (default `x-session-id`), else
the body's `user`. Placement is weighted rendezvous hashing (highest random
weight): every backend scores `-weight / ln(h)` for a hash `h` in (0, 1) of
(session, backend), the best available one wins. Adding or removing a backend
moves only the sessions that now score best on it (about 1/n of them), a backend
that goes down sends its sessions to their second choice, and they come back when
it recovers. Requests without a session fall back to `least_requests`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import xxhash

from ntonix.balance.least_requests import LeastRequests

if TYPE_CHECKING:
    from ntonix.balance.base import PickContext
    from ntonix.upstream.backend import Backend

_SCALE = float(1 << 64)


def rendezvous_score(session: str, backend: Backend) -> float:
    h = (xxhash.xxh3_64_intdigest(f"{session}\0{backend.key}".encode()) + 0.5) / _SCALE
    return -backend.weight / math.log(h)


class SessionAffinity:
    name = "session"

    def __init__(self) -> None:
        self.fallback = LeastRequests()

    def select(self, ctx: PickContext, candidates: Sequence[Backend]) -> Backend:
        session = ctx.session_key
        if not session:
            return self.fallback.select(ctx, candidates)
        return max(candidates, key=lambda b: rendezvous_score(session, b))

    def on_complete(self, ctx: PickContext, backend: Backend, cached_tokens: int | None) -> None:
        return None
