"""`Limiter`: per-key `rpm` and `tpm` with the generic cell rate algorithm (GCRA), in this process.

Each limit of L units per period P keeps one number per key, its *theoretical
arrival time* (TAT): the instant by which the units used so far will have
drained at L/P per second. `used = max(0, tat - now)` seconds of the period
are taken; the key may spend a unit while `used + P/L <= P`. So a full key
has L units, spends them in a burst if it likes, and gets one back every P/L
seconds: no window edges (a fixed window lets 2L through around an edge), no
log of timestamps (a sliding-window log holds L of them per key), and the
exact `Retry-After` falls out of the same arithmetic.

Tokens are known only once the answer (or the stream) is over, so a request is
admitted while the key has at least one token left, and its `usage` is charged
afterwards (`charge`), possibly into debt: the next requests wait until the
debt has drained. A key overshoots its tpm by at most what its requests
already in flight use. A rejected request spends nothing.

State is per key digest (`Principal.ident`), so a SIGHUP that reloads keys
keeps what each key has used; a changed limit applies from the next request.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ntonix.errors import GatewayError

if TYPE_CHECKING:
    from ntonix.auth.keys import Principal

PERIOD_SECONDS = 60.0
# NOTE: float slack so that L requests in one burst are all admitted although P/L * L may round above P.
_EPSILON = 1e-6
Headers = list[tuple[str, str]]


class _State:
    __slots__ = ("rejected", "requests", "tokens", "tokens_used")

    def __init__(self, now: float) -> None:
        self.requests = now  # TAT of the request limit
        self.tokens = now  # TAT of the token limit
        self.rejected = 0
        self.tokens_used = 0


def _remaining(tat: float, now: float, limit: int, period: float) -> int:
    used = max(0.0, tat - now)
    return max(0, min(limit, math.floor((period - used) * limit / period + _EPSILON)))


class Limiter:
    """GCRA state of every key seen; `admit` before a request, `charge` its tokens after."""

    def __init__(self, period: float = PERIOD_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        self.period = period
        self.clock = clock
        self.states: dict[str, _State] = {}
        self.rejected = 0

    def _state(self, principal: Principal, now: float) -> _State:
        state = self.states.get(principal.ident)
        if state is None:
            state = self.states[principal.ident] = _State(now)
        return state

    def admit(self, principal: Principal) -> None:
        """Spend one request of the key, or raise 429 `rate_limit_exceeded` (spending nothing)."""
        rpm, tpm = principal.rpm, principal.tpm
        if rpm is None and tpm is None:
            return
        now = self.clock()
        state = self._state(principal, now)
        period = self.period
        wait = 0.0
        what = ""
        if rpm is not None:
            tat = max(state.requests, now) + period / rpm
            if tat - now > period + _EPSILON:
                wait, what = tat - now - period, f"{rpm} requests"
        if tpm is not None:
            used = max(0.0, state.tokens - now)
            if used > period - period / tpm + _EPSILON:  # not even one token left
                token_wait = used - (period - period / tpm)
                if token_wait > wait:
                    wait, what = token_wait, f"{tpm} tokens"
        if wait > 0.0:
            state.rejected += 1
            self.rejected += 1
            retry = str(max(1, math.ceil(wait - _EPSILON)))
            raise GatewayError(
                429,
                "rate_limit_exceeded",
                f"rate limit of {what} per minute reached for key '{principal.name}'; retry in {retry}s",
                headers=(("retry-after", retry), *self.headers(principal)),
            )
        if rpm is not None:
            state.requests = max(state.requests, now) + period / rpm

    def charge(self, principal: Principal, tokens: int) -> None:
        """Count `tokens` of a finished answer (against the key's tpm, which it may run into debt)."""
        if tokens <= 0:
            return
        now = self.clock()
        state = self._state(principal, now)
        state.tokens_used += tokens
        if principal.tpm is not None:
            state.tokens = max(state.tokens, now) + tokens * self.period / principal.tpm

    def headers(self, principal: Principal) -> Headers:
        """`x-ratelimit-*` for the key as it stands now (empty for a key without limits)."""
        rpm, tpm = principal.rpm, principal.tpm
        if rpm is None and tpm is None:
            return []
        now = self.clock()
        state = self._state(principal, now)
        out: Headers = []
        if rpm is not None:
            out.append(("x-ratelimit-limit-requests", str(rpm)))
            out.append(
                ("x-ratelimit-remaining-requests", str(_remaining(state.requests, now, rpm, self.period)))
            )
        if tpm is not None:
            out.append(("x-ratelimit-limit-tokens", str(tpm)))
            out.append(("x-ratelimit-remaining-tokens", str(_remaining(state.tokens, now, tpm, self.period))))
        return out
