"""Structured logging for the daemon: console for people, JSON for machines."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

__all__ = ["configure", "errors_logged", "get_logger"]

_errors = 0


def _count_errors(logger: Any, method: str, event: Any) -> Any:
    """Count error-level events: the daemon reports the count in its status."""
    global _errors
    if method in ("error", "critical", "exception"):
        _errors += 1
    return event


def errors_logged() -> int:
    return _errors


def configure(fmt: str = "console", level: str = "info", stream: Any = None) -> None:
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            _count_errors,
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=True,
    )


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
