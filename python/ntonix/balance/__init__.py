"""Load-balancing policies, one small class per file behind `SelectionPolicy`; `make_policy` builds one."""

from __future__ import annotations

from ntonix.balance.base import PickContext, SelectionPolicy
from ntonix.balance.least_requests import LeastRequests
from ntonix.balance.power_of_two import PowerOfTwo
from ntonix.balance.round_robin import SmoothWeightedRoundRobin
from ntonix.balance.session import SessionAffinity
from ntonix.config import RoutingConfig

__all__ = [
    "LeastRequests",
    "PickContext",
    "PowerOfTwo",
    "SelectionPolicy",
    "SessionAffinity",
    "SmoothWeightedRoundRobin",
    "make_policy",
]


def make_policy(config: RoutingConfig) -> SelectionPolicy:
    """A fresh policy instance (one per model pool) for `routing.policy`."""
    if config.policy == "round_robin":
        return SmoothWeightedRoundRobin()
    if config.policy == "least_requests":
        return LeastRequests()
    if config.policy == "power_of_two":
        return PowerOfTwo()
    if config.policy == "session":
        return SessionAffinity()
    raise ValueError(f"routing.policy {config.policy!r} is not available in this build")
