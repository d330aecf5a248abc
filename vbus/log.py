"""Structured logging for the daemon: console for people, JSON for machines.

Whatever happens to the log's destination, logging never stops the daemon:
lines are handed to a writer thread through a bounded queue, so a pipe
nobody reads (full) blocks only that thread, and a sink that is gone (EPIPE,
a closed terminal's EIO) is given up.  Lines that do not fit are dropped and
counted; no call of ``log.info(...)`` ever blocks, or raises.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import structlog

__all__ = ["LogSink", "configure", "errors_logged", "flush", "get_logger"]

_errors = 0
# Lines waiting for the writer: enough to ride out a slow reader's hiccup;
# past it lines are dropped (and counted) rather than held in memory.
QUEUE_LINES = 4096


def _count_errors(logger: Any, method: str, event: Any) -> Any:
    """Count error-level events: the daemon reports the count in its status."""
    global _errors
    if method in ("error", "critical", "exception"):
        _errors += 1
    return event


def errors_logged() -> int:
    return _errors


class LogSink:
    """Writes finished lines to a file descriptor from a thread of its own."""

    def __init__(self, fd: int, max_lines: int = QUEUE_LINES) -> None:
        self.fd = fd
        self.dropped = 0  # lines that found the queue full, or the sink gone
        self.dead: str | None = None  # why writing stopped for good
        self._lines: queue.Queue[bytes | None] = queue.Queue(max_lines)
        self._thread = threading.Thread(target=self._run, name="vbus-log", daemon=True)
        self._thread.start()

    def put(self, line: str) -> None:
        if self.dead is not None:
            self.dropped += 1
            return
        try:
            self._lines.put_nowait(line.encode("utf-8", "replace") + b"\n")
        except queue.Full:
            self.dropped += 1

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for queued lines to be written; True if they were."""
        deadline = time.monotonic() + timeout
        done = self._lines.all_tasks_done
        with done:
            while self._lines.unfinished_tasks and self.dead is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                done.wait(min(remaining, 0.1))
        return self.dead is None

    def close(self, timeout: float = 1.0) -> None:
        self.flush(timeout)
        with contextlib.suppress(queue.Full):
            self._lines.put_nowait(None)

    def _run(self) -> None:
        reported = 0
        while True:
            line = self._lines.get()
            try:
                if line is None:
                    return
                if self.dropped != reported:
                    # Say how much is missing before going on, so a reader knows.
                    note = f"log.lines_dropped count={self.dropped - reported}\n".encode()
                    reported = self.dropped
                    if not self._write(note):
                        return
                if not self._write(line):
                    self.dropped += 1
                    return
            finally:
                self._lines.task_done()

    def _write(self, data: bytes) -> bool:
        view = memoryview(data)
        while view:
            try:
                written = os.write(self.fd, view)
            except InterruptedError:
                continue
            except OSError as exc:  # EPIPE, EIO (terminal gone), EBADF, ENOSPC ...
                self.dead = exc.strerror or type(exc).__name__
                self._drain()
                return False
            view = view[written:]
        return True

    def _drain(self) -> None:
        """The sink is gone: count what was queued, and let ``flush`` return."""
        while True:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                return
            if line is not None:
                self.dropped += 1
            self._lines.task_done()


class _SinkLogger:
    """The logger structlog hands rendered lines to."""

    def msg(self, message: str) -> None:
        if _sink is not None:
            _sink.put(message)

    debug = info = warning = warn = error = critical = exception = fatal = log = msg


_sink: LogSink | None = None


def _guarded(processors: list[Callable[..., Any]]) -> Callable[..., Any]:
    """Run the processor chain; a value that will not render costs the line its
    details, never the caller an exception."""

    def render(logger: Any, method: str, event: Any) -> Any:
        try:
            for processor in processors:
                event = processor(logger, method, event)
            return event
        except Exception as exc:
            return f"log.render_failed event={event.get('event')!r} error={type(exc).__name__}"

    return render


def configure(fmt: str = "console", level: str = "info", stream: Any = None) -> None:
    """Log ``level`` and above as ``fmt`` lines to ``stream`` (default: stderr)."""
    global _sink
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    if _sink is not None:
        _sink.close(timeout=0.5)
    _sink = LogSink(_fileno(stream if stream is not None else sys.stderr))
    structlog.configure(
        processors=[
            _count_errors,
            _guarded(
                [
                    structlog.contextvars.merge_contextvars,
                    structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso", utc=True),
                    structlog.processors.format_exc_info,
                    renderer,
                ]
            ),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=lambda *args: _SinkLogger(),
        cache_logger_on_first_use=True,
    )


def _fileno(stream: Any) -> int:
    """The stream's descriptor; 2 when there is none (started with stderr closed:
    the first write then fails, and the sink is given up)."""
    try:
        return int(stream.fileno())
    except (AttributeError, ValueError, OSError):
        return 2


def flush(timeout: float = 1.0) -> None:
    """Give the writer up to ``timeout`` s to write what is queued (at exit)."""
    if _sink is not None:
        _sink.flush(timeout)


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
