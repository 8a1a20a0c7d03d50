"""The `ntonix` command line: `run` the gateway, print its effective `config`, start a `mock` backend.

`run` and `config` share one set of options, which sit on top of the
`NTONIX_*` environment variables and the config file (precedence CLI >
environment > file > defaults, see `ntonix.config`). Bad configuration ends
the command with one `ntonix: <message>` line on stderr and exit status 2,
never a traceback; malformed option values are click usage errors (also 2).
The server module is imported only by `run`, so `config` and `--help` stay
quick and work without it.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import click

from ntonix import __version__
from ntonix.config import (
    LOG_LEVELS,
    ConfigError,
    Settings,
    load_settings,
    load_settings_with_sources,
    settings_to_dict,
)
from ntonix.logs import setup_logging
from ntonix.mock import mock_command

__all__ = ["main"]

_F = TypeVar("_F", bound=Callable[..., Any])

_EPILOG = (
    "Environment: NTONIX_CONFIG, NTONIX_PORT, NTONIX_SSL_PORT, NTONIX_THREADS, NTONIX_WORKERS, "
    "NTONIX_BIND_ADDRESS, "
    "NTONIX_BACKENDS (HOST:PORT[:WEIGHT],...), NTONIX_LOG_LEVEL. "
    "Precedence: command line > environment > config file > defaults."
)

_OPTIONS = (
    click.option(
        "--config",
        "config_path",
        metavar="PATH",
        help="JSON config file (default: $NTONIX_CONFIG, else built-in defaults).",
    ),
    click.option("--port", type=int, metavar="N", help="HTTP port, server.port [default: 8080]."),
    click.option(
        "--ssl-port",
        type=int,
        metavar="N",
        help="HTTPS port when ssl.enabled, server.ssl_port [default: 8443].",
    ),
    click.option(
        "--threads", type=int, metavar="N", help="I/O threads, server.threads [default: number of CPUs]."
    ),
    click.option(
        "--workers",
        type=int,
        metavar="N",
        help="Gateway processes sharing the ports, server.workers [default: 1].",
    ),
    click.option(
        "--bind",
        "bind_address",
        metavar="ADDR",
        help="Listen address, server.bind_address [default: 0.0.0.0].",
    ),
    click.option(
        "--backend",
        "backends",
        multiple=True,
        metavar="HOST:PORT[:WEIGHT]",
        help="Upstream LLM server; repeat for several. Replaces the config file's backend list.",
    ),
    click.option(
        "--log-level",
        type=click.Choice(LOG_LEVELS, case_sensitive=False),
        metavar="LEVEL",
        help=f"Application log level, logging.level: {', '.join(LOG_LEVELS)} [default: info].",
    ),
)


def _settings_options(func: _F) -> _F:
    for option in reversed(_OPTIONS):
        func = option(func)
    return func


def _overrides(options: dict[str, Any]) -> dict[str, object]:
    """The CLI mapping for `load_settings`: None means 'not given', like an empty --backend list."""
    overrides: dict[str, object] = dict(options)
    overrides["backends"] = list(options["backends"]) or None
    return overrides


def _fail(error: ConfigError) -> NoReturn:
    click.echo(f"ntonix: {error}", err=True)
    raise SystemExit(2)


class _Main(click.Group):
    """`ntonix --port N --backend ...` with no subcommand runs the gateway, as `ntonix run ...` does."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0].startswith("-") and args[0] not in ("-h", "--help", "-V", "--version"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_Main, epilog=_EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="ntonix")
def main() -> None:
    """NTONIX: an OpenAI-compatible gateway that caches, balances and streams for local LLM servers.

    Run options given without a command (`ntonix --port 8080 --backend localhost:8001`) run the gateway.
    """


@main.command(epilog=_EPILOG)
@_settings_options
def run(config_path: str | None, **options: Any) -> None:
    """Start the gateway (HTTP on --port; HTTPS on --ssl-port too when ssl.enabled). SIGHUP reloads."""
    overrides = _overrides(options)
    try:
        settings = load_settings(config_path, os.environ, overrides)
        setup_logging(settings.logging)
        from ntonix.server import serve

        # A partial, not a lambda: workers (server.workers > 1) get it pickled; env None is os.environ.
        serve(settings, reload=functools.partial(load_settings, config_path, None, overrides))
    except ConfigError as error:
        _fail(error)


@main.command(epilog=_EPILOG)
@_settings_options
@click.option("--sources", is_flag=True, help="Also print where each key's value came from.")
def config(config_path: str | None, sources: bool, **options: Any) -> None:
    """Print the effective configuration as JSON (shape of the config file); exit 2 when invalid."""
    try:
        settings, origins = load_settings_with_sources(config_path, os.environ, _overrides(options))
    except ConfigError as error:
        _fail(error)
    click.echo(json.dumps(_config_document(settings, origins if sources else None), indent=2))


def _config_document(settings: Settings, origins: dict[str, str] | None) -> dict[str, object]:
    data = settings_to_dict(settings)
    return data if origins is None else {"config": data, "sources": origins}


@main.group()
def keys() -> None:
    """Make gateway API keys and the SHA-256 digests a keys file may hold instead (auth.keys_file)."""


@keys.command("hash")
@click.argument("key", required=False)
def keys_hash(key: str | None) -> None:
    """Print the key_sha256 of KEY (read from stdin when not given, so it stays out of shell history)."""
    from ntonix.auth.keys import hash_key

    if key is None:
        key = sys.stdin.readline().strip()
    if not key or any(c.isspace() for c in key):
        click.echo("ntonix: expected one key without spaces", err=True)
        raise SystemExit(2)
    click.echo(hash_key(key))


@keys.command("new")
@click.option("--name", default="team", show_default=True, help="The key's name in the printed entry.")
def keys_new(name: str) -> None:
    """Print a fresh random key and a keys-file entry holding only its SHA-256."""
    import secrets

    from ntonix.auth.keys import hash_key

    key = "sk-ntonix-" + secrets.token_urlsafe(32)
    click.echo(f"key: {key}")
    click.echo(json.dumps({"key_sha256": hash_key(key), "name": name}))


main.add_command(mock_command, "mock")
