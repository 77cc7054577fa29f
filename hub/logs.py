"""structlog setup: key=value in a terminal, JSON in production."""

from __future__ import annotations

import logging
import sys

import structlog

_configured: tuple[str, int] | None = None


def configured() -> tuple[str, int] | None:
    """The format and level set by ``configure`` (None: structlog's defaults), for a
    child process that should log the same way."""
    return _configured


def configure(fmt: str = "console", level: int = logging.INFO) -> None:
    global _configured
    _configured = (fmt, level)
    renderer: structlog.typing.Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
