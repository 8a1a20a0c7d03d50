"""API keys: the table (lookup, digests, admin key), config and keys-file errors, `ntonix keys`."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest

from ntonix.auth.keys import KeyConfigError, build_table, hash_key
from ntonix.config import AuthConfig, ConfigError, load_settings
from ntonix.errors import GatewayError

ONE_BACKEND = {"NTONIX_BACKENDS": "127.0.0.1:9001"}


def auth(**fields: Any) -> AuthConfig:
    return msgspec.convert(fields, AuthConfig)


def status_of(table: Any, authorization: str | None) -> int:
    try:
        table.authenticate(authorization)
    except GatewayError as err:
        assert err.code == "invalid_api_key"
        assert ("www-authenticate", 'Bearer realm="ntonix"') in err.headers
        return err.status
    return 200


def test_plain_and_hashed_keys_authenticate(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps({"keys": [{"key_sha256": hash_key("sk-file"), "name": "ops", "rpm": 5}]}))
    table = build_table(auth(keys=[{"key": "sk-inline", "name": "team-a"}], keys_file=str(keys_file)))
    assert table.authenticate("Bearer sk-inline").name == "team-a"
    assert table.authenticate("bearer   sk-file ").name == "ops"
    assert table.authenticate("Bearer sk-file").rpm == 5
    for bad in (None, "", "sk-inline", "Basic sk-inline", "Bearer ", "Bearer sk-other", "Bearer sk-inline x"):
        assert status_of(table, bad) == 401, bad
    principal = table.authenticate("Bearer sk-inline")
    assert all("sk-inline" not in str(getattr(principal, slot)) for slot in type(principal).__slots__)
    assert principal.scope.startswith("key:")
    assert hashlib.sha256(b"sk-inline").digest() == principal.digest


def test_admin_key() -> None:
    table = build_table(auth(admin_key="adm"))
    assert not table.keys_on
    table.check_admin("Bearer adm")
    for bad in (None, "Bearer", "Bearer adm2", "adm"):
        with pytest.raises(GatewayError) as info:
            table.check_admin(bad)
        assert info.value.status == 401
    build_table(auth()).check_admin(None)  # no admin key: open


def test_model_allow_list_with_aliases() -> None:
    table = build_table(auth(keys=[{"key": "k", "name": "a", "models": ["llama"]}]))
    who = table.authenticate("Bearer k")
    aliases = {"gpt-4o-mini": "llama", "other-alias": "qwen"}
    assert who.may_use("llama", aliases)
    assert who.may_use("gpt-4o-mini", aliases)
    assert not who.may_use("qwen", aliases)
    assert not who.may_use("other-alias", aliases)
    assert not who.may_use(None, aliases)
    with pytest.raises(GatewayError) as info:
        who.check_model("qwen", aliases)
    assert (info.value.status, info.value.code) == (403, "model_not_allowed")


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ([{"name": "a"}], "auth.keys[0].key: give exactly one of key and key_sha256"),
        ([{"key": "k", "key_sha256": hash_key("k"), "name": "a"}], "give exactly one"),
        ([{"key": "has space", "name": "a"}], "auth.keys[0].key: expected 1-512 printable"),
        ([{"key_sha256": "ABC", "name": "a"}], "auth.keys[0].key_sha256: expected 64 lower-case hex"),
        ([{"key": "k", "name": "bad name"}], "auth.keys[0].name"),
        ([{"key": "k", "name": "a", "rpm": 0}], "auth.keys[0].rpm: expected an integer >= 1, got 0"),
        ([{"key": "k", "name": "a", "tpm": -1}], "auth.keys[0].tpm"),
        (
            [{"key": "k", "name": "a"}, {"key": "k", "name": "b"}],
            "auth.keys[1]: the same key is listed twice",
        ),
        ([{"key": "k", "name": "a"}, {"key": "j", "name": "a"}], "auth.keys[1].name: 'a' names two keys"),
        ([{"key": "k", "name": "a", "extra": 1}], "unknown key 'auth.keys[0].extra'"),
    ],
)
def test_bad_keys_stop_start_up_with_one_line(tmp_path: Path, keys: list[Any], expected: str) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"auth": {"keys": keys}}))
    with pytest.raises(ConfigError) as info:
        load_settings(str(path), ONE_BACKEND)
    message = str(info.value)
    assert expected in message and "\n" not in message


def test_bad_keys_file_and_admin_key(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(ConfigError, match=r"auth.keys_file '.*nope.json': cannot read"):
        build_or_config(tmp_path, keys_file=str(missing))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ConfigError, match=r"auth.keys_file '.*broken.json': JSON is malformed"):
        build_or_config(tmp_path, keys_file=str(broken))
    with pytest.raises(ConfigError, match=r"must differ from auth\.admin_key"):
        build_or_config(tmp_path, keys=[{"key": "same", "name": "a"}], admin_key="same")
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps([{"key": "k", "name": "a"}]))  # a bare list is accepted too
    assert build_table(auth(keys_file=str(listed))).keys_on


def build_or_config(tmp_path: Path, **section: Any) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"auth": section}))
    load_settings(str(path), ONE_BACKEND)


def test_cache_scope_and_cors_origins_are_checked(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"cache": {"scope": "user"}}))
    with pytest.raises(ConfigError, match=r"cache\.scope: expected one of global, key"):
        load_settings(str(path), ONE_BACKEND)
    path.write_text(json.dumps({"server": {"cors_origins": ["app.example"]}}))
    with pytest.raises(ConfigError, match=r"server\.cors_origins"):
        load_settings(str(path), ONE_BACKEND)
    path.write_text(json.dumps({"server": {"cors_origins": ["https://app.example:8443", "*"]}}))
    assert load_settings(str(path), ONE_BACKEND).server.cors_origins == ("https://app.example:8443", "*")


def test_key_config_error_names_a_path() -> None:
    with pytest.raises(KeyConfigError) as info:
        build_table(auth(keys=[{"key": "k", "name": "a", "rpm": 0}]))
    assert info.value.path == "auth.keys"


def run_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ntonix", *args], input=stdin, capture_output=True, text=True, timeout=60
    )


def test_keys_hash_and_new_commands() -> None:
    expected = hashlib.sha256(b"sk-secret").hexdigest()
    assert run_cli("keys", "hash", "sk-secret").stdout.strip() == expected
    assert run_cli("keys", "hash", stdin="sk-secret\n").stdout.strip() == expected
    bad = run_cli("keys", "hash", stdin="\n")
    assert bad.returncode == 2 and bad.stderr.strip() == "ntonix: expected one key without spaces"
    made = run_cli("keys", "new", "--name", "team-a").stdout.splitlines()
    key = made[0].removeprefix("key: ")
    entry = json.loads(made[1])
    assert key.startswith("sk-ntonix-") and len(key) > 40
    assert entry == {"key_sha256": hashlib.sha256(key.encode()).hexdigest(), "name": "team-a"}
    assert build_table(auth(keys=[entry])).authenticate(f"Bearer {key}").name == "team-a"
