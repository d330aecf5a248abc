"""The daemon's own event-loop lag measurement."""

from __future__ import annotations

import asyncio
import time

from vbus.loopmon import LoopMonitor


async def test_a_blocking_callback_shows_up_as_lag() -> None:
    loop = asyncio.get_running_loop()
    monitor = LoopMonitor(loop, interval=0.01, window=100)
    monitor.start()
    try:
        await asyncio.sleep(0.1)
        quiet = monitor.percentile(0.5)
        time.sleep(0.2)  # hold the loop, as a slow callback would
        await asyncio.sleep(0.05)
        assert monitor.worst >= 0.15
        assert quiet < 0.15
        assert monitor.percentile(1.0) == max(monitor.samples)
    finally:
        monitor.stop()
    count = len(monitor.samples)
    await asyncio.sleep(0.05)
    assert len(monitor.samples) == count  # stopped


def test_empty_window_reports_zero() -> None:
    loop = asyncio.new_event_loop()
    try:
        assert LoopMonitor(loop).percentile(0.99) == 0.0
    finally:
        loop.close()
