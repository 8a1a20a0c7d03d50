"""`server.loop`: uvloop by default when it imports, asyncio on request, a one-line error when uvloop is named
but missing."""

from __future__ import annotations

import asyncio
import sys

import pytest

from ntonix.config import ConfigError, load_settings
from ntonix.server import loop_factory

ONE_BACKEND = {"NTONIX_BACKENDS": "127.0.0.1:1"}


def test_auto_is_uvloop_when_installed_and_asyncio_is_asyncios_own() -> None:
    uvloop = pytest.importorskip("uvloop")
    assert loop_factory("auto") is uvloop.new_event_loop
    assert loop_factory("uvloop") is uvloop.new_event_loop
    assert loop_factory("asyncio") is None  # asyncio.Runner's default loop

    async def running() -> type:
        return type(asyncio.get_running_loop())

    with asyncio.Runner(loop_factory=loop_factory("auto")) as runner:
        assert runner.run(running()) is uvloop.Loop


def test_without_uvloop_auto_falls_back_and_uvloop_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # `import uvloop` raises ImportError
    assert loop_factory("auto") is None
    with pytest.raises(ConfigError, match=r"server\.loop is uvloop, but uvloop is not installed"):
        loop_factory("uvloop")


def test_loop_setting_default_env_and_bad_value() -> None:
    assert load_settings(None, ONE_BACKEND, None).server.loop == "auto"
    assert load_settings(None, {**ONE_BACKEND, "NTONIX_LOOP": "AsyncIO"}, None).server.loop == "asyncio"
    with pytest.raises(
        ConfigError,
        match=r'server.loop: expected one of auto, uvloop, asyncio, got "tokio" \(from NTONIX_LOOP\)',
    ):
        load_settings(None, {**ONE_BACKEND, "NTONIX_LOOP": "tokio"}, None)
