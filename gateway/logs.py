"""Logging set-up: structlog events, JSON lines in production, console in a terminal."""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import sys
import time
from collections.abc import MutableMapping
from typing import Any, TextIO

import orjson
import structlog

# Keys whose values are credentials. A processor replaces them wherever they
# appear, as a second line of defence; the gateway never passes them anyway.
SECRET_FIELDS = frozenset(
    {"authorization", "credential", "jwt", "key", "password", "secret", "token"}
)
REDACTED = "[redacted]"


def redact_secrets(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for name in event_dict.keys() & SECRET_FIELDS:
        event_dict[name] = REDACTED
    return event_dict


# Largest write to a pipe that POSIX guarantees to be atomic on Linux.
PIPE_BUF = 4096
# Seconds a buffered line may wait before it is written.
FLUSH_INTERVAL = 0.05


class LineLogger:
    """Write events as lines, batched into writes of at most PIPE_BUF bytes.

    Worker processes of ``serve --workers N`` share standard output, and a
    write of at most PIPE_BUF bytes to a pipe is atomic, so lines from
    different processes never interleave mid-line. Inside a running event loop
    lines are batched for up to FLUSH_INTERVAL seconds, which saves a system
    call per request; a process killed with SIGKILL loses at most that much.
    """

    def __init__(self, stream: TextIO):
        self._stream = stream
        self._pending = bytearray()
        self._timer: asyncio.TimerHandle | None = None
        try:
            self._fd: int | None = stream.fileno()
        except (AttributeError, OSError, ValueError):
            self._fd = None

    def msg(self, message: str | bytes) -> None:
        data = message if isinstance(message, bytes) else message.encode()
        self.write_line(data + b"\n")

    def write_line(self, data: bytes) -> None:
        """Write ``data``, one or more whole lines each ending with a newline."""
        if self._fd is None:
            self._stream.write(data.decode())
            return
        if len(self._pending) + len(data) > PIPE_BUF:
            self.flush()
        if len(data) > PIPE_BUF:
            self._write(data)
            return
        self._pending += data
        if self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._timer = loop.call_later(FLUSH_INTERVAL, self.flush)

    log = debug = info = warn = warning = error = critical = exception = msg

    def flush(self) -> None:
        """Write every buffered line now."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._pending:
            data = bytes(self._pending)
            self._pending.clear()
            self._write(data)

    def _write(self, data: bytes) -> None:
        if self._fd is None:
            self._stream.write(data.decode())
            return
        self._stream.flush()
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]


class Timestamps:
    """ISO 8601 UTC timestamps in milliseconds, each text made once.

    A busy gateway logs many lines per millisecond, so the last timestamp is
    kept, and the part up to the second is kept as well.
    """

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""
        self._millisecond = -1
        self._text = ""

    def now(self) -> str:
        now = time.time()
        millisecond = int(now * 1000)
        if millisecond == self._millisecond:
            return self._text
        second, fraction = divmod(millisecond, 1000)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        self._millisecond = millisecond
        self._text = f"{self._prefix}.{fraction:03d}Z"
        return self._text

    def processor(
        self, logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        """Add the ``timestamp`` field: a structlog processor."""
        event_dict["timestamp"] = self.now()
        return event_dict


class _JsonLines:
    """The JSON line output that ``configure_logging`` set up, for ``log_info``."""

    def __init__(self, line_logger: LineLogger, level: int, timestamps: Timestamps):
        self.line_logger = line_logger
        self.level = level
        self.timestamps = timestamps


_json_lines: _JsonLines | None = None


def info_enabled() -> bool:
    """Return whether info events are logged, to skip preparing those that are not."""
    output = _json_lines
    return output is None or output.level <= logging.INFO


def log_info(logger: Any, event: str, fields: dict[str, Any]) -> None:
    """Log an info event, rendered without structlog's chain when output is JSON.

    The line is the one the configured processors would write: the fields,
    then ``event``, ``level`` and ``timestamp``, with secret fields redacted.
    Context variables are not merged in; the gateway binds none.
    It costs about a quarter as much, which matters once per request.
    ``fields`` is changed in place.
    """
    output = _json_lines
    if output is None:
        logger.info(event, **fields)
        return
    if output.level > logging.INFO:
        return
    fields["event"] = event
    fields["level"] = "info"
    fields["timestamp"] = output.timestamps.now()
    if not SECRET_FIELDS.isdisjoint(fields):
        redact_secrets(logger, "info", fields)
    output.line_logger.write_line(
        orjson.dumps(fields, default=str, option=orjson.OPT_APPEND_NEWLINE)
    )


def configure_logging(
    level: str = "info",
    fmt: str = "json",
    stream: TextIO | None = None,
    cache: bool = True,
) -> None:
    """Configure structlog once at start-up.

    ``cache=False`` lets a later call take effect on loggers already in use,
    which tests rely on.
    """
    global _json_lines  # noqa: PLW0603 - the one logging set-up of the process
    line_logger = LineLogger(stream or sys.stdout)
    atexit.register(line_logger.flush)
    timestamps = Timestamps()
    level_number = logging.getLevelNamesMapping()[level.upper()]
    renderer: Any
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(
            colors=False, exception_formatter=structlog.dev.plain_traceback
        )
    else:
        renderer = structlog.processors.JSONRenderer(serializer=orjson.dumps)
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        timestamps.processor,
        redact_secrets,
    ]
    if fmt != "console":
        # Plain text tracebacks: no local variables, which could hold a token.
        processors.append(structlog.processors.format_exc_info)
    processors.append(renderer)
    _json_lines = None
    if fmt != "console":
        _json_lines = _JsonLines(line_logger, level_number, timestamps)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level_number),
        logger_factory=lambda *args: line_logger,
        cache_logger_on_first_use=cache,
    )
    # aiohttp and redis log through the standard library; keep their warnings.
    logging.basicConfig(level=logging.WARNING, stream=stream or sys.stderr)
