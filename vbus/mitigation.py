"""NAPI-style signal mitigation (docs/design.md 3.4), south and north.

South: a ``NapiPoller`` owns the wake-ups of one pollable (a device session
with its queues).  On a signal it disables notifications, drains up to a
budget, yields to the event loop when the budget runs out (fairness between
connections), and otherwise re-enables, fences and re-checks: if work slipped
in meanwhile it polls again instead of sleeping.  A misbehaving north can at
worst keep its own poller busy one budget per loop iteration.  The pollers of
a loop share a ``PollGroup``: round robin, and a time slice per iteration, so
that many busy connections together cannot hold the loop either.

North: ``wait_for_work`` is the same handshake for the client library:
arm, fence, re-check, then sleep on the transport.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from vbus.errors import Fault
from vbus.signal import ShmSignal, Transport

__all__ = [
    "DEFAULT_BUDGET",
    "DEFAULT_SLICE",
    "NapiPoller",
    "PollGroup",
    "Pollable",
    "PollerStats",
    "wait_for_work",
]

DEFAULT_BUDGET = 256  # messages per poll
DEFAULT_SLICE = 0.001  # seconds of polling per loop iteration, all pollers together
# Wake-ups in a row whose transport yielded nothing: the descriptor stays
# readable without progress (the north drains it first, or worse): a fault.
EMPTY_WAKEUPS = 1024


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


class PollGroup:
    """Shares one event loop's time between the pollers that have work.

    Ready pollers wait in a round-robin queue; one loop callback polls them in
    turn, each at most once per loop iteration, and stops early when its time
    slice is spent, so that timers, sockets and the other callbacks of the
    loop run at least every ``time_slice`` seconds however many connections
    stream at once (the ``netdev_budget_usecs`` of Linux's NAPI).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, time_slice: float = DEFAULT_SLICE) -> None:
        self.loop = loop
        self.time_slice = time_slice
        self.slices_cut = 0  # loop iterations that ran out of time before every poller had its turn
        self._ready: deque[NapiPoller] = deque()
        self._handle: asyncio.Handle | None = None

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> PollGroup:
        """The loop's default group (made on first use)."""
        group = _GROUPS.get(loop)
        if group is None:
            group = _GROUPS[loop] = cls(loop)
        return group

    def add(self, poller: NapiPoller) -> None:
        self._ready.append(poller)
        if self._handle is None:
            self._handle = self.loop.call_soon(self._run)

    def _run(self) -> None:
        ready = self._ready
        clock = time.perf_counter
        deadline = clock() + self.time_slice
        for _ in range(len(ready)):
            poller = ready.popleft()
            if poller._poll():
                ready.append(poller)
            if clock() >= deadline:
                if ready:
                    self.slices_cut += 1
                break
        self._handle = self.loop.call_soon(self._run) if ready else None


_GROUPS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, PollGroup] = (
    weakref.WeakKeyDictionary()
)


class NapiPoller:
    """Drives one ``Pollable`` from the event loop; never blocks, never raises into it.

    ``on_error`` receives any exception from the pollable (a ``Fault`` from a
    bad ring, or a device bug) after the poller has stopped itself.  Polls run
    from a ``PollGroup`` (the loop's own unless given), one per loop iteration.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        target: Pollable,
        on_error: Callable[[BaseException], None],
        budget: int = DEFAULT_BUDGET,
        group: PollGroup | None = None,
    ) -> None:
        self.loop = loop
        self.target = target
        self.budget = budget
        self.stats = PollerStats()
        self.group = group if group is not None else PollGroup.of(loop)
        self._on_error = on_error
        self._transports: list[Transport] = []
        self._scheduled = False
        self._closed = False
        self._empty = 0  # wake-ups in a row that found nothing to drain

    def watch(self, transport: Transport) -> None:
        """Wake up when the north kicks ``transport``."""
        self._transports.append(transport)
        self.loop.add_reader(transport.fd, self._on_signal, transport)

    def _on_signal(self, transport: Transport) -> None:
        try:
            if transport.drain():
                self._empty = 0
            else:
                self._empty += 1
                if self._empty >= EMPTY_WAKEUPS:
                    raise Fault(
                        f"kick descriptor readable {self._empty} times in a row "
                        "with nothing to read"
                    )
        except Exception as exc:
            self.close()
            self._on_error(exc)
            return
        self.stats.wakeups += 1
        if not self._scheduled:
            self.schedule()

    def schedule(self) -> None:
        """Poll soon (also used after registration, in case work is already there)."""
        if self._closed or self._scheduled:
            return
        self._scheduled = True
        self.group.add(self)

    def _poll(self) -> bool:
        """One poll, from the group; True to be polled again (next iteration)."""
        if self._closed:
            return False
        target = self.target
        try:
            target.quiesce()
            self.stats.polls += 1
            if target.poll(self.budget) >= self.budget:
                # Others get their turn first: back to the end of the queue.
                self.stats.budget_exhausted += 1
                return True
            if target.rearm():
                # Work slipped in between the drain and the re-enable.
                self.stats.rechecks += 1
                return True
        except Exception as exc:  # a fault of this north context, or a device bug
            self.close()
            self._on_error(exc)
            return False
        self._scheduled = False
        return False

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._scheduled = False  # a queued turn finds it closed and drops it
        for transport in self._transports:
            if transport.fd >= 0:
                self.loop.remove_reader(transport.fd)
        self._transports.clear()


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def wait_for_work(
    signal: ShmSignal, has_work: Callable[[], bool], transport: Transport
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
