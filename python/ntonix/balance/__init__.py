"""Load-balancing policies, one small class per file behind `SelectionPolicy`; `make_policy` builds one."""

from __future__ import annotations

from ntonix.balance.base import PickContext, SelectionPolicy
from ntonix.balance.least_requests import LeastRequests
from ntonix.balance.power_of_two import PowerOfTwo
from ntonix.balance.prefix import PrefixAffinity
from ntonix.balance.round_robin import SmoothWeightedRoundRobin
from ntonix.balance.session import SessionAffinity
from ntonix.config import RoutingConfig

__all__ = [
    "LeastRequests",
    "PickContext",
    "PowerOfTwo",
    "PrefixAffinity",
    "SelectionPolicy",
    "SessionAffinity",
    "SmoothWeightedRoundRobin",
    "make_policy",
    "make_shared_policy",
]


def make_policy(config: RoutingConfig, shared: SelectionPolicy | None = None) -> SelectionPolicy:
    """A fresh policy instance (one per model pool) for `routing.policy`.

    `prefix` is the exception: one instance (`shared`, from `make_shared_policy`) serves every
    pool, so its index has one global memory budget; prompts are namespaced by model.
    """
    if shared is not None:
        return shared
    if config.policy == "round_robin":
        return SmoothWeightedRoundRobin()
    if config.policy == "least_requests":
        return LeastRequests()
    if config.policy == "power_of_two":
        return PowerOfTwo()
    if config.policy == "session":
        return SessionAffinity()
    raise ValueError(f"routing.policy {config.policy!r} is not available in this build")


def make_shared_policy(config: RoutingConfig) -> PrefixAffinity | None:
    """The one gateway-wide policy instance when `routing.policy` needs one (prefix), else None."""
    if config.policy != "prefix":
        return None
    return PrefixAffinity(int(config.prefix_memory_mb * 1024 * 1024))
