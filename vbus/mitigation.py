"""NAPI-style signal mitigation (DESIGN.md 3.4), south and north.

South: a ``NapiPoller`` owns the wake-ups of one pollable (a device session
with its queues).  On a signal it disables notifications, drains up to a
budget, yields to the event loop when the budget runs out (fairness between
connections), and otherwise re-enables, fences and re-checks: if work slipped
in meanwhile it polls again instead of sleeping.  A misbehaving north can at
worst keep its own poller busy one budget per loop iteration.

North: ``wait_for_work`` is the same handshake for the client library:
arm, fence, re-check, then sleep on the transport.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from vbus.signal import EventfdTransport, ShmSignal

__all__ = ["DEFAULT_BUDGET", "NapiPoller", "Pollable", "PollerStats", "wait_for_work"]

DEFAULT_BUDGET = 256


class Pollable(Protocol):
    def quiesce(self) -> None:
        """Disable notifications (and take what was pending) before polling."""
        ...

    def poll(self, budget: int) -> int:
        """Do at most ``budget`` units of work; return how many were done."""
        ...

    def rearm(self) -> bool:
        """Re-enable notifications, fenced; True if work is already pending."""
        ...


@dataclass(slots=True)
class PollerStats:
    wakeups: int = 0  # transport signals that woke the poller
    polls: int = 0
    budget_exhausted: int = 0  # polls that used the whole budget and yielded
    rechecks: int = 0  # re-enables that found work already pending

    def as_dict(self) -> dict[str, int]:
        return {
            "wakeups": self.wakeups,
            "polls": self.polls,
            "budget_exhausted": self.budget_exhausted,
            "rechecks": self.rechecks,
        }


class NapiPoller:
    """Drives one ``Pollable`` from the event loop; never blocks, never raises into it.

    ``on_error`` receives any exception from the pollable (a ``Fault`` from a
    bad ring, or a device bug) after the poller has stopped itself.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        target: Pollable,
        on_error: Callable[[BaseException], None],
        budget: int = DEFAULT_BUDGET,
    ) -> None:
        self.loop = loop
        self.target = target
        self.budget = budget
        self.stats = PollerStats()
        self._on_error = on_error
        self._transports: list[EventfdTransport] = []
        self._scheduled = False
        self._closed = False
        self._handle: asyncio.Handle | None = None

    def watch(self, transport: EventfdTransport) -> None:
        """Wake up when the north kicks ``transport``."""
        self._transports.append(transport)
        self.loop.add_reader(transport.fd, self._on_signal, transport)

    def _on_signal(self, transport: EventfdTransport) -> None:
        transport.drain()
        self.stats.wakeups += 1
        if not self._scheduled:
            self.schedule()

    def schedule(self) -> None:
        """Poll soon (also used after registration, in case work is already there)."""
        if self._closed or self._scheduled:
            return
        self._scheduled = True
        self._handle = self.loop.call_soon(self._poll)

    def _poll(self) -> None:
        self._handle = None
        if self._closed:
            return
        target = self.target
        try:
            target.quiesce()
            self.stats.polls += 1
            if target.poll(self.budget) >= self.budget:
                # Yield to the loop: other connections get their turn.
                self.stats.budget_exhausted += 1
                self._handle = self.loop.call_soon(self._poll)
            elif target.rearm():
                # Work slipped in between the drain and the re-enable.
                self.stats.rechecks += 1
                self._handle = self.loop.call_soon(self._poll)
            else:
                self._scheduled = False
        except Exception as exc:  # a fault of this north context, or a device bug
            self.close()
            self._on_error(exc)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._scheduled = False
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        for transport in self._transports:
            if transport.fd >= 0:
                self.loop.remove_reader(transport.fd)
        self._transports.clear()


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def wait_for_work(
    signal: ShmSignal, has_work: Callable[[], bool], transport: EventfdTransport
) -> None:
    """North side: sleep until ``has_work()`` (arm, fence, re-check, then wait).

    Returns with the signal disarmed: the caller polls without being woken.
    """
    loop = asyncio.get_running_loop()
    while True:
        signal.arm()
        if has_work():
            signal.disarm()
            return
        ready = loop.create_future()
        loop.add_reader(transport.fd, _resolve, ready)
        try:
            await ready
        finally:
            if transport.fd >= 0:  # a closed transport was unregistered by its owner
                loop.remove_reader(transport.fd)
        transport.drain()
        signal.disarm()
        if has_work():
            return
