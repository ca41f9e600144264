"""Logging set-up: structlog events, JSON lines in production, console in a terminal."""

from __future__ import annotations

import logging
import os
import sys
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


class LineLogger:
    """Write each event as one line with a single write call.

    Worker processes of ``serve --workers N`` share standard output; a single
    write of at most PIPE_BUF bytes (4096 on Linux) to a pipe is atomic, so
    lines from different processes never interleave mid-line.
    """

    def __init__(self, stream: TextIO):
        self._stream = stream
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
        self._stream.flush()
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]

    log = debug = info = warn = warning = error = critical = exception = msg


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
        structlog.processors.TimeStamper(fmt="iso", utc=True),
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
        logger_factory=lambda *args: LineLogger(stream or sys.stdout),
        cache_logger_on_first_use=cache,
    )
    # aiohttp and redis log through the standard library; keep their warnings.
    logging.basicConfig(level=logging.WARNING, stream=stream or sys.stderr)
