"""`SharedLimits`: the same GCRA limits kept in Redis, so every gateway naming `cache.redis_url` shares them.

Admission is one `EVALSHA` of `_SCRIPT` per request (bounded by
`cache.redis_timeout_ms`): the script reads a key's two TATs from one hash,
does `Limiter`'s arithmetic with Redis's own clock (`TIME`, so gateways'
clocks need not agree), writes them back and answers allowed or the wait, with
the remaining requests and tokens. A token charge is the same script in charge
mode, sent in the background (it never delays an answer). Redis down, slow or
skipped by the Redis tier's circuit → the process's own `Limiter` decides, and
the switch is logged once each way. Keys in Redis: `ntonix:v1:limit:<key ident>`,
expiring once drained.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from typing import TYPE_CHECKING, Any

from ntonix.errors import GatewayError
from ntonix.limits.limiter import Headers, Limiter

if TYPE_CHECKING:
    from ntonix.auth.keys import Principal
    from ntonix.cache.redis_tier import RedisTier

log = logging.getLogger("ntonix.limits")

PREFIX = "ntonix:v1:limit:"
# KEYS[1]: the key's hash. ARGV: period, rpm (0: none), tpm (0: none), tokens to charge (0: admit).
# Answers {allowed (1/0), wait seconds as a string, remaining requests, remaining tokens}.
_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local period, rpm, tpm, charge = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local eps = 0.000001
local state = redis.call('HMGET', KEYS[1], 'r', 't')
local r = math.max(tonumber(state[1]) or now, now)
local tk = math.max(tonumber(state[2]) or now, now)
local function remaining(tat, limit)
  if limit <= 0 then return -1 end
  local left = math.floor((period - (tat - now)) * limit / period + eps)
  return math.max(0, math.min(limit, left))
end
local function save()
  redis.call('HSET', KEYS[1], 'r', tostring(r), 't', tostring(tk))
  redis.call('PEXPIRE', KEYS[1], math.ceil((math.max(r, tk) - now + 1) * 1000))
end
if charge > 0 then
  if tpm > 0 then tk = tk + charge * period / tpm; save() end
  return {1, '0', remaining(r, rpm), remaining(tk, tpm)}
end
local wait = 0
if rpm > 0 and r + period / rpm - now > period + eps then wait = r + period / rpm - now - period end
if tpm > 0 and tk - now > period - period / tpm + eps then
  wait = math.max(wait, tk - now - (period - period / tpm))
end
if wait > 0 then return {0, tostring(wait), remaining(r, rpm), remaining(tk, tpm)} end
if rpm > 0 then r = r + period / rpm end
save()
return {1, '0', remaining(r, rpm), remaining(tk, tpm)}
"""


class SharedLimits:
    """Limits in Redis for a fleet, with the local `Limiter` as the fallback."""

    def __init__(self, tier: RedisTier, local: Limiter) -> None:
        self.tier = tier
        self.local = local
        self.script: Any = tier.client.register_script(_SCRIPT)
        self.shared = True  # False while the local limiter decides (logged on each switch)
        self.errors = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def _fallback(self, why: str) -> None:
        self.errors += 1
        if self.shared:
            self.shared = False
            log.warning("rate limits: redis unavailable (%s); this gateway limits on its own", why)

    def _back(self) -> None:
        if not self.shared:
            self.shared = True
            log.warning("rate limits: shared through redis again")

    async def admit(self, principal: Principal) -> Headers:
        """Spend one request of the key fleet-wide (429 when over); its `x-ratelimit-*` headers."""
        rpm, tpm = principal.rpm or 0, principal.tpm or 0
        if not self.tier.up:
            self._fallback("redis tier skipped")
            self.local.admit(principal)
            return self.local.headers(principal)
        try:
            async with asyncio.timeout(self.tier.timeout):
                allowed, wait, left_r, left_t = await self.script(
                    keys=[PREFIX + principal.ident], args=[self.local.period, rpm, tpm, 0]
                )
        except asyncio.CancelledError:
            raise
        except Exception as err:
            self._fallback(type(err).__name__)
            self.local.admit(principal)
            return self.local.headers(principal)
        self._back()
        headers = _headers(principal, int(left_r), int(left_t))
        if not int(allowed):
            state = self.local._state(principal, self.local.clock())
            state.rejected += 1
            self.local.rejected += 1
            retry = str(max(1, math.ceil(float(wait) - 1e-6)))
            what = f"{principal.rpm} requests" if rpm and int(left_r) == 0 else f"{principal.tpm} tokens"
            raise GatewayError(
                429,
                "rate_limit_exceeded",
                f"rate limit of {what} per minute reached for key '{principal.name}'; retry in {retry}s",
                headers=(("retry-after", retry), *headers),
            )
        return headers

    def charge(self, principal: Principal, tokens: int) -> None:
        """Count tokens locally at once and in Redis in the background (never awaited by a request)."""
        self.local.charge(principal, tokens)
        if principal.tpm is None or tokens <= 0 or not self.tier.up:
            return
        task = asyncio.get_running_loop().create_task(self._charge(principal, tokens))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _charge(self, principal: Principal, tokens: int) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.tier.slow_timeout):
                await self.script(
                    keys=[PREFIX + principal.ident],
                    args=[self.local.period, principal.rpm or 0, principal.tpm or 0, tokens],
                )


def _headers(principal: Principal, left_r: int, left_t: int) -> Headers:
    out: Headers = []
    if principal.rpm is not None:
        out += [
            ("x-ratelimit-limit-requests", str(principal.rpm)),
            ("x-ratelimit-remaining-requests", str(left_r)),
        ]
    if principal.tpm is not None:
        out += [
            ("x-ratelimit-limit-tokens", str(principal.tpm)),
            ("x-ratelimit-remaining-tokens", str(left_t)),
        ]
    return out
