"""The interface every load-balancing policy implements."""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ntonix.upstream.backend import Backend


class SelectionPolicy(Protocol):
    """Picks the backend for the next attempt, never one in `exclude`."""

    def select(self, exclude: Collection[Backend] = ()) -> Backend | None: ...
