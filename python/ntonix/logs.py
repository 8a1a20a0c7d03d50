"""Application and access logging for the gateway, on the standard `logging` module.

`setup_logging` configures two loggers from `LoggingConfig`: `ntonix` (the
application, filtered by `level`) and its child `ntonix.access` (one line per
request, switched by `access_log` alone, like nginx's access log next to its
error log). Lines go to stderr (level names coloured on a terminal or with
`FORCE_COLOR`, never with `NO_COLOR`) and, when `file` is set, to a file
rotated by size and count. The text format is
`2026-11-26T04:46:30.123Z INFO ntonix: message` followed by `key=value`
fields; the JSON format writes one object per line with `ts`, `level`,
`logger`, `msg` and the same fields. Values a client controls (request id,
path) are quoted and escaped when needed, so no client can forge a log line.
Calling `setup_logging` again replaces the handlers it installed before.

Access lines are the one per-request cost, so they skip the logging module's per-record
machinery (record, filters, handler locks, formatter) on the console: `log_access` formats the
line itself (timestamp prefix cached per second) and writes it to the console stream, the lines
of one turn of the event loop in one `write` (see `_FastAccess`). The
rotating file, when set, still gets a record (rotation needs it). Any handler added to the
`ntonix` loggers by someone else (a test's, a host application's) sends access lines back
through `logging`, so nothing is lost.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import logging.handlers
import os
import re
import sys
import threading
import time
from typing import IO, Any, Final

import msgspec

from ntonix.config import ConfigError, LoggingConfig

__all__ = ["ACCESS_LOGGER", "APP_LOGGER", "log_access", "setup_logging"]

APP_LOGGER: Final = "ntonix"
ACCESS_LOGGER: Final = "ntonix.access"
_MIB: Final = 1024 * 1024
_FIELDS: Final = "ntonix_fields"  # LogRecord attribute holding structured fields

_app = logging.getLogger(APP_LOGGER)
_access = logging.getLogger(ACCESS_LOGGER)
_installed: list[logging.Handler] = []

_COLOURS: Final = {
    logging.DEBUG: "\x1b[36m",  # cyan
    logging.INFO: "\x1b[32m",  # green
    logging.WARNING: "\x1b[33m",  # yellow
    logging.ERROR: "\x1b[31m",  # red
    logging.CRITICAL: "\x1b[1;31m",  # bold red
}
_RESET: Final = "\x1b[0m"
# The seed's level names: trace logs like debug, warn is warning.
_LEVELS: Final = {"trace": "DEBUG", "warn": "WARNING"}
# Printable ASCII except space, '"', '=' and '\': such a value is written bare, anything else JSON-quoted.
_BARE: Final = re.compile(r"[!#-<>-\[\]-~]+")


def _timestamp(record: logging.LogRecord) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{seconds}.{int(record.msecs):03d}Z"


_memo: dict[str | None, str] = {}  # rendered values of the few-valued fields (method, backend, cache, model)


def _few(value: str | None) -> str:
    """`_text_value` of a field with few distinct values, memoised (bounded: cleared when full)."""
    text = _memo.get(value)
    if text is None:
        if len(_memo) >= 1024:
            _memo.clear()
        text = _memo[value] = _text_value(value)
    return text


# "000" .. "999": the milliseconds of a timestamp (a format spec per line cost ~0.5 µs).
_MILLIS: Final = tuple(f"{ms:03d}" for ms in range(1000))


class _Clock:
    """`_timestamp` of now, the strftime part computed once per second, the whole text once per ms."""

    __slots__ = ("ms", "prefix", "second", "text")

    def __init__(self) -> None:
        self.second = -1
        self.ms = -1
        self.prefix = ""
        self.text = ""

    def now(self) -> str:
        created = time.time()
        key = int(created * 1000)
        if key == self.ms:
            return self.text
        second = int(created)
        if second != self.second:
            self.prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self.second = second
        self.ms = key
        self.text = f"{self.prefix}.{_MILLIS[int((created - second) * 1000)]}Z"
        return self.text


_paths: dict[str, str] = {}  # rendered paths (the routes' few), memoised when short (bounded like `_memo`)


def _path_text(path: str) -> str:
    text = _text_value(path)
    if len(path) <= 128:
        if len(_paths) >= 1024:
            _paths.clear()
        _paths[path] = text
    return text


class _FastAccess:
    """Where `log_access` writes without the logging module: the console stream, set by `setup_logging`.

    NOTE: a `write` + `flush` per line (one write(2) each) was most of the ~10 µs an access line cost.
    Lines written on the event loop are collected and written together at the loop's next turn
    (`call_soon`): one write(2) for every request that finished in the same turn, each line still out
    within about a millisecond. The console handler writes what is pending before any other line, so
    the order of lines is kept; off the loop, a line is written at once.
    """

    __slots__ = ("clock", "handlers", "json", "level", "lock", "pending", "scheduled", "slow", "stream")

    def __init__(self, stream: IO[str], json: bool, colours: bool, handlers: list[logging.Handler]) -> None:
        self.stream = stream
        self.json = json
        self.level = f"{_COLOURS[logging.INFO]}INFO{_RESET}" if colours else "INFO"
        self.handlers = handlers  # exactly what `ntonix` must hold for this path to be taken
        self.slow = [
            h for h in handlers if not isinstance(h, logging.StreamHandler) or h.stream is not stream
        ]
        self.lock = threading.Lock()
        self.clock = _Clock()
        self.pending: list[str] = []
        self.scheduled = False

    def flush(self) -> None:
        """Write the pending access lines in one `write`."""
        self.scheduled = False
        if not self.pending:
            return
        lines, self.pending = self.pending, []
        lines.append("")
        with self.lock:
            try:
                self.stream.write("\n".join(lines))
                self.stream.flush()
            except (OSError, ValueError):  # a closed or broken stderr loses the lines, like logging's
                pass


class _ConsoleHandler(logging.StreamHandler[IO[str]]):
    """The console handler: access lines still pending go out before the line it writes."""

    def emit(self, record: logging.LogRecord) -> None:
        fast = _fast
        if fast is not None and fast.pending:
            fast.flush()
        super().emit(record)


_fast: _FastAccess | None = None


@atexit.register
def _flush_at_exit() -> None:
    if _fast is not None:
        _fast.flush()


def _text_value(value: object) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    text = str(value)
    return text if _BARE.fullmatch(text) else msgspec.json.encode(text).decode()


class TextFormatter(logging.Formatter):
    """`<ts> LEVEL logger: message key=value ...`, level name optionally coloured."""

    def __init__(self, colours: bool = False) -> None:
        super().__init__()
        self.colours = colours

    def format(self, record: logging.LogRecord) -> str:
        level = record.levelname
        if self.colours:
            level = f"{_COLOURS.get(record.levelno, '')}{level}{_RESET}"
        line = f"{_timestamp(record)} {level} {record.name}: {record.getMessage()}"
        fields: dict[str, object] | None = getattr(record, _FIELDS, None)
        if fields:
            line += "".join(f" {key}={_text_value(value)}" for key, value in fields.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, structured fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields: dict[str, object] | None = getattr(record, _FIELDS, None)
        if fields:
            obj.update(fields)
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return msgspec.json.encode(obj, enc_hook=str).decode()


def _wants_colour(cfg: LoggingConfig, stream: IO[str]) -> bool:
    if not cfg.enable_colors:
        return False
    if os.environ.get("FORCE_COLOR", "") not in ("", "0"):
        return True
    if os.environ.get("NO_COLOR"):
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def _console_handler(cfg: LoggingConfig) -> logging.StreamHandler[IO[str]]:
    stream = sys.stderr
    handler = _ConsoleHandler(stream)
    colours = cfg.format == "text" and _wants_colour(cfg, stream)
    handler.setFormatter(TextFormatter(colours) if cfg.format == "text" else JsonFormatter())
    return handler


def _file_handler(cfg: LoggingConfig) -> logging.Handler:
    try:
        handler = logging.handlers.RotatingFileHandler(
            cfg.file,
            maxBytes=max(1, int(cfg.max_file_size_mb * _MIB)),
            backupCount=cfg.max_files,
            encoding="utf-8",
        )
    except OSError as exc:
        raise ConfigError(f"logging.file: cannot open {cfg.file!r}: {exc.strerror or exc}") from None
    handler.setFormatter(TextFormatter() if cfg.format == "text" else JsonFormatter())
    return handler


def setup_logging(cfg: LoggingConfig) -> None:
    """Install the configured handlers on `ntonix`, replacing any this function installed before."""
    global _fast
    console = _console_handler(cfg) if cfg.enable_console else None
    handlers: list[logging.Handler] = [console] if console is not None else []
    if cfg.file:
        handlers.append(_file_handler(cfg))  # raises ConfigError before anything is replaced
    if not handlers:
        handlers.append(logging.NullHandler())  # else logging's last resort would print to stderr
    for old in _installed:
        _app.removeHandler(old)
        old.close()
    _installed[:] = handlers
    for handler in handlers:
        _app.addHandler(handler)
    _app.setLevel(_LEVELS.get(cfg.level, cfg.level.upper()))
    _app.propagate = False  # our lines are formatted here; a root handler would print them twice
    _access.setLevel(logging.INFO if cfg.access_log else logging.CRITICAL + 1)
    _app.disabled = _access.disabled = False  # a dictConfig(disable_existing_loggers=True) may have run
    if _fast is not None:
        _fast.flush()  # lines of the previous set-up go where they were headed
    _fast = None
    if console is not None and cfg.access_log:
        colours = isinstance(console.formatter, TextFormatter) and console.formatter.colours
        _fast = _FastAccess(console.stream, cfg.format == "json", colours, list(handlers))


def log_access(
    request_id: str,
    method: str,
    path: str,
    backend: str,
    status: int,
    cache: str,
    bytes_sent: int,
    latency_ms: float,
    ttfb_ms: float | None,
    model: str | None = None,
    key: str | None = None,
    bare_id: bool = False,
) -> None:
    """Write one access line (`key`: the API key's name, never the key); returns at once when off.

    `bare_id`: the caller vouches that `request_id` needs no quoting (the pipeline's ids: a client's
    only when it is 1-128 of [A-Za-z0-9._:-], else a UUID4; see `pipeline/exchange.py`).
    """
    fast = _fast
    if (
        fast is not None
        and _app.handlers == fast.handlers
        and not (_access.handlers or _access.disabled or _app.propagate)
    ):
        # switched off (or retuned) by someone other than setup_logging
        if _access.level != logging.INFO and not _access.isEnabledFor(logging.INFO):
            return
        if fast.json:
            obj: dict[str, Any] = {"ts": fast.clock.now(), "level": "INFO", "logger": ACCESS_LOGGER}
            obj["msg"] = "access"
            obj.update(
                _access_fields(
                    request_id,
                    method,
                    path,
                    backend,
                    status,
                    cache,
                    bytes_sent,
                    latency_ms,
                    ttfb_ms,
                    model,
                    key,
                )
            )
            line = msgspec.json.encode(obj, enc_hook=str).decode()
        else:
            memo = _memo  # the few-valued fields' memo, looked up inline (a call each cost ~0.1 µs)
            rid = request_id if bare_id else _text_value(request_id)
            line = (
                f"{fast.clock.now()} {fast.level} {ACCESS_LOGGER}: access id={rid} "
                f"method={memo.get(method) or _few(method)} path={_paths.get(path) or _path_text(path)} "
                f"backend={memo.get(backend) or _few(backend)} model={memo.get(model) or _few(model)} "
                f"status={status} cache={memo.get(cache) or _few(cache)} bytes={bytes_sent} "
                f"latency_ms={latency_ms:.2f} ttfb_ms={'-' if ttfb_ms is None else f'{ttfb_ms:.2f}'}"
            )
            if key is not None:
                line += f" key={_text_value(key)}"
        fast.pending.append(line)
        if not fast.scheduled:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # not on the event loop: written at once
                fast.flush()
            else:
                fast.scheduled = True
                loop.call_soon(fast.flush)
        if not fast.slow:
            return
        record = _access.makeRecord(
            ACCESS_LOGGER,
            logging.INFO,
            "",
            0,
            "access",
            (),
            None,
            extra={
                _FIELDS: _access_fields(
                    request_id,
                    method,
                    path,
                    backend,
                    status,
                    cache,
                    bytes_sent,
                    latency_ms,
                    ttfb_ms,
                    model,
                    key,
                )
            },
        )
        for handler in fast.slow:
            handler.handle(record)
        return
    if not _access.isEnabledFor(logging.INFO):
        return
    fields = _access_fields(
        request_id, method, path, backend, status, cache, bytes_sent, latency_ms, ttfb_ms, model, key
    )
    # makeRecord + handle skips Logger._log's stack walk for the caller's file and line.
    record = _access.makeRecord(
        ACCESS_LOGGER, logging.INFO, "", 0, "access", (), None, extra={_FIELDS: fields}
    )
    _access.handle(record)


def _access_fields(
    request_id: str,
    method: str,
    path: str,
    backend: str,
    status: int,
    cache: str,
    bytes_sent: int,
    latency_ms: float,
    ttfb_ms: float | None,
    model: str | None,
    key: str | None,
) -> dict[str, object]:
    fields: dict[str, object] = {
        "id": request_id,
        "method": method,
        "path": path,
        "backend": backend,
        "model": model,
        "status": status,
        "cache": cache,
        "bytes": bytes_sent,
        "latency_ms": round(latency_ms, 2),
        "ttfb_ms": None if ttfb_ms is None else round(ttfb_ms, 2),
    }
    if key is not None:
        fields["key"] = key
    return fields
