"""Logging set-up: structlog events, JSON lines in production, console in a terminal."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

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
        renderer = structlog.processors.JSONRenderer()
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
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stdout),
        cache_logger_on_first_use=cache,
    )
    # aiohttp and redis log through the standard library; keep their warnings.
    logging.basicConfig(level=logging.WARNING, stream=stream or sys.stderr)
