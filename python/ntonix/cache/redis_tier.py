"""The shared cache tier: answers stored in Redis (or Valkey) for every gateway that names it.

The in-process Rust cache stays the first tier and its hit path does not know
this module exists. Only an L1 miss awaits `RedisTier.get`: one `GET`, bounded
by `cache.redis_timeout_ms`; a value found there fills L1 with its remaining
lifetime and is answered as an ordinary hit. Every answer stored in L1 is also
offered to `RedisTier.put`, which queues it for a background writer (`SET ... PX
ttl`, pipelined in batches) and never waits: a full queue drops the write and
counts it; a value over `cache.redis_max_entry_mb` is not sent.

Failure never reaches a request. A read that errors or times out is a miss;
after `cache.redis_failure_threshold` consecutive failures the circuit opens:
reads and writes are skipped (counted) at the cost of one attribute test, and a
background task probes Redis every `cache.redis_retry_seconds` until it answers
again within the read timeout. The tier starts with its circuit open, so a
gateway starts while Redis is down and uses it once it comes up.

A value is `HEADER + meta + body`: the header (`NTXC`, format version, flags,
status, lengths, an xxh3-64 checksum of meta and body, the absolute expiry
time) lets a gateway of another version, a foreign writer or a truncated value
be told apart from an entry (any of them is a miss, logged once). `meta` is the
representation string of `cache.value` (content-type, content-encoding) and
`body` the bytes L1 holds: a stream's chunks packed by `cache.value.pack_chunks`.
Keys are `ntonix:v1:<cache scope>:<32 hex digits of the L1 key>`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
import time
from typing import TYPE_CHECKING, Any

import xxhash

from ntonix.cache.value import unpack_chunks

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from ntonix._core import ResponseCache
    from ntonix.config import CacheConfig

log = logging.getLogger("ntonix.redis")

MAGIC = b"NTXC"
VERSION = 1
FLAG_STREAM = 1
# magic, version, flags, status, meta length, body length, xxh3-64 of meta+body, expiry (unix seconds)
HEADER = struct.Struct("<4sBBHIIQd")
KEY_PREFIX = "ntonix:v1:"
# A value found in Redis with less life than this left is not worth filling L1 with.
MIN_REMAINING_SECONDS = 0.5
WRITE_BATCH = 128


class BadValueError(ValueError):
    """A Redis value that is not an entry of this format version."""


def encode_value(body: bytes, meta: str, stream: bool, status: int, expires_at: float) -> bytes:
    """The Redis value of one cached answer."""
    meta_bytes = meta.encode()
    hasher = xxhash.xxh3_64(meta_bytes)
    hasher.update(body)
    header = HEADER.pack(
        MAGIC,
        VERSION,
        FLAG_STREAM if stream else 0,
        status,
        len(meta_bytes),
        len(body),
        hasher.intdigest(),
        expires_at,
    )
    return b"".join((header, meta_bytes, body))


def decode_value(value: bytes) -> tuple[bytes, str, bool, int, float]:
    """(body, meta, stream, status, expires_at) of a Redis value; `BadValueError` when it is not one."""
    if len(value) < HEADER.size:
        raise BadValueError(f"{len(value)} bytes, shorter than the header")
    magic, version, flags, status, meta_len, body_len, checksum, expires_at = HEADER.unpack_from(value)
    if magic != MAGIC:
        raise BadValueError("no NTONIX header")
    if version != VERSION:
        raise BadValueError(f"format version {version}, this gateway reads {VERSION}")
    if HEADER.size + meta_len + body_len != len(value):
        raise BadValueError("lengths do not match the value's size")
    view = memoryview(value)
    meta_end = HEADER.size + meta_len
    if xxhash.xxh3_64_intdigest(view[HEADER.size :]) != checksum:
        raise BadValueError("checksum mismatch")
    try:
        meta = str(view[HEADER.size : meta_end], "utf-8")
    except UnicodeDecodeError:
        raise BadValueError("representation headers are not UTF-8") from None
    return value[meta_end:], meta, bool(flags & FLAG_STREAM), status, expires_at


class RedisTier:
    """The Redis tier of one gateway process: bounded reads, queued writes, a circuit, counters."""

    def __init__(self, cfg: CacheConfig, l1: ResponseCache, scope: str = "global") -> None:
        from redis.asyncio import BlockingConnectionPool, Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.l1 = l1
        self.url = cfg.redis_url
        self.timeout = cfg.redis_timeout_ms / 1000.0
        self.ttl = float(cfg.ttl_seconds)
        self.streams = cfg.streaming  # without it a stream has a key (for coalescing) but no entry
        self.max_entry = int(cfg.redis_max_entry_mb * 1024 * 1024)
        self.threshold = cfg.redis_failure_threshold
        self.retry_seconds = cfg.redis_retry_seconds
        self.prefix = f"{KEY_PREFIX}{scope}:"
        self.lock_ms = int(cfg.redis_lock_ms)  # fleet single-flight; 0: off
        self.token = os.urandom(8).hex()  # this process's name on the locks it takes
        self.held: set[int] = set()
        # Background work (writes, probes) may take longer than a request's read: a slow network
        # must not turn every write into an error, yet nothing waits forever.
        self.slow_timeout = max(1.0, self.timeout * 4)
        pool = BlockingConnectionPool.from_url(
            self.url,
            max_connections=cfg.redis_max_connections,
            timeout=None,  # waiting for a connection is bounded by each caller's own deadline
            socket_timeout=self.slow_timeout,
            socket_connect_timeout=self.slow_timeout,
            retry=Retry(NoBackoff(), 0),  # one attempt: a failed read is a miss, not a retry
            # NOTE: no CLIENT SETNAME / SETINFO: a new connection is then one TCP connect and no round
            # trip more, which matters when a burst of misses opens connections under a 25 ms bound.
            lib_name=None,
            lib_version=None,
        )
        self.client: Redis = Redis(connection_pool=pool)
        # (name, value, ttl ms); a value None deletes `name` (a fleet lock this process held)
        self.queue: asyncio.Queue[tuple[str, bytes | None, int]] = asyncio.Queue(cfg.redis_write_queue)
        self.up = False
        self.failures = 0
        self.last_ok = 0.0
        self.hits = 0
        self.misses = 0
        self.errors = 0
        self.skipped = 0
        self.writes = 0
        self.writes_dropped = 0
        self.too_large = 0
        self.corrupt = 0
        self.locks = 0
        self.lock_waits = 0
        self.lock_hits = 0
        self._warned_corrupt = False
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the writer and the monitor (first connection, reconnects, heartbeat) on `loop`."""
        self._tasks = [loop.create_task(self._writer()), loop.create_task(self._monitor())]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        with contextlib.suppress(Exception):
            await self.client.aclose()

    # -- the request path ---------------------------------------------------------------------

    async def get(self, key: int, stream: bool) -> tuple[bytes, str] | None:
        """The answer stored under `key` (filling L1 with it), or None: a miss, an error, a skip."""
        if stream and not self.streams:
            return None
        if not self.up:
            self.skipped += 1
            return None
        name = f"{self.prefix}{key:032x}"
        try:
            async with asyncio.timeout(self.timeout):
                value = await self.client.get(name)
        except asyncio.CancelledError:
            raise  # the client left (or the gateway stops): not Redis's failure
        except Exception as err:
            self._failed("read", err)
            return None
        self.failures = 0
        return self._accept(key, name, value, stream)

    async def get_many(self, keys: list[int]) -> dict[int, tuple[bytes, str]]:
        """The answers stored under `keys` (one bounded MGET; found ones fill L1), by key."""
        if not keys:
            return {}
        if not self.up:
            self.skipped += 1
            return {}
        names = [f"{self.prefix}{key:032x}" for key in keys]
        try:
            async with asyncio.timeout(self.timeout):
                values = await self.client.mget(names)
        except asyncio.CancelledError:
            raise
        except Exception as err:
            self._failed("read", err)
            return {}
        self.failures = 0
        found: dict[int, tuple[bytes, str]] = {}
        for key, name, value in zip(keys, names, values, strict=True):
            hit = self._accept(key, name, value, False)
            if hit is not None:
                found[key] = hit
        return found

    def _accept(self, key: int, name: str, value: Any, stream: bool) -> tuple[bytes, str] | None:
        """A value read from Redis as a hit (and L1 filled), or None (a miss, counted)."""
        if value is None:
            self.misses += 1
            return None
        try:
            if not isinstance(value, bytes):
                raise BadValueError("not a byte string")
            body, meta, stored_stream, status, expires_at = decode_value(value)
            if stored_stream != stream or not 200 <= status < 300:
                raise BadValueError("stored for another kind of request")
            if stream:
                unpack_chunks(body)  # a replay must not fail halfway through
        except ValueError as err:  # BadValueError, or msgspec's errors for an unpackable stream
            self._bad_value(name, err)
            return None
        remaining = expires_at - time.time()
        if remaining < MIN_REMAINING_SECONDS:
            self.misses += 1
            return None
        self.hits += 1
        self.l1.put(key, body, meta, min(remaining, self.ttl))
        return body, meta

    def put(self, key: int, body: bytes, meta: str, stream: bool, status: int = 200) -> None:
        """Queue `body` for Redis with the full TTL; never waits, never raises."""
        try:
            if not self.up:
                self.skipped += 1
                return
            if len(body) + len(meta) + HEADER.size > self.max_entry:
                self.too_large += 1
                return
            value = encode_value(body, meta, stream, status, time.time() + self.ttl)
            try:
                self.queue.put_nowait((f"{self.prefix}{key:032x}", value, int(self.ttl * 1000)))
            except asyncio.QueueFull:
                self.writes_dropped += 1
        finally:
            self.fleet_done(key)  # queued after the value: waiters see the answer before the lock goes

    # -- fleet single-flight ------------------------------------------------------------------

    async def fleet_wait(self, key: int) -> tuple[bytes, str] | None:
        """With `cache.redis_lock_ms`: take the fleet's lock on `key` (None: compute it), or wait.

        Another gateway holding the lock is computing the same answer: poll Redis for it (backing
        off from 20 ms to 250 ms) until it appears (the answer, filling L1), the lock goes without
        one (its holder failed) or `redis_lock_ms` passes; then None: compute it yourself.
        """
        if not self.lock_ms or not self.up:
            return None
        lock, name = f"{self.prefix}lock:{key:032x}", f"{self.prefix}{key:032x}"
        try:
            async with asyncio.timeout(self.timeout):
                taken = await self.client.set(lock, self.token, nx=True, px=self.lock_ms)
        except asyncio.CancelledError:
            raise
        except Exception as err:
            self._failed("lock", err)
            return None
        if taken:
            self.locks += 1
            self.held.add(key)
            return None
        self.lock_waits += 1
        deadline = time.monotonic() + self.lock_ms / 1000.0
        delay = 0.02
        while self.up and time.monotonic() + delay < deadline:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.25)
            try:
                async with asyncio.timeout(self.timeout):
                    async with self.client.pipeline(transaction=False) as pipe:
                        pipe.get(name)
                        pipe.exists(lock)
                        value, still_locked = await pipe.execute()
            except asyncio.CancelledError:
                raise
            except Exception as err:
                self._failed("read", err)
                return None
            if value is not None:
                hit = self._accept(key, name, value, False)
                if hit is not None:
                    self.lock_hits += 1
                return hit
            if not still_locked:
                return None
        return None

    def fleet_done(self, key: int) -> None:
        """This process finished computing `key` (stored or not): release its fleet lock."""
        if key in self.held:
            self.held.discard(key)
            with contextlib.suppress(asyncio.QueueFull):  # else it expires after redis_lock_ms
                self.queue.put_nowait((f"{self.prefix}lock:{key:032x}", None, 0))

    # -- failures -----------------------------------------------------------------------------

    def _failed(self, what: str, err: BaseException) -> None:
        self.errors += 1
        self.failures += 1
        if self.up and self.failures >= self.threshold:
            self.up = False
            log.warning(
                "redis tier at %s skipped after %d failures (last %s: %s); retrying every %.1fs",
                _safe_url(self.url),
                self.failures,
                what,
                _describe(err),
                self.retry_seconds,
            )
        else:
            log.debug("redis %s failed: %s", what, _describe(err))

    def _bad_value(self, name: str, err: Exception) -> None:
        self.corrupt += 1
        self.misses += 1
        if not self._warned_corrupt:
            self._warned_corrupt = True
            log.warning(
                "redis value %s is not an NTONIX v%d entry (%s): treated as a miss "
                "(logged once; counted in redis.corrupt)",
                name,
                VERSION,
                err,
            )

    # -- background ---------------------------------------------------------------------------

    async def _writer(self) -> None:
        queue = self.queue
        while True:
            batch = [await queue.get()]
            while len(batch) < WRITE_BATCH and not queue.empty():
                batch.append(queue.get_nowait())
            if not self.up:
                self.skipped += len(batch)
                continue
            try:
                async with asyncio.timeout(self.slow_timeout):
                    async with self.client.pipeline(transaction=False) as pipe:
                        for name, value, ttl_ms in batch:
                            if value is None:
                                pipe.delete(name)
                            else:
                                pipe.set(name, value, px=ttl_ms)
                        await pipe.execute()
            except asyncio.CancelledError:
                raise
            except Exception as err:
                self._failed("write", err)
                continue
            self.failures = 0
            self.last_ok = time.monotonic()
            self.writes += sum(1 for item in batch if item[1] is not None)

    async def _monitor(self) -> None:
        """Connect, reconnect while the circuit is open, and notice a Redis that died while idle."""
        while True:
            if not self.up or time.monotonic() - self.last_ok > self.retry_seconds * 2:
                await self._probe()
            await asyncio.sleep(self.retry_seconds)

    async def _probe(self) -> None:
        try:
            async with asyncio.timeout(self.slow_timeout):
                await self.client.ping()  # (re)connects
            async with asyncio.timeout(self.timeout):
                await self.client.ping()  # and answers as fast as a read must
        except asyncio.CancelledError:
            raise
        except Exception as err:
            if self.up:
                self._failed("heartbeat", err)
            else:
                log.debug("redis at %s still unavailable: %s", _safe_url(self.url), _describe(err))
            return
        self.last_ok = time.monotonic()
        self.failures = 0
        if not self.up:
            self.up = True
            log.warning("redis tier connected at %s", _safe_url(self.url))

    # -- observability ------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return {
            "connected": self.up,
            "hits": self.hits,
            "misses": self.misses,
            "errors": self.errors,
            "skipped": self.skipped,
            "writes": self.writes,
            "writes_dropped": self.writes_dropped,
            "too_large": self.too_large,
            "corrupt": self.corrupt,
            "write_queue": self.queue.qsize(),
            "locks": self.locks,
            "lock_waits": self.lock_waits,
            "lock_hits": self.lock_hits,
        }

    def prometheus(self) -> str:
        """The tier's figures in the Prometheus text format (appended to the gateway's)."""
        out = [
            "# HELP ntonix_redis_connected 1 when the Redis tier answers (circuit closed).",
            "# TYPE ntonix_redis_connected gauge",
            f"ntonix_redis_connected {1 if self.up else 0}",
        ]
        for name, help_text in (
            ("hits", "Redis reads that found an answer after an L1 miss."),
            ("misses", "Redis reads that found nothing usable."),
            ("errors", "Redis reads, writes and heartbeats that failed or timed out."),
            ("skipped", "Reads and writes skipped while the Redis circuit was open."),
            ("writes", "Answers written to Redis."),
            ("writes_dropped", "Writes dropped because the write queue was full."),
            ("too_large", "Answers over cache.redis_max_entry_mb, not sent to Redis."),
            ("corrupt", "Redis values that were not NTONIX entries of this version."),
        ):
            out.append(f"# HELP ntonix_redis_{name}_total {help_text}")
            out.append(f"# TYPE ntonix_redis_{name}_total counter")
            out.append(f"ntonix_redis_{name}_total {getattr(self, name)}")
        out.append("")
        return "\n".join(out)


def _describe(err: BaseException) -> str:
    if isinstance(err, TimeoutError):
        return "timed out"
    return f"{type(err).__name__}: {err}".strip()


def _safe_url(url: str) -> str:
    """`url` without its password."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.rsplit("@", 1)[1]
    return f"{scheme}{sep}{rest}"
