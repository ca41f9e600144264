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
        data += b"\n"
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


def _timestamp_processor() -> Any:
    """Return a processor adding an ISO 8601 UTC ``timestamp`` in milliseconds.

    The date and time up to the second are formatted once per second.
    """
    cached_second = -1
    cached_prefix = ""

    def add_timestamp(
        logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        nonlocal cached_second, cached_prefix
        now = time.time()
        second = int(now)
        if second != cached_second:
            cached_second = second
            cached_prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        event_dict["timestamp"] = f"{cached_prefix}.{int((now - second) * 1000):03d}Z"
        return event_dict

    return add_timestamp


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
    line_logger = LineLogger(stream or sys.stdout)
    atexit.register(line_logger.flush)
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
        _timestamp_processor(),
        redact_secrets,
    ]
    if fmt != "console":
        # Plain text tracebacks: no local variables, which could hold a token.
        processors.append(structlog.processors.format_exc_info)
    processors.append(renderer)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=lambda *args: line_logger,
        cache_logger_on_first_use=cache,
    )
    # aiohttp and redis log through the standard library; keep their warnings.
    logging.basicConfig(level=logging.WARNING, stream=stream or sys.stderr)
