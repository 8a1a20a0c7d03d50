"""`Guard`: the `authenticate → admit` phase of the pipeline and the admin check, in one object.

The pipeline calls `admit` first thing for every proxied request when gateway
keys are on: 401 without a valid key, 429 over its limits; the answer, whichever
path writes it, then carries the key's `x-ratelimit-*` headers. Afterwards the
pipeline asks `check_model` (403), `scope` (the cache namespace), whether to
`ask_for_usage` on a stream, and `charge`s the answer's tokens. The router asks
`check_admin` on the admin routes and `authenticate` on the other `/v1/` ones.
A reload swaps the key table; the limiter (per-key state) stays.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ntonix.http.extra import WithHeaders
from ntonix.limits.limiter import Limiter

if TYPE_CHECKING:
    from ntonix.auth.keys import KeyTable, Principal
    from ntonix.limits.shared import SharedLimits
    from ntonix.pipeline.exchange import Exchange

# The gateway's own routes that only the admin key may read (the dashboard page itself holds no data).
ADMIN_PATHS = frozenset({"/metrics", "/metrics/prometheus", "/cache/stats"})


class Guard:
    """Keys, limits and the cache scope rule of one gateway process."""

    __slots__ = ("by_key", "limiter", "shared", "table")

    def __init__(
        self, table: KeyTable, limiter: Limiter, scope_by_key: bool, shared: SharedLimits | None = None
    ) -> None:
        self.table = table
        self.limiter = limiter
        self.by_key = scope_by_key
        self.shared = shared  # with cache.redis_url: limits shared by the fleet

    @property
    def keys_on(self) -> bool:
        return self.table.keys_on

    def authenticate(self, headers: Any) -> Principal | None:
        """The caller's principal (None when no keys are configured); 401 without a valid key."""
        if not self.table.keys_on:
            return None
        return self.table.authenticate(headers.get("authorization"))

    async def admit(self, headers: Any, ex: Exchange, proto: Any) -> Any:
        """Authenticate and spend one request (401, 429); the protocol that adds the limit headers."""
        principal = ex.principal = self.table.authenticate(headers.get("authorization"))
        if principal.rpm is None and principal.tpm is None:
            return proto
        if self.shared is not None:
            # the fleet's state at admission (a whole answer's own tokens are charged after it)
            shared_headers = await self.shared.admit(principal)
            return WithHeaders(proto, lambda: shared_headers)
        limiter = self.limiter
        limiter.admit(principal)
        return WithHeaders(proto, lambda: limiter.headers(principal))

    def check_admin(self, headers: Any) -> None:
        self.table.check_admin(headers.get("authorization"))

    def scope(self, principal: Principal) -> str:
        """The cache namespace of the key's requests: its own with `cache.scope: key`, else the shared one."""
        return principal.scope if self.by_key else ""

    def charge(self, principal: Principal, tokens: int) -> None:
        if self.shared is not None:
            self.shared.charge(principal, tokens)
        else:
            self.limiter.charge(principal, tokens)

    def snapshot(self) -> dict[str, dict[str, int | None]]:
        """Per key name: its limits, the requests refused (429) and the tokens its answers used."""
        states = self.limiter.states
        out: dict[str, dict[str, int | None]] = {}
        for principal in self.table.by_digest.values():
            state = states.get(principal.ident)
            out[principal.name] = {
                "rpm": principal.rpm,
                "tpm": principal.tpm,
                "rate_limited": state.rejected if state is not None else 0,
                "tokens": state.tokens_used if state is not None else 0,
            }
        return out
