"""How late the event loop runs: the daemon measures its own lag.

A timer asks to run every ``interval`` seconds; how much later than asked it
actually runs is the time some callback held the loop.  Measured with
``time.monotonic`` (uvloop's own clock has millisecond steps; its timers do
too, so about 1 ms of lateness is the floor there).  The last samples are
kept in a bounded window for percentiles; the worst one is kept since start.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

__all__ = ["LoopMonitor"]


class LoopMonitor:
    def __init__(
        self, loop: asyncio.AbstractEventLoop, interval: float = 0.05, window: int = 1200
    ) -> None:
        self.loop = loop
        self.interval = interval
        self.samples: deque[float] = deque(maxlen=window)
        self.worst = 0.0
        self._due = 0.0
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._due = time.monotonic() + self.interval
        self._handle = self.loop.call_later(self.interval, self._tick)

    def _tick(self) -> None:
        now = time.monotonic()
        lag = max(0.0, now - self._due)
        self.samples.append(lag)
        if lag > self.worst:
            self.worst = lag
        self._due = now + self.interval
        self._handle = self.loop.call_later(self.interval, self._tick)

    def percentile(self, fraction: float) -> float:
        """Lag in seconds at ``fraction`` (0..1) of the recent window."""
        if not self.samples:
            return 0.0
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
