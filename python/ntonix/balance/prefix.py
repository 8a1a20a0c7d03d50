"""`prefix`: send a prompt where its prefix already is in a backend's KV cache, unless load says otherwise.

The Rust `PrefixIndex` (chained block hashes, a global memory budget that is never exceeded, see
docs/adr/006-prefix-index.md) says how many leading characters of the prompt each backend was
last sent. Every candidate scores `trust * beyond / prompt_len - beta * excess_load`: `beyond`
is its match minus the part *every* candidate holds (one system prompt shared by all is no
reason to prefer anybody, so it cannot pull all traffic onto one backend), `excess_load` its
in-flight count per unit of weight minus the least loaded candidate's, so a backend loses new work
gradually as it gets busier instead of a hard switch between "affinity" and "balance" modes: with
`beta` 0.25, a prompt it holds entirely stays while it has fewer than 4 requests more in flight
than the idlest candidate, a prompt it holds a quarter of beyond the shared part, 1. (The load used
to be divided by the candidates' mean, which is bounded by the number of backends and huge at low
load: one request in flight on an otherwise idle pool of 4 weighed 4, so conversations left their
backend whenever it was answering anybody; `make bench-routing`, docs/benchmarks.md.) No
match beyond the shared part, or a tie, goes to the least loaded relative to weight. The pick is
recorded in the index at once (the backend holds the prompt once it has read it).

Feedback: an answer's `cached_tokens` says how much of the prompt the backend really had before
reading it. Less than the index believed means the backend evicted what the index still counts
on. Dropping this prompt's blocks would be wrong (the backend has just recomputed and cached the
whole prompt), so the belief about the *backend* is weakened instead: `trust` is a moving
average of confirmed / believed characters and scales its match in the score, so a backend whose
cache keeps disappointing attracts less, and recovers as confirmations come back. Once trust is
at its floor (the cache is far too small, or caching is off), each disappointing answer also
drops that prompt's blocks past the confirmed part (`PrefixIndex.weaken`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, TypeVar

from ntonix._core import PrefixIndex

if TYPE_CHECKING:
    from ntonix.balance.base import PickContext


class Candidate(Protocol):
    """What the policy reads of a backend (`ntonix.upstream.backend.Backend` has it)."""

    @property
    def id(self) -> int: ...
    @property
    def weight(self) -> int: ...
    @property
    def in_flight(self) -> int: ...


_B = TypeVar("_B", bound=Candidate)

# Weight of one answer in the trust average, and its floor (a backend never loses its match
# entirely: one good answer starts bringing it back).
_TRUST_ALPHA = 0.25
_MIN_TRUST = 0.05
# Picks remembered while their answers are outstanding.
_MAX_PENDING = 100_000


class PrefixAffinity:
    """KV-prefix-aware placement with a load term; one instance (and index) per model pool."""

    name = "prefix"

    def __init__(
        self,
        memory_bytes: int,
        *,
        block_chars: int = 64,
        beta: float = 0.25,
        chars_per_token: float = 4.0,
    ) -> None:
        self.index = PrefixIndex(memory_bytes, block_chars)
        self.block_chars = block_chars
        self.beta = beta
        self.chars_per_token = chars_per_token
        self._turn = 0
        # Per backend id: moving average of confirmed / believed prefix characters.
        self.trust: dict[int, float] = {}
        # id(ctx) -> (backend id, characters believed held) for picks awaiting their answer.
        self._believed: dict[int, tuple[int, int]] = {}
        # Feedback counters, for /metrics.
        self.feedback_confirmed = 0
        self.feedback_weakened = 0
        self.feedback_dropped_blocks = 0
        self.affinity_picks = 0
        # Last pick number each backend id was a candidate, to make room in the index (it tells
        # at most 64 backends apart) when ids come and go without `forget`.
        self._seen: dict[int, int] = {}
        self._picks = 0

    def select(self, ctx: PickContext, candidates: Sequence[_B]) -> _B:
        self._picks += 1
        for backend in candidates:
            self._seen[backend.id] = self._picks
        text = ctx.prompt_text()
        if len(text) < self.block_chars or len(candidates) == 1:
            chosen = candidates[0] if len(candidates) == 1 else self._least_loaded(candidates)
            self._record(text, chosen)
            return chosen
        matched = self.index.match_prefix(text)
        affine = self._best(text, candidates, matched) if matched else None
        if affine is None:
            chosen = self._least_loaded(candidates)
        else:
            chosen = affine
            self.affinity_picks += 1
        believed = matched.get(chosen.id, 0)
        if believed:
            if len(self._believed) >= _MAX_PENDING:
                self._believed.clear()  # answers that never came back (bounded, not a leak)
            self._believed[id(ctx)] = (chosen.id, believed)
        self._record(text, chosen)
        return chosen

    def _best(self, text: str, candidates: Sequence[_B], matched: dict[int, int]) -> _B | None:
        """The best-scoring candidate, or None when no candidate matches beyond the shared part."""
        depths = [matched.get(b.id, 0) for b in candidates]
        shared = min(depths)
        if max(depths) <= shared:
            return None
        loads = [b.in_flight / b.weight for b in candidates]
        floor = min(loads)
        scale = 1.0 / len(text)
        best: _B | None = None
        best_score = best_load = 0.0
        trust = self.trust
        for backend, depth, load in zip(candidates, depths, loads, strict=True):
            score = (depth - shared) * scale * trust.get(backend.id, 1.0) - self.beta * (load - floor)
            if best is None or score > best_score or (score == best_score and load < best_load):
                best, best_score, best_load = backend, score, load
        if best is not None and depths[candidates.index(best)] <= shared:
            # Load alone decided: spread like least_requests rather than favouring the first.
            return None
        return best

    def _least_loaded(self, candidates: Sequence[_B]) -> _B:
        """Fewest in flight per unit of weight; ties go round the candidates in turn (as `least_requests`)."""
        self._turn += 1
        count = len(candidates)
        best = candidates[self._turn % count]
        best_load = best.in_flight / best.weight
        for i in range(1, count):
            backend = candidates[(self._turn + i) % count]
            load = backend.in_flight / backend.weight
            if load < best_load:
                best, best_load = backend, load
        return best

    def _record(self, text: str, backend: Candidate) -> None:
        if len(text) < self.block_chars:
            return
        try:
            self.index.insert(text, backend.id)
        except ValueError:
            # More than 64 backend ids seen: forget the one longest out of the candidates.
            others = (bid for bid in self._seen if bid != backend.id)
            stale = min(others, key=self._seen.__getitem__, default=None)
            if stale is None:
                return
            self.forget(stale)
            try:
                self.index.insert(text, backend.id)
            except ValueError:
                return

    def on_complete(self, ctx: PickContext, backend: Candidate, cached_tokens: int | None) -> None:
        pending = self._believed.pop(id(ctx), None)
        if cached_tokens is None or pending is None or pending[0] != backend.id or pending[1] <= 0:
            return
        believed = pending[1]
        # Tokens are ~chars_per_token characters and backends count cache hits in their own
        # blocks: one of our blocks of slack, so a fully cached prefix counts as confirmed.
        cached = int(cached_tokens * self.chars_per_token) + self.block_chars
        ratio = min(1.0, cached / believed)
        old = self.trust.get(backend.id, 1.0)
        trust = self.trust[backend.id] = max(_MIN_TRUST, old + _TRUST_ALPHA * (ratio - old))
        if ratio >= 1.0:
            self.feedback_confirmed += 1
            return
        self.feedback_weakened += 1
        if trust <= _MIN_TRUST:
            # The backend keeps (almost) nothing it is sent: stop believing this prompt is there.
            self.feedback_dropped_blocks += self.index.weaken(ctx.prompt_text(), backend.id, cached)

    def forget(self, backend_id: int) -> int:
        """Drops what the index believes `backend_id` holds (removed, restarted or unhealthy)."""
        self._seen.pop(backend_id, None)
        return self.index.remove_backend(backend_id)

    def stats(self) -> dict[str, int]:
        """The index's counters plus the policy's feedback counters."""
        stats = self.index.stats()
        stats["affinity_picks"] = self.affinity_picks
        stats["feedback_confirmed"] = self.feedback_confirmed
        stats["feedback_weakened"] = self.feedback_weakened
        stats["feedback_dropped_blocks"] = self.feedback_dropped_blocks
        return stats
