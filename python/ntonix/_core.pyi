"""Type stubs of the Rust extension `ntonix._core` (checked by mypy.stubtest)."""

import asyncio
from collections.abc import Awaitable, Generator
from typing import Any, Generic, TypeVar, final

_T = TypeVar("_T")

__all__ = [
    "Forwarder",
    "NtonixError",
    "Pending",
    "PrefixIndex",
    "ResponseCache",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamProtocolError",
    "UpstreamResponse",
    "UpstreamTimeoutError",
    "__version__",
    "init_runtime",
]

__version__: str

class NtonixError(Exception): ...
class UpstreamError(NtonixError): ...
class UpstreamConnectError(UpstreamError): ...
class UpstreamTimeoutError(UpstreamError): ...
class UpstreamProtocolError(UpstreamError): ...

def init_runtime(threads: int) -> bool: ...

@final
class Forwarder:
    def __new__(
        cls,
        event_loop: Any,
        *,
        connect_timeout: float = 2.0,
        first_byte_timeout: float = 120.0,
        idle_timeout: float = 60.0,
        total_timeout: float = 600.0,
        pool_idle_timeout: float = 90.0,
        ca_file: str | None = None,
    ) -> Forwarder: ...
    @property
    def wake_fd(self) -> int: ...
    def drain(self) -> None: ...
    def request(
        self,
        method: str,
        url: str,
        headers: list[tuple[str, str]],
        body: bytes,
        buffer: bool = False,
    ) -> Pending[UpstreamResponse]: ...
    def probe(self, url: str, timeout: float) -> Pending[int]: ...

@final
class Pending(Generic[_T]):
    def __await__(self) -> Generator[Any, None, _T]: ...
    def cancel(self) -> bool: ...
    def done(self) -> bool: ...

@final
class UpstreamResponse:
    @property
    def status(self) -> int: ...
    @property
    def headers(self) -> list[tuple[str, str]]: ...
    @property
    def body(self) -> bytes | None: ...
    @property
    def content_type(self) -> str | None: ...
    def next_chunk(self) -> asyncio.Future[bytes | None]: ...
    def read(self) -> Awaitable[bytes]: ...
    def close(self) -> None: ...

# --- cache ---

@final
class ResponseCache:
    """Size-capped, TTL-aware S3-FIFO cache of response bodies keyed by a 128-bit digest."""

    def __new__(cls, max_bytes: int, ttl_seconds: float, shards: int = 16) -> ResponseCache: ...
    def get(self, key: int) -> tuple[bytes, str] | None: ...
    def put(self, key: int, body: bytes, content_type: str, ttl_seconds: float | None = None) -> bool: ...
    def remove(self, key: int) -> bool: ...
    def clear(self) -> None: ...
    def stats(self) -> dict[str, int]: ...
    def __len__(self) -> int: ...

# --- end cache ---

# --- prefix index ---

@final
class PrefixIndex:
    """Approximate KV-cache prefix index: which backends hold a prefix of a prompt.

    Prompts are cut into blocks of `block_chars` UTF-8 bytes (characters for ASCII) named by
    chained hashes; only full blocks are indexed. Memory is reserved once, never above
    `max_bytes`; when full, the least recently used (block, backend) entries are evicted.
    """

    def __new__(cls, max_bytes: int, block_chars: int = 64) -> PrefixIndex: ...
    def match_prefix(self, text: str) -> dict[int, int]:
        """{backend: leading characters of `text` it holds}, for backends holding at least a block."""
    def insert(self, text: str, backend: int) -> None: ...
    def weaken(self, text: str, backend: int, cached_chars: int) -> int:
        """Drops `backend`'s blocks of `text` past `cached_chars`; returns entries dropped."""
    def remove_backend(self, backend: int) -> int: ...
    def clear(self) -> None: ...
    def stats(self) -> dict[str, int]:
        """entries, blocks, bytes_used, bytes_reserved, max_bytes, capacity, block_chars, lookups,
        matched_lookups, matched_chars, inserts, evictions, weakened, removed."""
    def __len__(self) -> int: ...

# --- end prefix index ---
