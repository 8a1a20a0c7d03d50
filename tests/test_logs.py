"""Logging: text and JSON lines, level filtering, colours, idempotence and size/count rotation."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ntonix.config import ConfigError, LoggingConfig
from ntonix.logs import log_access, setup_logging

TS = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
ACCESS_ARGS: dict[str, Any] = {
    "method": "POST",
    "path": "/v1/chat/completions",
    "backend": "127.0.0.1:8001",
    "status": 200,
    "cache": "MISS",
    "bytes_sent": 612,
    "latency_ms": 1.2345,
    "ttfb_ms": 0.8,
}


@pytest.fixture(autouse=True)
def restore_loggers() -> Iterator[None]:
    """Leave the `ntonix` loggers as found, so other suites' caplog still sees them."""
    loggers = [logging.getLogger("ntonix"), logging.getLogger("ntonix.access")]
    saved = [(lg, lg.handlers[:], lg.level, lg.propagate, lg.disabled) for lg in loggers]
    yield
    setup_logging(LoggingConfig(enable_console=False))  # closes the handlers it installed
    for lg, handlers, level, propagate, disabled in saved:
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate, lg.disabled = propagate, disabled


def file_config(tmp_path: Path, **kwargs: Any) -> LoggingConfig:
    return LoggingConfig(file=str(tmp_path / "ntonix.log"), enable_console=False, **kwargs)


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_text_lines(tmp_path: Path) -> None:
    setup_logging(file_config(tmp_path))
    logging.getLogger("ntonix").info("hello %s", "world")
    log_access("r1", **ACCESS_ARGS)
    app, access = lines(tmp_path / "ntonix.log")
    assert re.fullmatch(rf"{TS} INFO ntonix: hello world", app)
    assert re.fullmatch(
        rf"{TS} INFO ntonix\.access: access id=r1 method=POST path=/v1/chat/completions "
        r"backend=127\.0\.0\.1:8001 model=- status=200 cache=MISS bytes=612 latency_ms=1\.23 ttfb_ms=0\.80",
        access,
    )


def test_client_values_cannot_forge_lines(tmp_path: Path) -> None:
    setup_logging(file_config(tmp_path))
    log_access('x\n2026-01-01T00:00:00.000Z INFO ntonix: forged "', **{**ACCESS_ARGS, "ttfb_ms": None})
    (line,) = lines(tmp_path / "ntonix.log")
    assert 'id="x\\n2026-01-01T00:00:00.000Z INFO ntonix: forged \\""' in line
    assert line.endswith("ttfb_ms=-")


def test_json_lines_parse(tmp_path: Path) -> None:
    setup_logging(file_config(tmp_path, format="json"))
    log = logging.getLogger("ntonix.proxy")
    log.warning("backend %s down", "b1")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("failed")
    log_access("r2", **{**ACCESS_ARGS, "ttfb_ms": None, "cache": "HIT", "backend": ""})
    warning, failure, access = (json.loads(line) for line in lines(tmp_path / "ntonix.log"))
    assert warning["level"] == "WARNING"
    assert warning["logger"] == "ntonix.proxy"
    assert warning["msg"] == "backend b1 down"
    assert re.fullmatch(TS, warning["ts"])
    assert "RuntimeError: boom" in failure["exc"]
    assert access == {
        "ts": access["ts"],
        "level": "INFO",
        "logger": "ntonix.access",
        "msg": "access",
        "id": "r2",
        "method": "POST",
        "path": "/v1/chat/completions",
        "backend": "",
        "model": None,
        "status": 200,
        "cache": "HIT",
        "bytes": 612,
        "latency_ms": 1.23,
        "ttfb_ms": None,
    }


def test_level_filtering_and_access_switch(tmp_path: Path) -> None:
    setup_logging(file_config(tmp_path, level="warning"))
    log = logging.getLogger("ntonix")
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    log_access("r3", **ACCESS_ARGS)  # access lines follow access_log, not level
    assert [line.split(" ", 3)[1] for line in lines(tmp_path / "ntonix.log")] == ["WARNING", "ERROR", "INFO"]

    setup_logging(file_config(tmp_path, level="debug", access_log=False))
    assert not logging.getLogger("ntonix.access").isEnabledFor(logging.INFO)
    log.debug("d2")
    log_access("r4", **ACCESS_ARGS)
    assert lines(tmp_path / "ntonix.log")[-1].endswith("DEBUG ntonix: d2")


def test_idempotent(tmp_path: Path) -> None:
    cfg = file_config(tmp_path)
    setup_logging(cfg)
    setup_logging(cfg)
    assert len(logging.getLogger("ntonix").handlers) == 1
    logging.getLogger("ntonix").info("once")
    assert len(lines(tmp_path / "ntonix.log")) == 1


def test_rotation_keeps_max_files(tmp_path: Path) -> None:
    cfg = file_config(tmp_path, max_file_size_mb=0.001, max_files=3)  # 1048 bytes per file
    setup_logging(cfg)
    for i in range(300):
        log_access(f"req-{i:04d}", **ACCESS_ARGS)
    log_file = tmp_path / "ntonix.log"
    rotated = sorted(p.name for p in tmp_path.iterdir() if p.name != "ntonix.log")
    assert rotated == ["ntonix.log.1", "ntonix.log.2", "ntonix.log.3"]
    max_bytes = int(0.001 * 1024 * 1024)
    for path in [log_file, *(tmp_path / name for name in rotated)]:
        assert 0 < path.stat().st_size <= max_bytes
    assert lines(log_file)[-1].split()[4] == "id=req-0299"  # newest line in the active file
    newest_rotated = [line.split()[4] for line in lines(tmp_path / "ntonix.log.1")]
    oldest_active = lines(log_file)[0].split()[4]
    assert newest_rotated[-1] < oldest_active  # .1 holds the lines just before the active file's


def test_console_colours(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("FORCE_COLOR", "1")
    setup_logging(LoggingConfig())
    logging.getLogger("ntonix").error("red")
    assert "\x1b[31mERROR\x1b[0m ntonix: red" in capsys.readouterr().err

    setup_logging(LoggingConfig(enable_colors=False))
    logging.getLogger("ntonix").error("plain")
    err = capsys.readouterr().err
    assert "ERROR ntonix: plain" in err
    assert "\x1b[" not in err

    monkeypatch.delenv("FORCE_COLOR")
    setup_logging(LoggingConfig())  # captured stderr is not a terminal
    logging.getLogger("ntonix").error("no tty")
    assert "\x1b[" not in capsys.readouterr().err


def test_console_off(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging(LoggingConfig(enable_console=False))
    logging.getLogger("ntonix").error("nowhere")
    log_access("r5", **ACCESS_ARGS)
    assert capsys.readouterr().err == ""


def test_unopenable_log_file(tmp_path: Path) -> None:
    bad = tmp_path / "missing-dir" / "ntonix.log"
    with pytest.raises(ConfigError, match=r"logging\.file: cannot open .*No such file or directory"):
        setup_logging(LoggingConfig(file=str(bad)))


def test_log_access_is_a_no_op_when_disabled() -> None:
    setup_logging(LoggingConfig(enable_console=False, access_log=False))
    log_access("r6", **ACCESS_ARGS)  # nothing installed to receive it, nothing raised


ACCESS_TEXT = (
    rf"{TS} INFO ntonix\.access: access id=r7 method=POST path=/v1/chat/completions "
    r"backend=127\.0\.0\.1:8001 model=- status=200 cache=MISS bytes=612 latency_ms=1\.23 ttfb_ms=0\.80"
)


def test_console_access_line_written_directly(capsys: pytest.CaptureFixture[str]) -> None:
    """The console fast path (no LogRecord) writes the same line the formatter would."""
    setup_logging(LoggingConfig(enable_colors=False))
    log_access("r7", **ACCESS_ARGS)
    log_access('x"\n', **{**ACCESS_ARGS, "ttfb_ms": None, "backend": ""}, model="m", key="team a")
    first, second = capsys.readouterr().err.splitlines()
    assert re.fullmatch(ACCESS_TEXT, first)
    assert ' id="x\\"\\n" ' in second and " backend=- model=m " in second
    assert second.endswith('ttfb_ms=- key="team a"')


def test_console_access_json_and_colours(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    setup_logging(LoggingConfig(format="json"))
    log_access("r8", **ACCESS_ARGS, key="k1")
    obj = json.loads(capsys.readouterr().err)
    assert re.fullmatch(TS, obj.pop("ts"))
    assert obj == {
        "level": "INFO",
        "logger": "ntonix.access",
        "msg": "access",
        "id": "r8",
        "method": "POST",
        "path": "/v1/chat/completions",
        "backend": "127.0.0.1:8001",
        "model": None,
        "status": 200,
        "cache": "MISS",
        "bytes": 612,
        "latency_ms": 1.23,
        "ttfb_ms": 0.8,
        "key": "k1",
    }
    monkeypatch.setenv("FORCE_COLOR", "1")
    setup_logging(LoggingConfig())
    log_access("r9", **ACCESS_ARGS)
    assert "\x1b[32mINFO\x1b[0m ntonix.access: access id=r9 " in capsys.readouterr().err


def test_console_and_file_both_get_access_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging(LoggingConfig(file=str(tmp_path / "ntonix.log"), enable_colors=False))
    log_access("r7", **ACCESS_ARGS)
    assert re.fullmatch(ACCESS_TEXT, capsys.readouterr().err.strip())
    assert [re.fullmatch(ACCESS_TEXT, line) is not None for line in lines(tmp_path / "ntonix.log")] == [True]


def test_foreign_handler_still_sees_access_lines(capsys: pytest.CaptureFixture[str]) -> None:
    """A handler added after setup (a host application's, caplog-like) gets records, not the fast path."""
    setup_logging(LoggingConfig(enable_colors=False))
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    keep = Keep()
    logging.getLogger("ntonix.access").addHandler(keep)
    try:
        log_access("r7", **ACCESS_ARGS)
    finally:
        logging.getLogger("ntonix.access").removeHandler(keep)
    assert [r.getMessage() for r in seen] == ["access"]
    assert re.fullmatch(ACCESS_TEXT, capsys.readouterr().err.strip())  # the console still got it once
    logging.getLogger("ntonix.access").setLevel(logging.CRITICAL)
    log_access("r10", **ACCESS_ARGS)  # switched off behind setup_logging's back: nothing written
    assert capsys.readouterr().err == ""


def test_access_lines_of_one_loop_turn_go_out_together_and_in_order(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """On the event loop, a turn's access lines are written at the next turn, one write for all;
    an application line written meanwhile comes after the access lines logged before it."""
    setup_logging(LoggingConfig(enable_colors=False))
    writes: list[str] = []

    async def scenario() -> list[str]:
        stream = sys.stderr
        original = stream.write

        def counting(text: str) -> int:
            writes.append(text)
            return original(text)

        stream.write = counting  # type: ignore[method-assign]
        try:
            log_access("a1", **ACCESS_ARGS)
            log_access("a2", **ACCESS_ARGS)
            assert writes == []  # nothing yet: the loop has not turned
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            seen = list(writes)
            log_access("a3", **ACCESS_ARGS)
            logging.getLogger("ntonix").warning("after a3")
            return seen
        finally:
            stream.write = original  # type: ignore[method-assign]

    seen = asyncio.run(scenario())
    assert len(seen) == 1 and seen[0].count("\n") == 2 and "id=a1 " in seen[0] and "id=a2 " in seen[0]
    err = capsys.readouterr().err.splitlines()
    assert [line.split(" id=")[1].split()[0] for line in err[:3]] == ["a1", "a2", "a3"]
    assert err[3].endswith("WARNING ntonix: after a3")


def test_access_clock_text_per_millisecond(monkeypatch: pytest.MonkeyPatch) -> None:
    """The access lines' timestamp, memoised per millisecond, follows the clock across ms and seconds."""
    from ntonix import logs

    clock = logs._Clock()
    now = [1764608000.0015]
    monkeypatch.setattr(logs.time, "time", lambda: now[0])
    assert clock.now() == "2025-12-01T16:53:20.001Z"
    now[0] = 1764608000.0019  # same millisecond: the memoised text
    assert clock.now() == "2025-12-01T16:53:20.001Z"
    now[0] = 1764608000.0991
    assert clock.now() == "2025-12-01T16:53:20.099Z"
    now[0] = 1764608001.0991  # next second, same millisecond digits
    assert clock.now() == "2025-12-01T16:53:21.099Z"


def test_pipeline_request_ids_need_no_quoting() -> None:
    """Ids written unquoted (`bare_id`): the ids `client_request_id` keeps or makes are bare."""
    import string

    from ntonix import logs
    from ntonix.pipeline.exchange import client_request_id

    allowed = string.ascii_letters + string.digits + "._:-"  # exchange._VALID_ID's class
    assert client_request_id(allowed) == allowed
    for value in (allowed, client_request_id(None), client_request_id('x"y'), client_request_id("a=b")):
        assert logs._text_value(value) == value
