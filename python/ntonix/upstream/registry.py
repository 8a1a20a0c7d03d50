"""`ModelRegistry`: which backends serve which model, aliases, and one `BackendPool` per model.

A backend lists its models in the configuration (`backends[].models`) or the
health checker learns them from its `GET /v1/models`; until they are known (or
when that list cannot be read) it is eligible for any model. A request naming
an alias is routed as its target. Pools are built on first use and rebuilt
only when the model map changes (reload, discovery), each with a fresh policy
instance, so every model has its own balancing state while a backend serving
several models stays one backend.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from ntonix.balance.base import SelectionPolicy
from ntonix.errors import GatewayError
from ntonix.upstream.backend import Backend
from ntonix.upstream.pool import BackendPool

log = logging.getLogger("ntonix.models")

PolicyFactory = Callable[[], SelectionPolicy]


class ModelRegistry:
    """Model id -> pool of backends, built from one immutable backend list and alias map."""

    def __init__(
        self, backends: Sequence[Backend], aliases: dict[str, str], policy_factory: PolicyFactory
    ) -> None:
        self.backends: tuple[Backend, ...] = tuple(backends)
        self.aliases = dict(aliases)
        self.policy_factory = policy_factory
        self.pools: dict[str | None, BackendPool] = {}
        self.known = self._known()

    def invalidate(self) -> None:
        """The model map changed (discovery): pools are rebuilt on next use."""
        self.pools = {}
        self.known = self._known()

    def _known(self) -> frozenset[str]:
        return frozenset(self.model_ids())

    def resolve(self, model: str | None) -> tuple[str | None, BackendPool]:
        """The target model id and its pool; 404 `model_not_found` when no backend serves it."""
        target = self.aliases.get(model, model) if model is not None else None
        pool = self.pools.get(target)
        if pool is None:
            members = self.backends if target is None else [b for b in self.backends if b.serves(target)]
            if not members:
                raise GatewayError(
                    404,
                    "model_not_found",
                    f"The model '{model}' does not exist or no backend serves it; "
                    "GET /v1/models lists the models available",
                    param="model",
                )
            pool = self.pools[target] = BackendPool(target, members, self.policy_factory())
        return target, pool

    def model_ids(self) -> list[str]:
        """Every model at least one backend serves, then every alias; each id once, in a stable order."""
        seen: dict[str, None] = {}
        for backend in self.backends:
            for model in sorted(backend.models or ()):
                seen.setdefault(model, None)
        for alias in self.aliases:
            seen.setdefault(alias, None)
        return list(seen)

    def knows(self, model: str) -> bool:
        """Whether `model` is a listed id (bounds the label values of per-model metrics)."""
        return model in self.known
