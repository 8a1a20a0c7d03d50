"""The `ntonix` command line, run as real `python -m ntonix` subprocesses (plus one in-process `run`)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from ntonix.cli import main
from ntonix.config import Settings

REPO = Path(__file__).resolve().parents[1]
OPTIONS = ("--config", "--port", "--ssl-port", "--threads", "--bind", "--backend", "--log-level")


def ntonix(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python -m ntonix ARGS` with a clean NTONIX_* environment plus `env`."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("NTONIX_")}
    base["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "python"), base.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "ntonix", *args],
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def write_config(tmp_path: Path, data: Any) -> str:
    path = tmp_path / "ntonix.json"
    path.write_text(json.dumps(data))
    return str(path)


def option_blocks(help_text: str) -> dict[str, str]:
    """Option name -> its entry in click's help (name, metavar and wrapped help text)."""
    blocks: dict[str, str] = {}
    name = ""
    for line in help_text.split("Options:", 1)[1].splitlines():
        if line.startswith("  -"):
            name = line.split()[0].rstrip(",")
            blocks[name] = line
        elif line.startswith("    ") and name:
            blocks[name] += " " + line.strip()
        else:
            name = ""
    return blocks


def test_help_lists_commands_and_version() -> None:
    out = ok(ntonix("--help"))
    for command in ("run", "config"):
        assert f"  {command} " in out
    assert "NTONIX_BACKENDS" in out
    assert ok(ntonix("--version")).strip() == "ntonix, version 0.1.0"


@pytest.mark.parametrize("command", ["run", "config"])
def test_command_help_documents_every_option(command: str) -> None:
    blocks = option_blocks(ok(ntonix(command, "--help")))
    for option in OPTIONS:
        assert len(blocks[option].split()) > 2, f"{option} has no help text: {blocks[option]!r}"
    if command == "config":
        assert len(blocks["--sources"].split()) > 2


def test_config_reflects_file_env_and_cli(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        {
            "server": {"port": 9000, "ssl_port": 9443, "threads": 3},
            "backends": [{"host": "a", "port": 1}],
            "cache": {"ttl_seconds": 1.5},
        },
    )
    out = ok(
        ntonix(
            "config", "--config", path, "--port", "9200", "--backend", "b:2:3", "--log-level", "DEBUG",
            env={"NTONIX_SSL_PORT": "9444", "NTONIX_PORT": "9100", "NTONIX_BACKENDS": "c:3"},
        )
    )  # fmt: skip
    data = json.loads(out)
    assert out.startswith('{\n  "server": {')  # indent 2, file shape
    assert data["server"] == {
        "port": 9200,
        "ssl_port": 9444,
        "threads": 3,
        "bind_address": "0.0.0.0",
        "loop": "auto",
        "shutdown_grace_seconds": 30.0,
        "workers": 1,
        "cors_origins": [],
    }
    assert data["backends"] == [{"host": "b", "port": 2, "weight": 3}]
    assert data["cache"]["ttl_seconds"] == 1.5
    assert data["logging"]["level"] == "debug"
    assert set(data) == {
        "server",
        "backends",
        "cache",
        "ssl",
        "logging",
        "health_check",
        "circuit_breaker",
        "proxy",
        "models",
        "routing",
        "auth",
    }


def test_config_from_ntonix_config_env_matches_example_file() -> None:
    example = json.loads((REPO / "config" / "ntonix.json").read_text())
    data = json.loads(ok(ntonix("config", env={"NTONIX_CONFIG": str(REPO / "config" / "ntonix.json")})))
    assert data == example


def test_config_sources(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"server": {"threads": 3}, "backends": [{"host": "a", "port": 1}]})
    out = ok(
        ntonix("config", "--config", path, "--port", "9200", "--sources", env={"NTONIX_SSL_PORT": "9444"})
    )
    data = json.loads(out)
    assert set(data) == {"config", "sources"}
    assert data["config"]["server"]["port"] == 9200
    sources = data["sources"]
    assert sources["server.port"] == "cli"
    assert sources["server.ssl_port"] == "env"
    assert sources["server.threads"] == "file"
    assert sources["backends"] == "file"
    assert sources["cache.ttl_seconds"] == "default"


@pytest.mark.parametrize("command", ["config", "run"])
@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing_file", "cannot read config file"),
        ("bad_json", "not valid JSON at line 1"),
        ("unknown_key", "unknown key 'server.prot'"),
        ("port_range", "server.port: expected an integer in 1..65535, got 70000"),
        ("no_backends", "at least one backend is required"),
        ("bad_env", "invalid environment variable NTONIX_BACKENDS"),
        ("missing_cert", "ssl.cert_file: cannot read"),
    ],
)
def test_invalid_config_one_line_exit_2(tmp_path: Path, command: str, case: str, expected: str) -> None:
    backends = [{"host": "a", "port": 1}]
    files: dict[str, Any] = {
        "bad_json": "{nope",
        "unknown_key": {"server": {"prot": 1}, "backends": backends},
        "port_range": {"server": {"port": 70000}, "backends": backends},
        "no_backends": {},
        "bad_env": {},
        "missing_cert": {
            "ssl": {"enabled": True, "cert_file": str(tmp_path / "x.crt")},
            "backends": backends,
        },
    }
    path = str(tmp_path / "absent.json")
    if case in files:
        path = str(tmp_path / "ntonix.json")
        Path(path).write_text(files[case] if isinstance(files[case], str) else json.dumps(files[case]))
    env = {"NTONIX_BACKENDS": "garbage"} if case == "bad_env" else {}
    result = ntonix(command, "--config", path, env=env)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("ntonix: ")
    assert expected in line


def test_bad_option_value_is_a_usage_error() -> None:
    result = ntonix("config", "--port", "abc")
    assert result.returncode == 2
    assert "Invalid value for '--port'" in result.stderr
    assert "Traceback" not in result.stderr
    result = ntonix("run", "--log-level", "loud")
    assert result.returncode == 2
    assert "Invalid value for '--log-level'" in result.stderr


# --------------------------------------------------------------------------- `run` hands over to the server


@pytest.fixture
def fake_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[Settings, Any]]]:
    calls: list[tuple[Settings, Any]] = []
    module = types.ModuleType("ntonix.server")
    module.serve = lambda settings, reload: calls.append((settings, reload))  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "ntonix.server", module)
    loggers = [logging.getLogger("ntonix"), logging.getLogger("ntonix.access")]
    saved = [(lg, lg.handlers[:], lg.level, lg.propagate) for lg in loggers]
    yield calls
    for lg, handlers, level, propagate in saved:
        for handler in lg.handlers:
            if handler not in handlers:
                handler.close()
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate = propagate


def test_run_calls_serve_with_settings_and_reload(
    tmp_path: Path, fake_server: list[tuple[Settings, Any]]
) -> None:
    path = tmp_path / "ntonix.json"
    path.write_text(
        json.dumps({"backends": [{"host": "a", "port": 1}], "logging": {"enable_console": False}})
    )
    result = CliRunner().invoke(
        main, ["run", "--config", str(path), "--port", "9300"], env={"NTONIX_THREADS": "2"}
    )
    assert result.exit_code == 0, result.output
    ((settings, reload),) = fake_server
    assert (settings.server.port, settings.server.threads) == (9300, 2)
    path.write_text(json.dumps({"backends": [{"host": "b", "port": 2, "weight": 4}]}))
    reloaded = reload()  # SIGHUP path: same arguments, the file read again
    assert reloaded.server.port == 9300
    assert reloaded.backends[0].host == "b"
