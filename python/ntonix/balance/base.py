"""The interface every load-balancing policy implements.

A policy sees only the candidates the pool already filtered (healthy, circuit
allowing, not tried yet by this request) and answers one of them; it never
counts in-flight requests itself (the pool does, in one place) and keeps its
own state keyed by `Backend.id`. `on_complete` is its feedback when a request
it placed has ended (with the backend's reported cached prompt tokens when the
answer carried them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ntonix.upstream.backend import Backend


class PickContext(Protocol):
    """What a policy may ask of the request being placed."""

    @property
    def session_key(self) -> str | None: ...

    def prompt_text(self) -> str: ...


class SelectionPolicy(Protocol):
    """Picks the backend for the next attempt among `candidates` (never empty)."""

    name: str

    def select(self, ctx: PickContext, candidates: Sequence[Backend]) -> Backend: ...

    def on_complete(self, ctx: PickContext, backend: Backend, cached_tokens: int | None) -> None: ...
