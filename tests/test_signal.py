"""vbus.signal: the shm_signal layout, its mitigation rules, and eventfd kicks."""

from __future__ import annotations

import fcntl
import os
import signal
import struct
import time
from collections.abc import Iterator
from typing import Any, Literal

import pytest

import vbus.signal
from vbus.errors import Fault, Invalid
from vbus.ioq import SIGNAL_OFFSET as SIGNAL_AT
from vbus.ioq import IoqNorth, IoqSouth, pool_layout
from vbus.memory import BufferMemory
from vbus.signal import NORTH, SIGNAL_SIZE, SOUTH, EventfdTransport, SharedEventfd, ShmSignal

OFFSET = 32  # not at the start of the buffer: offsets must be honoured


def _irq(buf: bytearray, side: int) -> tuple[int, int, int]:
    """(enabled, pending, dirty) of ``side`` as stored in shared memory."""
    at = OFFSET + 8 + 4 * side
    return buf[at], buf[at + 1], buf[at + 2]


@pytest.fixture
def transport() -> Iterator[EventfdTransport]:
    t = EventfdTransport.create()
    yield t
    t.close()


@pytest.fixture
def buf() -> bytearray:
    b = bytearray(b"\xaa" * (OFFSET + SIGNAL_SIZE + 16))
    ShmSignal.format(b, OFFSET)
    return b


# --- layout ---------------------------------------------------------------------


def test_format_writes_the_documented_layout(buf: bytearray) -> None:
    assert SIGNAL_SIZE == 16
    assert buf[OFFSET : OFFSET + 16] == (
        struct.pack("<II", 0x56425347, 1) + b"\x01\x00\x00\x00" + b"\x01\x00\x00\x00"
    )
    # Nothing outside the block is touched.
    assert buf[:OFFSET] == b"\xaa" * OFFSET
    assert buf[OFFSET + 16 :] == b"\xaa" * 16
    ShmSignal.validate(buf, OFFSET)
    ShmSignal.validate(bytes(buf[OFFSET : OFFSET + 16]), 0)


def test_validate_refuses_a_bad_magic(buf: bytearray) -> None:
    buf[OFFSET] ^= 0x01
    with pytest.raises(Fault, match="magic"):
        ShmSignal.validate(buf, OFFSET)


@pytest.mark.parametrize("version", [0, 2, 0xFFFFFFFF])
def test_validate_refuses_another_version(buf: bytearray, version: int) -> None:
    struct.pack_into("<I", buf, OFFSET + 4, version)
    with pytest.raises(Fault, match=f"version {version}"):
        ShmSignal.validate(buf, OFFSET)


def test_validate_refuses_an_unformatted_block() -> None:
    with pytest.raises(Fault):
        ShmSignal.validate(bytes(SIGNAL_SIZE), 0)


# --- mitigation -------------------------------------------------------------------


def test_notify_to_a_disarmed_side_is_suppressed(
    buf: bytearray, transport: EventfdTransport
) -> None:
    north = ShmSignal(buf, OFFSET, NORTH, None)
    south = ShmSignal(buf, OFFSET, SOUTH, transport)  # kicks the north
    north.disarm()
    assert south.notify() is False
    assert (south.sent, south.suppressed) == (0, 1)
    assert transport.kicks == 0
    assert transport.drain() == 0
    assert _irq(buf, NORTH) == (0, 0, 1)  # dirty even when nobody is woken
    assert north.dirty


def test_notify_to_an_armed_side_kicks_once_then_is_suppressed_while_pending(
    buf: bytearray, transport: EventfdTransport
) -> None:
    north = ShmSignal(buf, OFFSET, NORTH, None)
    south = ShmSignal(buf, OFFSET, SOUTH, transport)
    assert north.armed  # format leaves both sides enabled
    assert not north.dirty
    assert south.notify() is True
    assert _irq(buf, NORTH) == (1, 1, 1)
    assert (south.sent, south.suppressed, transport.kicks) == (1, 0, 1)
    assert transport.drain() == 1
    # Still pending: the north has not taken the first one.
    assert south.notify() is False
    assert south.notify() is False
    assert (south.sent, south.suppressed, transport.kicks) == (1, 2, 1)
    assert transport.drain() == 0
    # The south's own flags are never touched by its own notify.
    assert _irq(buf, SOUTH) == (1, 0, 0)


def test_disarm_takes_pending_and_dirty_and_arm_reenables(
    buf: bytearray, transport: EventfdTransport
) -> None:
    north = ShmSignal(buf, OFFSET, NORTH, None)
    south = ShmSignal(buf, OFFSET, SOUTH, transport)
    south.notify()
    north.disarm()
    assert _irq(buf, NORTH) == (0, 0, 0)
    assert not north.armed and not north.dirty
    assert _irq(buf, SOUTH) == (1, 0, 0)  # the other side's block is untouched
    assert south.notify() is False  # polling: no kick
    north.arm()
    assert north.armed
    assert _irq(buf, NORTH) == (1, 0, 1)  # arm keeps dirty: the re-check reads it
    assert south.notify() is True
    assert transport.kicks == 2


def test_the_two_directions_are_independent(buf: bytearray) -> None:
    north = ShmSignal(buf, OFFSET, NORTH, None)
    south = ShmSignal(buf, OFFSET, SOUTH, None)
    assert north.notify() is True  # no transport: still counted and marked pending
    assert _irq(buf, SOUTH) == (1, 1, 1)
    assert _irq(buf, NORTH) == (1, 0, 0)
    assert south.dirty and not north.dirty
    south.disarm()
    assert _irq(buf, SOUTH) == (0, 0, 0)
    assert _irq(buf, NORTH) == (1, 0, 0)
    assert north.sent == 1 and south.sent == 0


def test_garbage_flags_are_read_as_truthy_bytes(buf: bytearray) -> None:
    """Any non-zero enabled byte means armed, any non-zero pending means pending."""
    south = ShmSignal(buf, OFFSET, SOUTH, None)
    at = OFFSET + 8 + 4 * NORTH
    buf[at : at + 3] = b"\xff\x00\x00"
    assert south.notify() is True
    buf[at : at + 3] = b"\xff\x80\x00"
    assert south.notify() is False


# --- the fence: store, then fence, then load (deterministic) ----------------------------
#
# Both halves of the handshake are "store mine, fence, load theirs" (the
# store-buffer pattern, tests/test_litmus.py shows what x86 does without the
# fence).  Here every byte access to the flags and every index access is
# recorded, with ``vbus.signal.fence`` replaced by a marker, so that the
# order is checked exactly, on every run.

FLAG_NAMES = {
    8 + 4 * side + field: f"{who}.{name}"
    for side, who in ((NORTH, "north"), (SOUTH, "south"))
    for field, name in ((0, "enabled"), (1, "pending"), (2, "dirty"))
}


class RecordingBuffer(bytearray):
    """A bytearray that records single-byte loads and stores at named offsets."""

    trace: list[str]
    names: dict[int, str]

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, int) and key in self.names:
            self.trace.append(f"load {self.names[key]}")
        return super().__getitem__(key)

    def __setitem__(self, key: Any, value: Any) -> None:
        if isinstance(key, int) and key in self.names:
            self.trace.append(f"store {self.names[key]}")
        super().__setitem__(key, value)


class RecordingIndex:
    """A ring header's ``'I'`` view that records accesses to the two indexes."""

    NAMES = {64 // 4: "valid", 128 // 4: "inuse"}

    def __init__(self, view: memoryview, trace: list[str]) -> None:
        self._view = view
        self._trace = trace

    def __getitem__(self, i: int) -> int:
        if i in self.NAMES:
            self._trace.append(f"load {self.NAMES[i]}")
        value: int = self._view[i]
        return value

    def __setitem__(self, i: int, value: int) -> None:
        if i in self.NAMES:
            self._trace.append(f"store {self.NAMES[i]}")
        self._view[i] = value

    def release(self) -> None:
        self._view.release()


class RecordingMemory(BufferMemory):
    """The south's memory over a RecordingBuffer, its header view recorded too."""

    def __init__(self, buf: RecordingBuffer) -> None:
        super().__init__(buf)
        self.trace = buf.trace

    def cast(self, addr: int, length: int, fmt: Literal["I", "Q"]) -> memoryview[int]:
        view = super().cast(addr, length, fmt)
        if fmt == "I" and addr == 0:
            return RecordingIndex(view, self.trace)  # type: ignore[return-value]
        return view


@pytest.fixture
def trace(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    events: list[str] = []
    monkeypatch.setattr(vbus.signal, "fence", lambda: events.append("fence"))
    return events


def _recording(size: int, base: int, trace: list[str]) -> RecordingBuffer:
    buf = RecordingBuffer(size)
    buf.trace = trace
    buf.names = {base + at: name for at, name in FLAG_NAMES.items()}
    return buf


def _between(trace: list[str], store: str, load: str) -> list[str]:
    """What ``trace`` holds from the last ``store`` before the first ``load`` on."""
    first_load = trace.index(load)
    last_store = max(i for i, event in enumerate(trace[:first_load]) if event == store)
    return trace[last_store : first_load + 1]


def test_arm_stores_enabled_then_fences(trace: list[str]) -> None:
    buf = _recording(OFFSET + SIGNAL_SIZE, OFFSET, trace)
    ShmSignal.format(buf, OFFSET)
    south = ShmSignal(buf, OFFSET, SOUTH, None)
    south.disarm()
    trace.clear()
    south.arm()
    # The fence comes last: the caller's re-check loads cannot pass the store.
    assert trace == ["store south.enabled", "fence"]


def test_notify_stores_dirty_fences_then_loads_the_other_sides_flags(trace: list[str]) -> None:
    buf = _recording(OFFSET + SIGNAL_SIZE, OFFSET, trace)
    ShmSignal.format(buf, OFFSET)
    north = ShmSignal(buf, OFFSET, NORTH, None)
    trace.clear()
    assert north.notify() is True
    assert trace == [
        "store south.dirty",
        "fence",
        "load south.enabled",
        "load south.pending",
        "store south.pending",
    ]
    trace.clear()
    assert north.notify() is False  # pending: suppressed, but fenced the same way
    assert trace[:3] == ["store south.dirty", "fence", "load south.enabled"]


def test_the_south_fences_between_its_stores_and_its_loads(trace: list[str]) -> None:
    """The whole handshake through ioq, south side: arming then re-checking the
    north's index (``enable_notify``), and handing back then reading the
    north's flags (``push`` + ``kick_north``)."""
    count, buf_size = 4, 64
    data, size = pool_layout(count, buf_size)
    buf = _recording(size, SIGNAL_AT, trace)
    north = IoqNorth(buf, 0, count, data, buf_size, None)
    memory = RecordingMemory(buf)
    south = IoqSouth(memory, 0, count, None, writable=True)
    try:
        south.disable_notify()
        trace.clear()
        assert south.enable_notify() is False
        assert trace == ["store south.enabled", "fence", "load valid"]

        north.post_empty(1)
        south.disable_notify()
        buffer = south.pop()
        assert buffer is not None
        trace.clear()
        south.push(buffer, 0)
        south.kick_north()
        assert _between(trace, "store inuse", "load north.enabled") == [
            "store inuse",
            "store north.dirty",
            "fence",
            "load north.enabled",
        ]
    finally:
        south.close()
        north.close()
        memory.release()


def test_the_north_fences_between_publishing_and_reading_the_souths_flags(
    trace: list[str],
) -> None:
    count, buf_size = 4, 64
    data, size = pool_layout(count, buf_size)
    buf = _recording(size, SIGNAL_AT, trace)
    north = IoqNorth(buf, 0, count, data, buf_size, None)
    north._idx = RecordingIndex(north._idx, trace)  # type: ignore[assignment]
    try:
        trace.clear()
        assert north.send_many([b"x"]) == 1
        north.signal.notify()  # what the client library does after send_many
        assert _between(trace, "store valid", "load south.enabled") == [
            "store valid",
            "store south.dirty",
            "fence",
            "load south.enabled",
        ]
        trace.clear()
        north.signal.disarm()
        north.signal.arm()
        north.completed()  # wait_for_work's re-check
        assert trace[-3:] == ["store north.enabled", "fence", "load inuse"]
    finally:
        north.close()


# --- eventfd transport ------------------------------------------------------------


def test_eventfd_kicks_accumulate_and_drain(transport: EventfdTransport) -> None:
    assert fcntl.fcntl(transport.fd, fcntl.F_GETFL) & os.O_NONBLOCK
    for _ in range(3):
        transport.kick()
    assert transport.kicks == 3
    assert transport.drain() == 3
    assert transport.drain() == 0


def test_drain_on_empty_returns_zero_without_blocking(transport: EventfdTransport) -> None:
    started = time.monotonic()
    for _ in range(100):
        assert transport.drain() == 0
    assert time.monotonic() - started < 1.0


def test_kick_on_a_saturated_counter_does_not_block_or_raise(
    transport: EventfdTransport,
) -> None:
    os.eventfd_write(transport.fd, 0xFFFFFFFFFFFFFFFE)  # the maximum an eventfd holds
    transport.kick()  # would block on a blocking fd: must neither block nor raise
    assert transport.kicks == 1
    assert transport.drain() == 0xFFFFFFFFFFFFFFFE


def test_wraps_an_existing_eventfd() -> None:
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    t = EventfdTransport(fd)
    try:
        t.kick()
        assert os.eventfd_read(fd) == 1
        assert t.drain() == 0
    finally:
        t.close()


def test_close_is_idempotent_and_really_closes() -> None:
    t = EventfdTransport.create()
    fd = t.fd
    t.close()
    assert t.fd == -1
    with pytest.raises(OSError):
        os.fstat(fd)
    t.close()
    assert t.fd == -1


# --- descriptors shared with another context (SharedEventfd) --------------------


@pytest.fixture
def fds() -> Iterator[list[int]]:
    opened: list[int] = []
    yield opened
    for fd in opened:
        try:
            os.close(fd)
        except OSError:
            pass


def _eventfd(fds: list[int], flags: int = 0) -> int:
    fd = os.eventfd(0, flags | os.EFD_CLOEXEC)
    fds.append(fd)
    return fd


def test_adopt_refuses_what_is_not_a_usable_eventfd(fds: list[int]) -> None:
    r, w = os.pipe()
    fds += [r, w]
    with pytest.raises(Invalid, match="not an eventfd"):
        SharedEventfd.adopt(r, "kick", read=True)
    with pytest.raises(Invalid, match="not an eventfd"):
        SharedEventfd.adopt(12345, "kick", read=True)  # not open at all
    path = os.open(f"/proc/self/fd/{_eventfd(fds)}", os.O_PATH)
    fds.append(path)
    with pytest.raises(Invalid, match="O_PATH"):
        SharedEventfd.adopt(path, "call", read=False)
    semaphore = _eventfd(fds, os.EFD_SEMAPHORE)
    os.eventfd_write(semaphore, 2**40)
    with pytest.raises(Invalid, match="semaphore"):
        SharedEventfd.adopt(semaphore, "kick", read=True)


def test_reads_never_block_whatever_the_flags(fds: list[int]) -> None:
    fd = _eventfd(fds)  # a blocking description, as the other side may leave it
    transport = SharedEventfd.adopt(fd, "kick", read=True)
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    started = time.monotonic()
    assert transport.drain() == 0
    assert time.monotonic() - started < 1
    os.eventfd_write(fd, 3)
    assert transport.drain() == 3
    assert transport.drain() == 0


def test_a_write_that_would_block_is_a_fault_not_a_hang(fds: list[int]) -> None:
    fd = _eventfd(fds)
    transport = SharedEventfd.adopt(fd, "call", read=False)
    transport.kick()
    assert os.eventfd_read(fd) == 1
    # The other side fills the counter and clears O_NONBLOCK on the shared description.
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    os.eventfd_write(fd, 2**64 - 2)
    started = time.monotonic()
    with pytest.raises(Fault, match="would block"):
        transport.kick()
    assert time.monotonic() - started < 2  # interrupted by the guard, not stuck
    # With O_NONBLOCK set, a full counter only means wake-ups are queued.
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
    transport.kick()
    # The guard is disarmed after every kick: no stray SIGALRM later.
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
