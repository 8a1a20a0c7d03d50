"""Load-balancing policies, one small class per file behind `SelectionPolicy`; `make_policy` builds one."""

from __future__ import annotations

from ntonix.balance.base import PickContext, SelectionPolicy
from ntonix.balance.round_robin import SmoothWeightedRoundRobin
from ntonix.config import RoutingConfig

__all__ = ["PickContext", "SelectionPolicy", "SmoothWeightedRoundRobin", "make_policy"]


def make_policy(config: RoutingConfig) -> SelectionPolicy:
    """A fresh policy instance (one per model pool) for `routing.policy`."""
    if config.policy == "round_robin":
        return SmoothWeightedRoundRobin()
    raise ValueError(f"routing.policy {config.policy!r} is not available in this build")
