"""vbus.mitigation: the NAPI poller on a real event loop, and the north's wait_for_work.

Every await is bounded (``asyncio.wait_for(..., 5)``) and every test runs with a
loop exception handler that records: an error escaping into the loop is a failure.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest

from vbus.errors import Fault
from vbus.mitigation import EMPTY_WAKEUPS, NapiPoller, PollGroup, wait_for_work
from vbus.signal import NORTH, SIGNAL_SIZE, SOUTH, EventfdTransport, ShmSignal

T = TypeVar("T")
TIMEOUT = 5.0
BUDGET = 8


async def bounded(aw: Awaitable[T]) -> T:
    return await asyncio.wait_for(aw, timeout=TIMEOUT)


async def spin(n: int = 20) -> None:
    """Let the loop run ``n`` iterations (call_soon'd callbacks included)."""
    for _ in range(n):
        await asyncio.sleep(0)


async def until(predicate: Callable[[], bool]) -> None:
    async def poll() -> None:
        while not predicate():
            await asyncio.sleep(0.001)

    await bounded(poll())


class FakeTarget:
    """A ``Pollable`` that follows a script and records what the poller did."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        polls: list[int] | None = None,
        rearms: list[bool] | None = None,
    ) -> None:
        self.loop = loop
        self.script = list(polls or [])
        self.rearms = list(rearms or [])
        self.events: list[str] = []
        self.fail: BaseException | None = None
        self.on_poll: Callable[[], None] | None = None

    def quiesce(self) -> None:
        self.events.append("quiesce")

    def poll(self, budget: int) -> int:
        self.events.append(f"poll({budget})")
        if self.on_poll is not None:
            self.on_poll()
        if self.fail is not None:
            raise self.fail
        return self.script.pop(0) if self.script else 0

    def rearm(self) -> bool:
        self.events.append("rearm")
        return self.rearms.pop(0) if self.rearms else False

    @property
    def polls(self) -> int:
        return sum(e.startswith("poll") for e in self.events)


@pytest.fixture
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """Records every call of the loop's exception handler; the test fails if any."""
    loop = asyncio.get_running_loop()
    seen: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: seen.append(context))
    yield seen
    loop.set_exception_handler(previous)
    assert seen == [], f"errors reached the event loop: {seen}"


@pytest.fixture
def transport() -> Iterator[EventfdTransport]:
    t = EventfdTransport.create()
    yield t
    t.close()


class Harness:
    def __init__(self, target: FakeTarget, transport: EventfdTransport) -> None:
        self.errors: list[BaseException] = []
        self.target = target
        self.transport = transport
        self.poller = NapiPoller(target.loop, target, self.errors.append, budget=BUDGET)
        self.poller.watch(transport)

    async def kick_is_ignored(self) -> bool:
        """Whether a kick now goes unnoticed: no reader drains the eventfd any more."""
        wakeups = self.poller.stats.wakeups
        self.transport.kick()
        await bounded(asyncio.sleep(0.05))
        return self.transport.drain() == 1 and self.poller.stats.wakeups == wakeups


def still_watched(fd: int) -> bool:
    """Whether the running loop has a reader on ``fd`` (removing it).

    asyncio answers; uvloop's ``remove_reader`` returns None, read as "no": the
    asyncio pass of ``make test`` makes the check.
    """
    return bool(asyncio.get_running_loop().remove_reader(fd))


@pytest.fixture
async def harness(
    transport: EventfdTransport, loop_errors: list[dict[str, Any]]
) -> AsyncIterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def make(**kwargs: Any) -> Harness:
        h = Harness(FakeTarget(asyncio.get_running_loop(), **kwargs), transport)
        made.append(h)
        return h

    yield make
    for h in made:
        h.poller.close()


# --- NapiPoller ---------------------------------------------------------------------


async def test_a_kick_wakes_the_poller(harness: Callable[..., Harness]) -> None:
    h = harness(polls=[3])
    await spin()
    assert h.target.events == []  # nothing happens without a signal
    h.transport.kick()
    await until(lambda: "rearm" in h.target.events)
    assert h.target.events == ["quiesce", f"poll({BUDGET})", "rearm"]
    assert h.poller.stats.wakeups == 1 and h.poller.stats.polls == 1
    assert h.transport.drain() == 0  # the poller consumed the kick
    await spin()
    assert h.target.polls == 1  # rearm said no work: it sleeps
    h.transport.kick()  # and wakes again on the next signal
    await until(lambda: h.target.polls == 2)
    assert h.poller.stats.wakeups == 2


async def test_schedule_polls_without_a_signal(harness: Callable[..., Harness]) -> None:
    h = harness()
    h.poller.schedule()
    h.poller.schedule()  # already scheduled: still one poll
    await until(lambda: "rearm" in h.target.events)
    await spin()
    assert h.target.polls == 1
    assert h.poller.stats.wakeups == 0


async def test_exhausted_budget_yields_to_the_loop(harness: Callable[..., Harness]) -> None:
    h = harness(polls=[BUDGET, BUDGET, 1])
    loop = asyncio.get_running_loop()

    def on_poll() -> None:
        # Another connection's callback, queued while this poll runs: it must get
        # its turn before the poller polls again.
        if h.target.polls <= 2:
            loop.call_soon(h.target.events.append, "other")

    h.target.on_poll = on_poll
    h.transport.kick()
    await until(lambda: "rearm" in h.target.events)
    assert h.target.events == [
        "quiesce",
        f"poll({BUDGET})",
        "other",
        "quiesce",
        f"poll({BUDGET})",
        "other",
        "quiesce",
        f"poll({BUDGET})",
        "rearm",
    ]
    assert h.poller.stats.budget_exhausted == 2 and h.poller.stats.polls == 3


async def test_rearm_finding_work_polls_again(harness: Callable[..., Harness]) -> None:
    h = harness(polls=[2, 1, 0], rearms=[True, True, False])
    h.transport.kick()
    await until(lambda: h.target.events.count("rearm") == 3)
    await spin()
    assert h.target.events == ["quiesce", f"poll({BUDGET})", "rearm"] * 3
    assert h.poller.stats.rechecks == 2 and h.poller.stats.polls == 3


async def test_rearm_without_work_stops_polling(harness: Callable[..., Harness]) -> None:
    h = harness(polls=[1])
    h.transport.kick()
    await until(lambda: "rearm" in h.target.events)
    await bounded(asyncio.sleep(0.05))
    assert h.target.polls == 1
    assert h.poller.stats.rechecks == 0


async def test_an_exception_in_poll_stops_the_poller(
    harness: Callable[..., Harness], loop_errors: list[dict[str, Any]]
) -> None:
    h = harness(polls=[BUDGET])  # an exhausted budget first: a poll is scheduled
    boom = RuntimeError("device bug")

    def fail_second_time() -> None:
        if h.target.polls == 2:
            h.target.fail = boom

    h.target.on_poll = fail_second_time
    h.transport.kick()
    await until(lambda: bool(h.errors))
    await spin()
    assert h.errors == [boom]  # exactly once, that very exception
    assert h.target.polls == 2
    assert await h.kick_is_ignored()  # the eventfd is no longer watched
    assert not still_watched(h.transport.fd)
    h.poller.schedule()  # closed: does nothing
    await bounded(asyncio.sleep(0.05))
    assert h.target.polls == 2
    assert h.errors == [boom]
    assert loop_errors == []  # never reached the loop's exception handler


@pytest.mark.parametrize("where", ["quiesce", "rearm"])
async def test_an_exception_anywhere_in_the_poll_is_contained(
    harness: Callable[..., Harness], where: str
) -> None:
    h = harness()
    boom = ValueError(where)

    def explode(*_args: object) -> Any:
        raise boom

    setattr(h.target, where, explode)
    h.transport.kick()
    await until(lambda: bool(h.errors))
    await spin()
    assert h.errors == [boom]
    assert await h.kick_is_ignored()


async def test_close_is_idempotent_and_cancels_a_scheduled_poll(
    harness: Callable[..., Harness],
) -> None:
    h = harness()
    h.poller.schedule()
    h.poller.close()
    h.poller.close()
    await bounded(asyncio.sleep(0.05))
    assert h.target.events == []
    assert await h.kick_is_ignored()
    assert not still_watched(h.transport.fd)
    assert h.target.events == [] and h.errors == []


async def test_close_between_budget_polls(harness: Callable[..., Harness]) -> None:
    h = harness(polls=[BUDGET] * 100)
    h.target.on_poll = lambda: h.poller.close() if h.target.polls == 3 else None
    h.transport.kick()
    await until(lambda: h.target.polls >= 3)
    await bounded(asyncio.sleep(0.05))
    assert h.target.polls == 3  # the poll it had scheduled was cancelled


# --- PollGroup: many pollers on one loop ---------------------------------------------


class Busy:
    """A pollable that always has a full budget of work and takes ``cost`` seconds a poll."""

    def __init__(self, name: str, log: list[str], cost: float = 0.0) -> None:
        self.name = name
        self.log = log
        self.cost = cost

    def quiesce(self) -> None:
        pass

    def poll(self, budget: int) -> int:
        self.log.append(self.name)
        if self.cost:
            end = time.perf_counter() + self.cost
            while time.perf_counter() < end:
                pass
        return budget

    def rearm(self) -> bool:
        return True


async def test_group_polls_busy_pollers_round_robin() -> None:
    loop = asyncio.get_running_loop()
    group = PollGroup(loop, time_slice=10.0)  # no slice cut: one pass per iteration
    log: list[str] = []
    pollers = [NapiPoller(loop, Busy(n, log), pytest.fail, group=group) for n in "abc"]
    for p in pollers:
        p.schedule()
    await spin(4)
    for p in pollers:
        p.close()
    assert len(log) >= 9
    # Every pass polls each poller once, in the same order.
    assert log[: len(log) // 3 * 3] == ["a", "b", "c"] * (len(log) // 3)
    n = len(log)
    await spin()
    assert len(log) == n


async def test_group_gives_the_loop_back_within_its_time_slice() -> None:
    """64 always-busy connections of >= 0.5 ms a poll, a 2 ms slice: the loop
    gets control back after at most 5 polls (not after a 32 ms pass), and
    every connection gets its turns."""
    loop = asyncio.get_running_loop()
    group = PollGroup(loop, time_slice=0.002)
    log: list[str] = []
    pollers = [
        NapiPoller(loop, Busy(str(i), log, cost=0.0005), pytest.fail, group=group)
        for i in range(64)
    ]
    for p in pollers:
        p.schedule()
    try:
        per_iteration: list[int] = []
        while len(log) < 2 * 64:
            before = len(log)
            await asyncio.sleep(0)
            per_iteration.append(len(log) - before)
    finally:
        for p in pollers:
            p.close()
    assert max(per_iteration) <= 5, per_iteration
    assert group.slices_cut >= 20
    assert log[:128] == [str(i) for i in range(64)] * 2  # round robin: nobody starves


# --- wait_for_work (north) -------------------------------------------------------------


@pytest.fixture
def signals() -> tuple[ShmSignal, ShmSignal, EventfdTransport]:
    """(north, south, south->north transport) over one shm_signal block."""
    buf = bytearray(SIGNAL_SIZE)
    ShmSignal.format(buf, 0)
    call = EventfdTransport.create()
    return ShmSignal(buf, 0, NORTH, None), ShmSignal(buf, 0, SOUTH, call), call


async def test_wait_for_work_returns_at_once_when_work_is_there(
    signals: tuple[ShmSignal, ShmSignal, EventfdTransport], loop_errors: list[dict[str, Any]]
) -> None:
    north, _south, call = signals
    try:
        await bounded(wait_for_work(north, lambda: True, call))
        assert not north.armed
        assert not still_watched(call.fd)
    finally:
        call.close()


async def test_wait_for_work_wakes_on_a_kick_from_another_task(
    signals: tuple[ShmSignal, ShmSignal, EventfdTransport], loop_errors: list[dict[str, Any]]
) -> None:
    north, south, call = signals
    work: list[bytes] = []
    checks: list[bool] = []

    def has_work() -> bool:
        checks.append(bool(work))
        return bool(work)

    async def producer() -> None:
        await until(lambda: len(checks) == 1)
        assert north.armed  # the waiter armed before checking and sleeping
        assert south.notify() is True  # a spurious wake-up: no work yet
        await until(lambda: len(checks) == 3)  # woke, checked, re-armed, checked
        assert north.armed
        work.append(b"msg")
        assert south.notify() is True  # armed again, so the kick is sent

    try:
        waiter = asyncio.ensure_future(wait_for_work(north, has_work, call))
        await bounded(asyncio.gather(waiter, producer()))
        assert not north.armed  # returns disarmed: the caller polls
        assert south.sent == 2
        assert checks == [False, False, False, True]
        assert call.drain() == 0
        assert not still_watched(call.fd)
    finally:
        call.close()


async def test_wait_for_work_rechecks_after_arming(
    signals: tuple[ShmSignal, ShmSignal, EventfdTransport], loop_errors: list[dict[str, Any]]
) -> None:
    """Work published while the north was disarmed (no kick) is found by the re-check."""
    north, south, call = signals
    north.disarm()
    assert south.notify() is False  # the north polls: suppressed, no kick
    try:
        await bounded(wait_for_work(north, lambda: True, call))
        assert call.drain() == 0
        assert not north.armed
    finally:
        call.close()


async def test_cancelled_wait_leaves_no_reader(
    signals: tuple[ShmSignal, ShmSignal, EventfdTransport], loop_errors: list[dict[str, Any]]
) -> None:
    north, _south, call = signals
    try:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(wait_for_work(north, lambda: False, call), timeout=0.05)
        assert not still_watched(call.fd)
    finally:
        call.close()


class Unproductive(EventfdTransport):
    """A transport that stays readable but whose reads never yield anything,
    as when the other side drains a shared eventfd first."""

    def drain(self) -> int:
        return 0


class Unreadable(EventfdTransport):
    def drain(self) -> int:
        raise Fault("kick eventfd: read failed: Bad file descriptor")


async def test_a_descriptor_readable_without_progress_faults(
    loop_errors: list[dict[str, Any]],
) -> None:
    loop = asyncio.get_running_loop()
    errors: list[BaseException] = []
    transport = Unproductive(os.eventfd(1, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
    poller = NapiPoller(loop, FakeTarget(loop), errors.append)
    try:
        poller.watch(transport)  # readable forever: the counter is never read
        await until(lambda: bool(errors))
        assert "readable" in str(errors[0]) and isinstance(errors[0], Fault)
        assert poller.stats.wakeups == EMPTY_WAKEUPS - 1
        assert not still_watched(transport.fd)
    finally:
        poller.close()
        transport.close()


async def test_a_failing_drain_is_contained(loop_errors: list[dict[str, Any]]) -> None:
    loop = asyncio.get_running_loop()
    errors: list[BaseException] = []
    transport = Unreadable(os.eventfd(1, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
    poller = NapiPoller(loop, FakeTarget(loop), errors.append)
    try:
        poller.watch(transport)
        await until(lambda: bool(errors))
        await spin()
        assert [str(e) for e in errors] == ["kick eventfd: read failed: Bad file descriptor"]
    finally:
        poller.close()
        transport.close()
