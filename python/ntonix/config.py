"""Gateway configuration: typed settings, their sources and their validation.

Settings are frozen msgspec structs, one per section of the JSON config file
(`config/ntonix.json`). They are built from four layers merged key by key with
the precedence CLI > environment (`NTONIX_*`) > config file > defaults, so a
file that sets only `server.port` keeps every other default; a backend list
from the CLI or `NTONIX_BACKENDS` replaces the file's list as a whole. Every
problem (unreadable file, bad JSON, unknown key, wrong type, value out of
range, missing certificate, no backend) is raised as one `ConfigError` whose
text is a single line naming the offending key and value, fit to print as is.
Relative paths (certificates) are resolved against the working directory.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
import re
import ssl
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal, NamedTuple, TypeAlias, cast

import msgspec

__all__ = [
    "ApiKeyConfig",
    "AuthConfig",
    "BackendConfig",
    "CacheConfig",
    "CircuitBreakerConfig",
    "ConfigError",
    "HealthCheckConfig",
    "LoggingConfig",
    "ModelsConfig",
    "ProxyConfig",
    "RoutingConfig",
    "ServerConfig",
    "Settings",
    "SslConfig",
    "load_settings",
    "load_settings_with_sources",
    "parse_backend",
    "parse_url",
    "settings_to_dict",
    "valid_host",
]

LogLevel: TypeAlias = Literal["trace", "debug", "info", "warn", "warning", "error", "critical"]
Policy: TypeAlias = Literal["round_robin", "least_requests", "power_of_two", "prefix", "session"]
LogFormat: TypeAlias = Literal["text", "json"]
CacheScope: TypeAlias = Literal["global", "key"]
EventLoop: TypeAlias = Literal["auto", "uvloop", "asyncio"]
Origin: TypeAlias = Literal["cli", "env", "file", "default"]

# The seed's names (trace, warn) and Python's (warning, critical); trace logs like debug.
LOG_LEVELS: tuple[str, ...] = ("trace", "debug", "info", "warn", "warning", "error", "critical")
POLICIES: tuple[str, ...] = ("round_robin", "least_requests", "power_of_two", "prefix", "session")
LOG_FORMATS: tuple[str, ...] = ("text", "json")
EVENT_LOOPS: tuple[str, ...] = ("auto", "uvloop", "asyncio")


class ConfigError(ValueError):
    """Invalid configuration; `str(error)` is one line meant for the operator."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.splitlines()))


def _cpu_count() -> int:
    return os.cpu_count() or 1


class ServerConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # HTTP listening port.
    port: int = 8080
    # HTTPS listening port, used only when ssl.enabled.
    ssl_port: int = 8443
    # Runtime I/O threads of each gateway process (defaults to the CPU count).
    threads: int = msgspec.field(default_factory=_cpu_count)
    # Address both listeners bind to.
    bind_address: str = "0.0.0.0"
    # The event loop the app runs on: "auto" (uvloop when it is installed, else asyncio), "uvloop", "asyncio".
    loop: EventLoop = "auto"
    # On SIGTERM/SIGINT, how long requests in flight may take to finish.
    shutdown_grace_seconds: float = 30.0
    # Gateway processes sharing the ports (SO_REUSEPORT); each has its own L1 cache and counters.
    workers: int = 1
    # Browser origins allowed to call the gateway (CORS), e.g. "https://app.example"; "*" for any.
    cors_origins: tuple[str, ...] = ()


class BackendConfig(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True
):
    # Backend host name or IP address (IPv6 without brackets); or give `url` instead.
    host: str | None = None
    # Backend HTTP port (with `host`).
    port: int | None = None
    # Base URL instead of host/port: http(s)://HOST[:PORT][/PATH-PREFIX].
    url: str | None = None
    # Share of traffic relative to the other backends (capacity, under every policy).
    weight: int = 1
    # Model ids it serves; absent: learnt from its GET /v1/models (any model until known).
    models: tuple[str, ...] | None = None
    # Sent upstream as `Authorization: Bearer ...` in place of the client's header.
    api_key: str | None = None
    # Health path probed on this backend (default: health_check.path).
    health_path: str | None = None


class ModelsConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # Alias -> model id: a request naming the alias is routed as, and rewritten to, its target.
    aliases: dict[str, str] = msgspec.field(default_factory=dict)


class RoutingConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # round_robin, least_requests, power_of_two, prefix or session.
    policy: Policy = "round_robin"
    # Header whose value pins a session to one backend (policy session); else the body's `user`.
    session_header: str = "x-session-id"
    # Memory budget of the prefix index (policy prefix), never exceeded.
    prefix_memory_mb: float = 64.0


class CacheConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # Whether identical requests are answered from the response cache.
    enabled: bool = True
    # Cap on cached bytes (0 disables storing).
    max_size_mb: int = 512
    # Lifetime of a cached answer.
    ttl_seconds: float = 3600.0
    # Whether completed streamed (SSE) answers are cached and replayed too.
    streaming: bool = False
    # Whether identical streaming requests join one live generation (X-Cache: COALESCED).
    coalesce_streams: bool = True
    # How far (KiB handed to the client's connection beyond what it has acknowledged) a client of a
    # shared live stream may fall behind before it is held back, and past which behind the live head
    # it is disconnected (Linux; see docs/adr/009-stream-fanout.md).
    follower_lag_kb: int = 1024
    # Shared second tier: redis://, rediss:// or unix:// URL of a Redis or Valkey; empty means none.
    redis_url: str = ""
    # Bound on the one Redis read an L1 miss makes; slower is a miss.
    redis_timeout_ms: float = 25.0
    # Answers larger than this are kept in L1 only.
    redis_max_entry_mb: float = 4.0
    # Writes waiting for Redis; when full, further writes are dropped (and counted).
    redis_write_queue: int = 1024
    # Consecutive Redis failures that open its circuit (the tier is skipped until Redis answers).
    redis_failure_threshold: int = 3
    # While the circuit is open, time between two reconnect attempts (also the heartbeat period).
    redis_retry_seconds: float = 1.0
    # Connections to Redis per gateway process.
    redis_max_connections: int = 32
    # Fleet single-flight: a Redis lock this long lets one gateway compute an answer while the
    # others poll Redis for it (then compute it themselves); 0 turns it off.
    redis_lock_ms: float = 0.0
    # "global": one namespace for every client; "key": each gateway API key its own (hits never cross).
    scope: CacheScope = "global"


class SslConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # Serve HTTPS on server.ssl_port in addition to HTTP on server.port.
    enabled: bool = False
    # PEM certificate (chain) file.
    cert_file: str = "server.crt"
    # PEM private key file.
    key_file: str = "server.key"


class LoggingConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # Minimum level of application log lines.
    level: LogLevel = "info"
    # Log file path; empty means no file.
    file: str = ""
    # Size at which the log file is rotated (may be fractional).
    max_file_size_mb: float = 100.0
    # Number of rotated files kept besides the active one.
    max_files: int = 5
    # Log to stderr.
    enable_console: bool = True
    # Colour the console level names (only on a terminal, or with FORCE_COLOR).
    enable_colors: bool = True
    # "text" lines or one JSON object per line.
    format: LogFormat = "text"
    # One access line per request, independent of `level`.
    access_log: bool = True


class HealthCheckConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # Path probed with GET on each backend.
    path: str = "/health"
    # Time between two probes of one backend.
    interval_seconds: float = 5.0
    # Time a probe may take before it counts as failed.
    timeout_seconds: float = 2.0
    # Consecutive successes that make an unhealthy backend healthy.
    healthy_threshold: int = 2
    # Consecutive failures that make a healthy backend unhealthy.
    unhealthy_threshold: int = 3


class CircuitBreakerConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # Consecutive request failures that open a backend's circuit.
    failure_threshold: int = 5
    # Time an open circuit waits before letting one trial request through.
    open_seconds: float = 30.0


class ProxyConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # Time to establish the upstream TCP connection.
    connect_timeout_seconds: float = 2.0
    # Time from sending the request to the first response byte.
    ttfb_timeout_seconds: float = 120.0
    # Longest silence allowed between two chunks of a streamed answer.
    stream_idle_timeout_seconds: float = 60.0
    # Upper bound on a whole exchange, streams included.
    request_timeout_seconds: float = 600.0
    # Extra attempts on other backends when connecting fails (never after a byte was sent).
    retries: int = 2
    # Largest accepted request body.
    max_body_size_mb: float = 32.0
    # Extra CA bundle (PEM) trusted for https:// backends, besides the system roots; empty = none.
    ca_file: str = ""


class ApiKeyConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    # The key clients send as `Authorization: Bearer <key>` (or give key_sha256 instead).
    key: str | None = None
    # Hex SHA-256 of the key (`ntonix keys hash`), so the file holds no usable secret.
    key_sha256: str | None = None
    # Who the key belongs to: the name logs and metrics show (never the key).
    name: str
    # Model ids (or aliases) the key may use; absent: every model.
    models: tuple[str, ...] | None = None
    # Requests per minute; absent: unlimited.
    rpm: int | None = None
    # Tokens (prompt + completion, from answers' `usage`) per minute; absent: unlimited.
    tpm: int | None = None


class AuthConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # Gateway API keys; with any key (here or in keys_file) every /v1/... request needs one.
    keys: tuple[ApiKeyConfig, ...] = ()
    # JSON file of more keys ({"keys": [...]}, same fields), re-read on SIGHUP; empty: none.
    keys_file: str = ""
    # Key that /metrics, /metrics/prometheus and /cache/stats require; empty: those stay open.
    admin_key: str = ""


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # Listeners and process.
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    # Upstream LLM servers; at least one is required.
    backends: tuple[BackendConfig, ...] = ()
    # Response cache.
    cache: CacheConfig = msgspec.field(default_factory=CacheConfig)
    # TLS listener.
    ssl: SslConfig = msgspec.field(default_factory=SslConfig)
    # Application and access logs.
    logging: LoggingConfig = msgspec.field(default_factory=LoggingConfig)
    # Active health checks.
    health_check: HealthCheckConfig = msgspec.field(default_factory=HealthCheckConfig)
    # Passive failure counting per backend.
    circuit_breaker: CircuitBreakerConfig = msgspec.field(default_factory=CircuitBreakerConfig)
    # Upstream forwarding limits.
    proxy: ProxyConfig = msgspec.field(default_factory=ProxyConfig)
    # Model aliases.
    models: ModelsConfig = msgspec.field(default_factory=ModelsConfig)
    # Load-balancing policy.
    routing: RoutingConfig = msgspec.field(default_factory=RoutingConfig)
    # Gateway API keys, their limits, and the admin key.
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)


# --------------------------------------------------------------------------- backends

_BACKEND_FORMAT = "expected HOST:PORT, HOST:PORT:WEIGHT or an http(s):// URL"
_DIGITS = re.compile(r"[0-9]{1,9}")
# A DNS name or an IPv4 address; IPv6 addresses are checked with `ipaddress`.
_HOSTNAME = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,62}))*\.?"
)


def valid_host(host: str) -> bool:
    """Whether `host` is a bare host name or IP address (no scheme, port, brackets or path)."""
    if _HOSTNAME.fullmatch(host):
        return True
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return False
    return True


class BackendUrl(NamedTuple):
    """A backend's address split from its URL: scheme, host, port and path prefix (no trailing /)."""

    scheme: str
    host: str
    port: int
    prefix: str


def parse_url(url: str) -> BackendUrl:
    """Split and check an `http(s)://HOST[:PORT][/PREFIX]` backend URL; ValueError says what is wrong."""
    try:
        parts = urllib.parse.urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"invalid URL {url!r}: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"invalid URL {url!r}: scheme must be http or https")
    host = parts.hostname or ""
    if not host or not valid_host(host):
        raise ValueError(f"invalid URL {url!r}: missing or invalid host")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"invalid URL {url!r}: no query, fragment or credentials allowed")
    if port == 0:
        raise ValueError(f"invalid URL {url!r}: port must be in 1..65535, got 0")
    default = 443 if parts.scheme == "https" else 80
    return BackendUrl(parts.scheme, host, default if port is None else port, parts.path.rstrip("/"))


def parse_backend(spec: str) -> BackendConfig:
    """Parse `host:port`, `host:port:weight`, `[ipv6]:port[:weight]` or an `http(s)://` URL."""
    text = spec.strip()
    if "://" in text:
        try:
            parse_url(text)
        except ValueError as exc:
            raise ConfigError(f"invalid backend {spec!r}: {exc}") from None
        return BackendConfig(url=text)
    host, numbers = _split_host(text, spec)
    if not host or len(numbers) not in (1, 2):
        raise ConfigError(f"invalid backend {spec!r}: {_BACKEND_FORMAT}")
    if not valid_host(host):
        raise ConfigError(f"invalid backend {spec!r}: {host!r} is not a host name or IP address")
    if not all(_DIGITS.fullmatch(n) for n in numbers):
        raise ConfigError(f"invalid backend {spec!r}: port and weight must be integers")
    port, weight = int(numbers[0]), int(numbers[1]) if len(numbers) == 2 else 1
    if not 1 <= port <= 65535:
        raise ConfigError(f"invalid backend {spec!r}: port must be in 1..65535, got {port}")
    if weight < 1:
        raise ConfigError(f"invalid backend {spec!r}: weight must be >= 1, got {weight}")
    return BackendConfig(host=host, port=port, weight=weight)


def _split_host(text: str, spec: str) -> tuple[str, list[str]]:
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or not text[end + 1 :].startswith(":"):
            raise ConfigError(f"invalid backend {spec!r}: {_BACKEND_FORMAT}")
        return text[1:end], text[end + 2 :].split(":")
    host, *numbers = text.split(":")
    if len(numbers) > 2:
        raise ConfigError(f"invalid backend {spec!r}: {_BACKEND_FORMAT} (put IPv6 addresses in brackets)")
    return host, numbers


def _backend_dicts(specs: list[str]) -> list[dict[str, object]]:
    return [cast(dict[str, object], msgspec.to_builtins(parse_backend(s))) for s in specs]


# --------------------------------------------------------------------------- layers

Raw: TypeAlias = dict[str, Any]

# CLI mapping key -> (dotted key, option name shown in messages).
_CLI_KEYS: dict[str, tuple[str, str]] = {
    "port": ("server.port", "--port"),
    "ssl_port": ("server.ssl_port", "--ssl-port"),
    "threads": ("server.threads", "--threads"),
    "workers": ("server.workers", "--workers"),
    "bind_address": ("server.bind_address", "--bind"),
    "backends": ("backends", "--backend"),
    "log_level": ("logging.level", "--log-level"),
}


def _env_int(value: str) -> object:
    if not re.fullmatch(r"[+-]?[0-9]+", value.strip()):
        raise ValueError(f"expected an integer, got {value!r}")
    return int(value)


def _env_backends(value: str) -> object:
    specs = [part for part in value.split(",") if part.strip()]
    if not specs:
        raise ValueError(f"expected HOST:PORT[:WEIGHT] or URL,..., got {value!r}")
    return _backend_dicts(specs)


def _env_level(value: str) -> object:
    return value.strip().lower()


# Environment variable -> (dotted key, parser of the raw string).
_ENV_KEYS: dict[str, tuple[str, Callable[[str], object]]] = {
    "NTONIX_PORT": ("server.port", _env_int),
    "NTONIX_SSL_PORT": ("server.ssl_port", _env_int),
    "NTONIX_THREADS": ("server.threads", _env_int),
    "NTONIX_WORKERS": ("server.workers", _env_int),
    "NTONIX_BIND_ADDRESS": ("server.bind_address", str.strip),
    "NTONIX_LOOP": ("server.loop", _env_level),
    "NTONIX_BACKENDS": ("backends", _env_backends),
    "NTONIX_LOG_LEVEL": ("logging.level", _env_level),
}


def _read_file(path: str) -> Raw:
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path!r}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path!r}: not valid UTF-8 text") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"config file {path!r}: not valid JSON at line {exc.lineno} column {exc.colno} ({exc.msg})"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r}: expected a JSON object at the top level")
    return data


def _set(raw: Raw, key: str, value: object) -> None:
    section, _, leaf = key.partition(".")
    if not leaf:
        raw[section] = value
        return
    target = raw.setdefault(section, {})
    if isinstance(target, dict):  # otherwise msgspec reports the section's wrong type
        target[leaf] = value


def _has(raw: Raw, key: str) -> bool:
    section, _, leaf = key.partition(".")
    if not leaf:
        return section in raw
    target = raw.get(section)
    return isinstance(target, dict) and leaf in target


class _Layers:
    """The merged raw document plus, per dotted key, where its value came from."""

    def __init__(self) -> None:
        self.raw: Raw = {}
        self.origin: dict[str, Origin] = {}
        self.label: dict[str, str] = {}
        self.file_label = ""

    def load_file(self, path: str) -> None:
        self.raw = _read_file(path)
        for key in _leaf_keys():
            if _has(self.raw, key):
                self._mark(key, "file", f"config file {path!r}")
        self.file_label = f"config file {path!r}"

    def apply_env(self, env: Mapping[str, str]) -> None:
        for name, (key, parse) in _ENV_KEYS.items():
            text = env.get(name, "")
            if not text.strip():
                continue  # an empty variable counts as unset
            try:
                value = parse(text)
            except ValueError as exc:
                raise ConfigError(f"invalid environment variable {name}: {exc}") from None
            self._put(key, value, "env", name)

    def apply_cli(self, cli: Mapping[str, object]) -> None:
        for name, value in cli.items():
            if name not in _CLI_KEYS:
                raise ConfigError(f"unknown command-line setting {name!r}")
            if value is None or (name == "backends" and not value):
                continue
            key, option = _CLI_KEYS[name]
            self._put(key, _cli_value(name, option, value), "cli", option)

    def normalise(self) -> None:
        """Accept "INFO" for "info": upper-case levels are what Python habits write."""
        section = self.raw.get("logging")
        if isinstance(section, dict) and isinstance(section.get("level"), str):
            section["level"] = section["level"].lower()

    def _put(self, key: str, value: object, origin: Origin, label: str) -> None:
        _set(self.raw, key, value)
        self._mark(key, origin, label)

    def _mark(self, key: str, origin: Origin, label: str) -> None:
        self.origin[key] = origin
        self.label[key] = label

    def describe(self, path: str) -> str:
        """` (from X)` naming the layer that set `path`, its closest parent, or else the file."""
        for key in _prefixes(path):
            if key in self.label:
                return f" (from {self.label[key]})"
        if path in _LEAF_KEYS:
            return " (default)"
        return f" (from {self.file_label})" if self.file_label else ""  # only a file has other keys


def _cli_value(name: str, option: str, value: object) -> object:
    if name == "backends":
        specs = [value] if isinstance(value, str) else list(cast(Any, value))
        try:
            return _backend_dicts([str(s) for s in specs])
        except ConfigError as exc:
            raise ConfigError(f"{option}: {exc}") from None
    if name == "log_level" and isinstance(value, str):
        return value.strip().lower()
    return value


def _prefixes(path: str) -> Iterator[str]:
    while path:
        yield path
        cut = max(path.rfind("."), path.rfind("["))
        path = path[:cut] if cut > 0 else ""


def _section_type(name: str) -> type[msgspec.Struct] | None:
    for field in msgspec.structs.fields(Settings):
        if field.name == name and isinstance(field.type, type) and issubclass(field.type, msgspec.Struct):
            return field.type
    return None


def _leaf_keys() -> Iterator[str]:
    for field in msgspec.structs.fields(Settings):
        section = _section_type(field.name)
        if section is None:
            yield field.name
        else:
            yield from (f"{field.name}.{sub.name}" for sub in msgspec.structs.fields(section))


_LEAF_KEYS = frozenset(_leaf_keys())


# --------------------------------------------------------------------------- errors from msgspec

_ERROR = re.compile(r"(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?")
_TYPE_NAMES = {
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "bool": "true or false",
    "object": "an object",
    "array": "an array",
}
_CHOICES = {
    "logging.level": LOG_LEVELS,
    "logging.format": LOG_FORMATS,
    "routing.policy": POLICIES,
    "server.loop": EVENT_LOOPS,
    "cache.scope": ("global", "key"),
}
_MISSING = object()


def _translate(error: msgspec.ValidationError, layers: _Layers) -> ConfigError:
    match = _ERROR.fullmatch(str(error))
    assert match is not None  # the pattern matches any text
    message, path = match["msg"], (match["path"] or "").lstrip(".")
    field = re.fullmatch(r"Object (contains unknown|missing required) field `(.*)`", message)
    if field and field[1] == "contains unknown":
        key = _join(path, field[2])
        return ConfigError(
            f"invalid configuration: unknown key {key!r}{_suggest(path, field[2])}{layers.describe(path)}"
        )
    if field:
        key = _join(path, field[2])
        return ConfigError(f"invalid configuration: {key}: required key missing{layers.describe(path)}")
    value = _lookup(layers.raw, path)
    shown = "" if value is _MISSING else _show(value)
    expected = re.fullmatch(r"Expected `(\w+)`, got `\w+`", message)
    if expected:
        detail = f"expected {_TYPE_NAMES.get(expected[1], expected[1])}, got {shown}"
    elif message.startswith("Invalid enum value") and path in _CHOICES:
        detail = f"expected one of {', '.join(_CHOICES[path])}, got {shown}"
    else:
        detail = message[:1].lower() + message[1:]
    return ConfigError(f"invalid configuration: {path or '(top level)'}: {detail}{layers.describe(path)}")


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _suggest(path: str, name: str) -> str:
    known = _known_fields(path)
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _known_fields(path: str) -> list[str]:
    struct = BackendConfig if path.startswith("backends") else _section_type(path) if path else Settings
    return [f.name for f in msgspec.structs.fields(struct)] if struct is not None else []


def _lookup(raw: object, path: str) -> object:
    for name, index in re.findall(r"([^.\[\]]+)|\[(\d+)\]", path):
        if index and isinstance(raw, list) and int(index) < len(raw):
            raw = raw[int(index)]
        elif name and isinstance(raw, dict) and name in raw:
            raw = raw[name]
        else:
            return _MISSING
    return raw


def _show(value: object) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


# --------------------------------------------------------------------------- semantic checks


class _Rule(NamedTuple):
    ok: Callable[[Any], bool]
    expected: str


_PORT = _Rule(lambda v: 1 <= v <= 65535, "an integer in 1..65535")
_ONE_OR_MORE = _Rule(lambda v: v >= 1, "an integer >= 1")
_NOT_NEGATIVE = _Rule(lambda v: v >= 0, "a number >= 0")  # NaN fails: comparisons with NaN are false
_NOT_NEGATIVE_INT = _Rule(lambda v: v >= 0, "an integer >= 0")
_POSITIVE = _Rule(lambda v: v > 0, "a number > 0")
_NOT_BLANK = _Rule(lambda v: bool(v.strip()), "a non-empty string")

# Every rule msgspec's types cannot express, by dotted key.
_RULES: dict[str, _Rule] = {
    "server.port": _PORT,
    "server.ssl_port": _PORT,
    "server.threads": _ONE_OR_MORE,
    "server.bind_address": _NOT_BLANK,
    "server.shutdown_grace_seconds": _NOT_NEGATIVE,
    "server.workers": _Rule(lambda v: 1 <= v <= 256, "an integer in 1..256"),
    "cache.max_size_mb": _NOT_NEGATIVE_INT,
    "cache.ttl_seconds": _POSITIVE,
    "cache.redis_url": _Rule(
        lambda v: not v or ("://" in v and v.split("://", 1)[0] in ("redis", "rediss", "unix")),
        "empty or a redis://, rediss:// or unix:// URL",
    ),
    "cache.follower_lag_kb": _Rule(lambda v: v >= 16, "an integer >= 16"),
    "cache.redis_timeout_ms": _POSITIVE,
    "cache.redis_max_entry_mb": _POSITIVE,
    "cache.redis_write_queue": _ONE_OR_MORE,
    "cache.redis_failure_threshold": _ONE_OR_MORE,
    "cache.redis_retry_seconds": _POSITIVE,
    "cache.redis_max_connections": _ONE_OR_MORE,
    "cache.redis_lock_ms": _NOT_NEGATIVE,
    "logging.max_file_size_mb": _POSITIVE,
    "logging.max_files": _ONE_OR_MORE,
    "health_check.path": _Rule(lambda v: v.startswith("/"), "a path starting with /"),
    "health_check.interval_seconds": _POSITIVE,
    "health_check.timeout_seconds": _POSITIVE,
    "health_check.healthy_threshold": _ONE_OR_MORE,
    "health_check.unhealthy_threshold": _ONE_OR_MORE,
    "circuit_breaker.failure_threshold": _ONE_OR_MORE,
    "circuit_breaker.open_seconds": _POSITIVE,
    "proxy.connect_timeout_seconds": _POSITIVE,
    "proxy.ttfb_timeout_seconds": _POSITIVE,
    "proxy.stream_idle_timeout_seconds": _POSITIVE,
    "proxy.request_timeout_seconds": _POSITIVE,
    "proxy.retries": _NOT_NEGATIVE_INT,
    "proxy.max_body_size_mb": _POSITIVE,
    "routing.prefix_memory_mb": _POSITIVE,
    "routing.session_header": _NOT_BLANK,
}
_BACKEND_RULES: dict[str, _Rule] = {"weight": _ONE_OR_MORE}


def _values(s: Settings) -> Iterator[tuple[str, Any, _Rule]]:
    for key, rule in _RULES.items():
        section, leaf = key.split(".")
        yield key, getattr(getattr(s, section), leaf), rule
    for i, backend in enumerate(s.backends):
        for leaf, rule in _BACKEND_RULES.items():
            yield f"backends[{i}].{leaf}", getattr(backend, leaf), rule


def _validate(s: Settings, layers: _Layers) -> None:
    for key, value, rule in _values(s):
        if not rule.ok(value):
            origin = layers.describe(key)
            raise ConfigError(
                f"invalid configuration: {key}: expected {rule.expected}, got {_show(value)}{origin}"
            )
    for i, backend in enumerate(s.backends):
        _validate_backend(f"backends[{i}]", backend, layers)
    for alias, target in s.models.aliases.items():
        if not alias.strip() or not target.strip() or alias == target:
            raise ConfigError(
                f"invalid configuration: models.aliases: {alias!r} -> {target!r}: "
                f"expected two different non-empty model ids{layers.describe('models.aliases')}"
            )
        if target in s.models.aliases:  # one hop only: the request would go to backends serving "target"
            raise ConfigError(
                f"invalid configuration: models.aliases: {alias!r} -> {target!r}: {target!r} is itself an "
                f"alias (chains are not followed; point {alias!r} at a model id)"
                f"{layers.describe('models.aliases')}"
            )
    if not s.backends:
        read = layers.file_label or "no config file"
        hint = ""
        if not layers.file_label and os.path.isfile(os.path.join("config", "ntonix.json")):
            hint = " (config/ntonix.json exists but was not read: pass --config config/ntonix.json)"
        raise ConfigError(
            "invalid configuration: backends: at least one backend is required "
            f"(config file 'backends', NTONIX_BACKENDS or --backend; read: {read}, environment, "
            f"command line){hint}"
        )
    if s.ssl.enabled:
        _validate_ssl(s, layers)
    if s.proxy.ca_file:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=s.proxy.ca_file)
        except ssl.SSLError as exc:  # before OSError, its base class
            raise ConfigError(
                f"invalid configuration: proxy.ca_file: {s.proxy.ca_file!r} holds no PEM certificate "
                f"({exc.reason}){layers.describe('proxy.ca_file')}"
            ) from None
        except OSError as exc:
            raise ConfigError(
                f"invalid configuration: proxy.ca_file: cannot read {s.proxy.ca_file!r}: "
                f"{exc.strerror or exc}{layers.describe('proxy.ca_file')}"
            ) from None
    _validate_auth(s, layers)
    for origin in s.server.cors_origins:
        if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
            raise ConfigError(
                f'invalid configuration: server.cors_origins: expected "*" or scheme://host[:port], '
                f"got {_show(origin)}{layers.describe('server.cors_origins')}"
            )


def _validate_auth(s: Settings, layers: _Layers) -> None:
    """Inline keys and the keys file parse into one table (duplicates, bad hashes, limits < 1 refused)."""
    from ntonix.auth.keys import KeyConfigError, build_table

    try:
        build_table(s.auth)
    except KeyConfigError as exc:
        raise ConfigError(f"invalid configuration: {exc}{layers.describe(exc.path)}") from None


def _validate_backend(key: str, b: BackendConfig, layers: _Layers) -> None:
    def fail(detail: str, leaf: str = "") -> ConfigError:
        path = f"{key}.{leaf}" if leaf else key
        return ConfigError(f"invalid configuration: {path}: {detail}{layers.describe(path)}")

    if b.url is not None:
        if b.host is not None or b.port is not None:
            raise fail("give either url or host and port, not both")
        try:
            parse_url(b.url)
        except ValueError as exc:
            raise fail(str(exc), "url") from None
    else:
        if b.host is None or b.port is None:
            raise fail("needs host and port, or url")
        if not valid_host(b.host):
            hint = " (use url for http(s)://...)" if "://" in b.host else ""
            raise fail(f"{b.host!r} is not a host name or IP address (IPv6 without brackets){hint}", "host")
        if not 1 <= b.port <= 65535:
            raise fail(f"expected an integer in 1..65535, got {b.port}", "port")
    if b.models is not None and any(not m.strip() for m in b.models):
        raise fail("model ids must be non-empty strings", "models")
    if b.health_path is not None and not b.health_path.startswith("/"):
        raise fail(f"expected a path starting with /, got {b.health_path!r}", "health_path")
    if b.api_key is not None and not b.api_key.strip():
        raise fail("expected a non-empty string", "api_key")


def _validate_ssl(s: Settings, layers: _Layers) -> None:
    for key, path in (("ssl.cert_file", s.ssl.cert_file), ("ssl.key_file", s.ssl.key_file)):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise ConfigError(
                f"invalid configuration: {key}: cannot read {path!r}: {exc.strerror or exc}"
                f"{layers.describe(key)}"
            ) from None
    if s.server.port == s.server.ssl_port:
        raise ConfigError(
            f"invalid configuration: server.ssl_port: must differ from server.port when ssl.enabled, "
            f"got {s.server.ssl_port} for both{layers.describe('server.ssl_port')}"
        )


# --------------------------------------------------------------------------- public API


def load_settings_with_sources(
    config_path: str | None = None,
    env: Mapping[str, str] | None = None,
    cli: Mapping[str, object] | None = None,
) -> tuple[Settings, dict[str, str]]:
    """Build validated settings and, per dotted key, its origin: cli, env, file or default."""
    env = os.environ if env is None else env
    layers = _Layers()
    path = config_path if config_path is not None else (env.get("NTONIX_CONFIG") or None)
    if path is not None:
        layers.load_file(path)
    layers.apply_env(env)
    layers.apply_cli(cli or {})
    layers.normalise()
    try:
        settings = msgspec.convert(layers.raw, Settings)
    except msgspec.ValidationError as exc:
        raise _translate(exc, layers) from None
    _validate(settings, layers)
    sources = {key: layers.origin.get(key, "default") for key in _leaf_keys()}  # file order
    return settings, cast(dict[str, str], sources)


def load_settings(
    config_path: str | None = None,
    env: Mapping[str, str] | None = None,
    cli: Mapping[str, object] | None = None,
) -> Settings:
    """Build validated settings from CLI > environment > config file > defaults."""
    return load_settings_with_sources(config_path, env, cli)[0]


def settings_to_dict(settings: Settings) -> dict[str, object]:
    """The settings as plain JSON-able data, in the shape of the config file."""
    data = cast(dict[str, object], msgspec.to_builtins(settings))
    data["backends"] = [
        {**cast(dict[str, object], backend), "weight": settings.backends[i].weight}
        for i, backend in enumerate(cast(tuple[object, ...], data["backends"]))
    ]
    return data
