"""API keys → principals: the inline `auth.keys`, the `auth.keys_file`, and the admin key, as one table.

A key is stored only as its SHA-256 digest (a file may hold the digest alone,
`key_sha256`, made with `ntonix keys hash`), so neither the table nor anything
derived from it (cache scope, limiter state, logs, metrics) holds the secret;
what logs and metrics show is the key's `name`.

Lookup: the presented token is hashed and the digest looked up in a dict, then
confirmed with `hmac.compare_digest` against the stored digest. NOTE: the dict
lookup's timing can depend on the digest of the presented token, never on the
secret key's bytes, and learning bits of SHA-256(guess) tells nothing about
other keys (preimage resistance); this is the scheme token stores such as
GitHub's use, and it keeps authentication O(1) in the number of keys.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping
from typing import Any

import msgspec

from ntonix.config import ApiKeyConfig, AuthConfig
from ntonix.errors import GatewayError

__all__ = ["KeyConfigError", "KeyTable", "Principal", "build_table", "hash_key", "read_keys_file"]

_HEX64 = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[A-Za-z0-9._:@/+-]{1,64}")
_TOKEN = re.compile(r"[\x21-\x7e]{1,512}")  # what a Bearer token may be: printable ASCII, no spaces
_CHALLENGE = (("www-authenticate", 'Bearer realm="ntonix"'),)


class KeyConfigError(ValueError):
    """A bad key entry or keys file; `path` is the config key to blame."""

    def __init__(self, message: str, path: str) -> None:
        super().__init__(message)
        self.path = path


def hash_key(key: str) -> str:
    """The hex SHA-256 of a key, as `key_sha256` wants it."""
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


class Principal:
    """One key's identity and rights, with no trace of the key itself."""

    __slots__ = ("digest", "ident", "models", "name", "rpm", "scope", "tpm")

    def __init__(
        self, digest: bytes, name: str, models: frozenset[str] | None, rpm: int | None, tpm: int | None
    ):
        self.digest = digest
        self.ident = digest.hex()[:32]  # limiter state and cache scope: stable across reloads
        self.name = name
        self.models = models
        self.rpm = rpm
        self.tpm = tpm
        self.scope = f"key:{self.ident}"

    def may_use(self, model: str | None, aliases: Mapping[str, str]) -> bool:
        """Whether the key may call `model` (listed itself, or an alias of / the target of a listed id)."""
        allowed = self.models
        if allowed is None:
            return True
        if model is None:
            return False  # a request naming no model may reach any backend
        if model in allowed:
            return True
        target = aliases.get(model)
        return target is not None and target in allowed

    def check_model(self, model: str | None, aliases: Mapping[str, str]) -> None:
        """403 `model_not_allowed` unless the key may use `model`."""
        if not self.may_use(model, aliases):
            what = f"the model '{model}'" if model is not None else "a request that names no model"
            raise GatewayError(403, "model_not_allowed", f"this API key may not use {what}", param="model")


class KeyTable:
    """Digest → principal for the API keys, plus the admin key's digest."""

    __slots__ = ("admin", "by_digest")

    def __init__(self, principals: Iterable[Principal], admin: bytes | None) -> None:
        self.by_digest = {p.digest: p for p in principals}
        self.admin = admin

    @property
    def keys_on(self) -> bool:
        return bool(self.by_digest)

    def authenticate(self, authorization: str | None) -> Principal:
        """The principal of `Authorization: Bearer <key>`; 401 `invalid_api_key` when missing or unknown."""
        token = _bearer(authorization)
        if token is None:
            raise GatewayError(
                401,
                "invalid_api_key",
                "an API key is required: send Authorization: Bearer <key>",
                headers=_CHALLENGE,
            )
        digest = hashlib.sha256(token.encode()).digest()
        principal = self.by_digest.get(digest)
        if principal is None or not hmac.compare_digest(principal.digest, digest):
            raise GatewayError(401, "invalid_api_key", "the API key is not valid", headers=_CHALLENGE)
        return principal

    def check_admin(self, authorization: str | None) -> None:
        """401 unless `Authorization: Bearer <admin key>` (no-op without an admin key)."""
        expected = self.admin
        if expected is None:
            return
        token = _bearer(authorization)
        digest = hashlib.sha256(token.encode()).digest() if token is not None else b""
        if not hmac.compare_digest(expected, digest):
            raise GatewayError(
                401, "invalid_api_key", "the admin key is required for this endpoint", headers=_CHALLENGE
            )


def _bearer(authorization: str | None) -> str | None:
    if not authorization or authorization[:7].lower() != "bearer ":
        return None
    token = authorization[7:].strip()
    return token if _TOKEN.fullmatch(token) else None


class _KeysFile(msgspec.Struct, forbid_unknown_fields=True):
    keys: tuple[ApiKeyConfig, ...]


def read_keys_file(path: str) -> tuple[ApiKeyConfig, ...]:
    """The entries of a keys file: `{"keys": [...]}` or a bare list, each like an `auth.keys` entry."""
    where = f"auth.keys_file {path!r}"
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise KeyConfigError(f"{where}: cannot read: {exc.strerror or exc}", "auth.keys_file") from None
    try:
        raw: Any = msgspec.json.decode(data)
        if isinstance(raw, list):
            raw = {"keys": raw}
        return msgspec.convert(raw, _KeysFile).keys
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise KeyConfigError(f"{where}: {exc}", "auth.keys_file") from None


def build_table(auth: AuthConfig) -> KeyTable:
    """Check and index every key (inline, then the file's); KeyConfigError names the bad entry."""
    entries = [(f"auth.keys[{i}]", "auth.keys", e) for i, e in enumerate(auth.keys)]
    if auth.keys_file:
        where = f"auth.keys_file {auth.keys_file!r}"
        entries += [
            (f"{where} keys[{i}]", "auth.keys_file", e) for i, e in enumerate(read_keys_file(auth.keys_file))
        ]
    principals: dict[bytes, Principal] = {}
    names: set[str] = set()
    admin = hashlib.sha256(auth.admin_key.encode()).digest() if auth.admin_key else None
    if auth.admin_key and not _TOKEN.fullmatch(auth.admin_key):
        raise KeyConfigError(
            "auth.admin_key: expected 1-512 printable characters, no spaces", "auth.admin_key"
        )
    for label, path, entry in entries:
        principal = _principal(label, path, entry)
        if principal.digest in principals:
            raise KeyConfigError(f"{label}: the same key is listed twice", path)
        if principal.name in names:
            raise KeyConfigError(f"{label}.name: {principal.name!r} names two keys", path)
        if principal.digest == admin:
            raise KeyConfigError(f"{label}: an API key must differ from auth.admin_key", path)
        principals[principal.digest] = principal
        names.add(principal.name)
    return KeyTable(principals.values(), admin)


def _principal(label: str, path: str, e: ApiKeyConfig) -> Principal:
    def fail(detail: str) -> KeyConfigError:
        return KeyConfigError(f"{label}.{detail}", path)

    if (e.key is None) == (e.key_sha256 is None):
        raise fail("key: give exactly one of key and key_sha256")
    if e.key is not None:
        if not _TOKEN.fullmatch(e.key):
            raise fail("key: expected 1-512 printable characters, no spaces")
        digest = hashlib.sha256(e.key.encode()).digest()
    else:
        assert e.key_sha256 is not None
        if not _HEX64.fullmatch(e.key_sha256):
            raise fail("key_sha256: expected 64 lower-case hex digits (ntonix keys hash)")
        digest = bytes.fromhex(e.key_sha256)
    if not _NAME.fullmatch(e.name):
        raise fail(f"name: expected 1-64 characters of [A-Za-z0-9._:@/+-], got {e.name!r}")
    for field, value in (("rpm", e.rpm), ("tpm", e.tpm)):
        if value is not None and value < 1:
            raise fail(f"{field}: expected an integer >= 1, got {value}")
    if e.models is not None and any(not m.strip() for m in e.models):
        raise fail("models: model ids must be non-empty strings")
    models = frozenset(e.models) if e.models is not None else None
    return Principal(digest, e.name, models, e.rpm, e.tpm)
