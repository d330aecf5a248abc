"""vbus.signal: the shm_signal layout, its mitigation rules, and eventfd kicks."""

from __future__ import annotations

import fcntl
import os
import signal
import struct
import time
from collections.abc import Iterator

import pytest

from vbus.errors import Fault, Invalid
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
