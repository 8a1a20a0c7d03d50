"""Configuration: precedence CLI > env > file > defaults, per-key merging, one-line errors."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import msgspec
import pytest

from ntonix.config import (
    BackendConfig,
    ConfigError,
    Settings,
    load_settings,
    load_settings_with_sources,
    parse_backend,
    settings_to_dict,
)

REPO = Path(__file__).resolve().parents[1]
ONE_BACKEND = {"NTONIX_BACKENDS": "127.0.0.1:9001"}


def write(tmp_path: Path, data: Any, name: str = "ntonix.json") -> str:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def error_of(tmp_path: Path, data: Any = None, env: dict[str, str] | None = None, **cli: Any) -> str:
    path = None if data is None else write(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_settings(path, env if env is not None else {}, cli)
    message = str(info.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------- precedence


def test_defaults_with_backend_from_env() -> None:
    settings, sources = load_settings_with_sources(None, ONE_BACKEND, None)
    assert settings.server.port == 8080
    assert settings.server.ssl_port == 8443
    assert settings.server.threads == (os.cpu_count() or 1)
    assert settings.server.bind_address == "0.0.0.0"
    assert settings.cache == msgspec.convert({}, type(settings.cache))
    assert settings.logging.level == "info"
    assert settings.backends == (BackendConfig(host="127.0.0.1", port=9001, weight=1),)
    assert sources["server.port"] == "default"
    assert sources["backends"] == "env"


def test_example_file_loads_and_sets_every_key() -> None:
    settings, sources = load_settings_with_sources(str(REPO / "config" / "ntonix.json"), {}, None)
    assert [b.weight for b in settings.backends] == [1, 2]
    assert settings.server.threads == 4
    assert set(sources.values()) == {"file"}  # the example documents every key


def test_file_only_merges_per_key(tmp_path: Path) -> None:
    path = write(tmp_path, {"server": {"port": 9000}, "backends": [{"host": "a", "port": 1}]})
    settings, sources = load_settings_with_sources(path, {}, None)
    assert settings.server.port == 9000
    assert settings.server.ssl_port == 8443  # same section, not in the file: default kept
    assert settings.cache.max_size_mb == 512
    assert settings.backends == (BackendConfig(host="a", port=1, weight=1),)
    assert sources["server.port"] == "file"
    assert sources["server.ssl_port"] == "default"
    assert sources["backends"] == "file"


def test_config_path_from_env(tmp_path: Path) -> None:
    path = write(tmp_path, {"server": {"threads": 3}, "backends": [{"host": "a", "port": 1}]})
    assert load_settings(None, {"NTONIX_CONFIG": path}).server.threads == 3


def test_env_over_file(tmp_path: Path) -> None:
    path = write(tmp_path, {"server": {"port": 9000, "threads": 3}, "backends": [{"host": "a", "port": 1}]})
    env = {"NTONIX_PORT": "9100", "NTONIX_BIND_ADDRESS": "127.0.0.1", "NTONIX_LOG_LEVEL": "DEBUG"}
    settings, sources = load_settings_with_sources(path, env, None)
    assert settings.server.port == 9100
    assert settings.server.threads == 3
    assert settings.server.bind_address == "127.0.0.1"
    assert settings.logging.level == "debug"
    assert sources["server.port"] == "env"
    assert sources["server.threads"] == "file"


def test_cli_over_env_over_file(tmp_path: Path) -> None:
    path = write(
        tmp_path, {"server": {"port": 9000, "ssl_port": 9443}, "backends": [{"host": "a", "port": 1}]}
    )
    env = {"NTONIX_PORT": "9100", "NTONIX_SSL_PORT": "9444", "NTONIX_THREADS": "7"}
    cli = {"port": 9200, "ssl_port": None, "threads": None, "log_level": "warning", "backends": None}
    settings, sources = load_settings_with_sources(path, env, cli)
    assert (settings.server.port, settings.server.ssl_port, settings.server.threads) == (9200, 9444, 7)
    assert settings.logging.level == "warning"
    assert sources["server.port"] == "cli"
    assert sources["server.ssl_port"] == "env"
    assert sources["logging.level"] == "cli"


def test_env_backends_replace_file_list(tmp_path: Path) -> None:
    path = write(tmp_path, {"backends": [{"host": "a", "port": 1}, {"host": "b", "port": 2}]})
    settings = load_settings(path, {"NTONIX_BACKENDS": "c:3, [::1]:4:5"})
    assert settings.backends == (
        BackendConfig(host="c", port=3, weight=1),
        BackendConfig(host="::1", port=4, weight=5),
    )


def test_cli_backends_replace_env_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, {"backends": [{"host": "a", "port": 1}]})
    settings, sources = load_settings_with_sources(path, {"NTONIX_BACKENDS": "c:3"}, {"backends": ["d:4:2"]})
    assert settings.backends == (BackendConfig(host="d", port=4, weight=2),)
    assert sources["backends"] == "cli"


def test_empty_cli_backend_list_means_not_given() -> None:
    settings = load_settings(None, ONE_BACKEND, {"backends": []})
    assert settings.backends[0].port == 9001


def test_fractional_seconds_and_int_seconds(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        {
            "backends": [{"host": "a", "port": 1}],
            "health_check": {"interval_seconds": 0.25, "timeout_seconds": 1},
            "proxy": {"connect_timeout_seconds": 0.5, "max_body_size_mb": 0.5},
            "circuit_breaker": {"open_seconds": 1.5},
            "logging": {"max_file_size_mb": 0.001},
        },
    )
    settings = load_settings(path, {})
    assert settings.health_check.interval_seconds == 0.25
    assert settings.health_check.timeout_seconds == 1.0
    assert settings.proxy.connect_timeout_seconds == 0.5
    assert settings.circuit_breaker.open_seconds == 1.5
    assert settings.logging.max_file_size_mb == 0.001


def test_settings_to_dict_round_trips(tmp_path: Path) -> None:
    settings = load_settings(str(REPO / "config" / "ntonix.json"), {})
    data = settings_to_dict(settings)
    assert isinstance(data["backends"], list)
    again = load_settings(write(tmp_path, json.loads(json.dumps(data))), {})
    assert again == settings


def test_settings_are_frozen() -> None:
    settings = load_settings(None, ONE_BACKEND)
    with pytest.raises(AttributeError):
        settings.server.port = 1  # type: ignore[misc]
    assert isinstance(settings, Settings)


def test_ssl_enabled_with_readable_files(tmp_path: Path) -> None:
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("cert")
    key.write_text("key")
    ssl = {"enabled": True, "cert_file": str(cert), "key_file": str(key)}
    settings = load_settings(write(tmp_path, {"ssl": ssl, "backends": [{"host": "a", "port": 1}]}), {})
    assert settings.ssl.enabled


# --------------------------------------------------------------------------- parse_backend


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("localhost:8001", ("localhost", 8001, 1)),
        ("10.0.0.2:8001:3", ("10.0.0.2", 8001, 3)),
        ("[::1]:8001", ("::1", 8001, 1)),
        ("[fe80::1]:80:2", ("fe80::1", 80, 2)),
        (" gpu-1.lan:9000 ", ("gpu-1.lan", 9000, 1)),
    ],
)
def test_parse_backend(spec: str, expected: tuple[str, int, int]) -> None:
    b = parse_backend(spec)
    assert (b.host, b.port, b.weight) == expected


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "localhost",
        "localhost:",
        ":8001",
        "a:b",
        "a:1:x",
        "a:0",
        "a:70000",
        "a:1:0",
        "::1:80",
        "[::1]80",
        "a:1:2:3",
        "ftp://a:1",
        "http://",
        "a b:1",
        "http//localhost:1",
    ],
)
def test_parse_backend_rejects(spec: str) -> None:
    with pytest.raises(ConfigError, match="invalid backend"):
        parse_backend(spec)


# --------------------------------------------------------------------------- errors


def test_no_backends(tmp_path: Path) -> None:
    assert "backends: at least one backend is required" in error_of(tmp_path, {})
    assert "backends" in error_of(tmp_path, {"backends": []})


def test_unknown_key(tmp_path: Path) -> None:
    message = error_of(tmp_path, {"cache": {"max_sizemb": 1}, "backends": [{"host": "a", "port": 1}]})
    assert "unknown key 'cache.max_sizemb'" in message
    assert "max_size_mb" in message  # suggestion
    assert "unknown key 'bogus'" in error_of(tmp_path, {"bogus": 1})
    assert "unknown key 'backends[0].wieght'" in error_of(
        tmp_path, {"backends": [{"host": "a", "port": 1, "wieght": 2}]}
    )


def test_wrong_type(tmp_path: Path) -> None:
    message = error_of(tmp_path, {"server": {"port": "80"}, "backends": [{"host": "a", "port": 1}]})
    assert message == (
        f'invalid configuration: server.port: expected an integer, got "80" '
        f"(from config file '{tmp_path / 'ntonix.json'}')"
    )
    assert "cache.enabled: expected true or false" in error_of(tmp_path, {"cache": {"enabled": "yes"}})
    assert "server: expected an object, got null" in error_of(tmp_path, {"server": None})
    assert "backends[0]: needs host and port, or url" in error_of(tmp_path, {"backends": [{"host": "a"}]})


def test_port_out_of_range(tmp_path: Path) -> None:
    message = error_of(tmp_path, {"server": {"port": 70000}, "backends": [{"host": "a", "port": 1}]})
    assert message.startswith(
        "invalid configuration: server.port: expected an integer in 1..65535, got 70000"
    )
    assert "backends[0].port: expected an integer in 1..65535, got 0" in error_of(
        tmp_path, {"backends": [{"host": "a", "port": 0}]}
    )


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("server", "threads", 0, "expected an integer >= 1, got 0"),
        ("cache", "ttl_seconds", 0, "expected a number > 0, got 0"),
        ("cache", "max_size_mb", -1, "expected an integer >= 0, got -1"),
        (
            "logging",
            "level",
            "verbose",
            'expected one of trace, debug, info, warn, warning, error, critical, got "verbose"',
        ),
        ("logging", "format", "xml", 'expected one of text, json, got "xml"'),
        ("health_check", "unhealthy_threshold", 0, "expected an integer >= 1, got 0"),
        ("health_check", "path", "health", "expected a path starting with /"),
        ("circuit_breaker", "open_seconds", -1.5, "expected a number > 0, got -1.5"),
        ("proxy", "retries", -1, "expected an integer >= 0, got -1"),
        ("proxy", "ttfb_timeout_seconds", 0, "expected a number > 0, got 0"),
    ],
)
def test_out_of_range_values(tmp_path: Path, section: str, key: str, value: object, expected: str) -> None:
    message = error_of(tmp_path, {section: {key: value}, "backends": [{"host": "a", "port": 1}]})
    assert f"{section}.{key}: {expected}" in message


def test_weight_below_one(tmp_path: Path) -> None:
    message = error_of(
        tmp_path, {"backends": [{"host": "a", "port": 1}, {"host": "b", "port": 2, "weight": 0}]}
    )
    assert "backends[1].weight: expected an integer >= 1, got 0" in message


def test_missing_cert_file_when_ssl_enabled(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.crt")
    message = error_of(
        tmp_path, {"ssl": {"enabled": True, "cert_file": missing}, "backends": [{"host": "a", "port": 1}]}
    )
    assert f"ssl.cert_file: cannot read '{missing}': No such file or directory" in message


def test_ssl_ports_must_differ(tmp_path: Path) -> None:
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    ssl = {"enabled": True, "cert_file": str(cert), "key_file": str(cert)}
    data = {"ssl": ssl, "server": {"port": 9000, "ssl_port": 9000}, "backends": [{"host": "a", "port": 1}]}
    assert "server.ssl_port: must differ from server.port" in error_of(tmp_path, data)


def test_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "x.json"
    with pytest.raises(ConfigError) as info:
        load_settings(str(missing), {})
    assert str(info.value) == f"cannot read config file '{missing}': No such file or directory"
    with pytest.raises(ConfigError, match=r"cannot read config file .*: Is a directory"):
        load_settings(str(tmp_path), {})


def test_invalid_json(tmp_path: Path) -> None:
    message = error_of(tmp_path, '{\n  "server": {\n    "port": 1,\n  }\n}')
    assert message.startswith(f"config file '{tmp_path / 'ntonix.json'}': not valid JSON at line 4 column 3")
    assert "expected a JSON object at the top level" in error_of(tmp_path, "[1, 2]")


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("NTONIX_PORT", "abc", "invalid environment variable NTONIX_PORT: expected an integer, got 'abc'"),
        ("NTONIX_THREADS", "1.5", "invalid environment variable NTONIX_THREADS: expected an integer"),
        (
            "NTONIX_BACKENDS",
            "a:1,nonsense",
            "invalid environment variable NTONIX_BACKENDS: invalid backend 'nonsense'",
        ),
        ("NTONIX_BACKENDS", ",", "invalid environment variable NTONIX_BACKENDS"),
        ("NTONIX_PORT", "0", "server.port: expected an integer in 1..65535, got 0 (from NTONIX_PORT)"),
        ("NTONIX_LOG_LEVEL", "loud", "logging.level: expected one of trace, debug"),
    ],
)
def test_bad_env_names_the_variable(tmp_path: Path, name: str, value: str, expected: str) -> None:
    env = {**ONE_BACKEND, name: value}
    assert expected in error_of(tmp_path, env=env)


def test_bad_cli_values_name_the_option(tmp_path: Path) -> None:
    assert "(from --port)" in error_of(tmp_path, env=ONE_BACKEND, port=70000)
    assert "--backend: invalid backend 'x'" in error_of(tmp_path, env=ONE_BACKEND, backends=["x"])
    assert "unknown command-line setting 'colour'" in error_of(tmp_path, env=ONE_BACKEND, colour=1)


def test_empty_env_values_count_as_unset() -> None:
    settings = load_settings(None, {**ONE_BACKEND, "NTONIX_PORT": "", "NTONIX_CONFIG": ""})
    assert settings.server.port == 8080


def test_env_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NTONIX_BACKENDS", "h:1")
    monkeypatch.setenv("NTONIX_PORT", "9321")
    monkeypatch.delenv("NTONIX_CONFIG", raising=False)
    assert load_settings().server.port == 9321
