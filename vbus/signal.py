"""shm_signal (DESIGN.md 3.2): the unit of notification and of mitigation.

Layout, 16 bytes little-endian, inside the ring header::

    u32 magic 0x56425347 ("VBSG")   u32 ver 1
    struct { u8 enabled; u8 pending; u8 dirty; u8 reserved; } irq[2]   # [0] north, [1] south

Each side owns ``irq[own]``: it clears ``enabled`` while it polls and sets it
when it wants to be woken.  To signal the other side it sets
``irq[other].dirty``, and only if ``irq[other].enabled`` is set and nothing is
``pending`` yet does it set ``pending`` and kick the transport (an eventfd
here; an irqfd or event channel elsewhere).  Flags are single bytes, so every
store and load of one is atomic on its own.

Memory ordering: x86 keeps stores in order and loads in order, but lets a load
pass an earlier store to another address.  Both halves of the handshake are
"store mine, then load theirs" (producer: publish index, load ``enabled``;
consumer: store ``enabled``, load index), the store-buffer pattern that loses
a wake-up without a full fence between the store and the load.  ``fence`` is
``atomicshm.fence()`` at SEQ_CST: a real full barrier (mfence / locked op,
~55 ns), documented as such, unlike a syscall used for its side effect
(~250 ns).  tests/test_litmus.py checks it with a two-process store-buffer
litmus test on a shared mapping.
"""

from __future__ import annotations

import os
import struct

from atomicshm import SEQ_CST
from atomicshm import fence as _fence

from vbus.errors import Fault
from vbus.memory import SharedBuffer

__all__ = ["NORTH", "SIGNAL_SIZE", "SOUTH", "EventfdTransport", "ShmSignal", "fence"]

MAGIC = 0x56425347
VERSION = 1
SIGNAL_SIZE = 16
NORTH, SOUTH = 0, 1

_HEAD = struct.Struct("<II")
_ENABLED, _PENDING, _DIRTY = 0, 1, 2


def fence() -> None:
    """Full memory barrier (store->load ordering included)."""
    _fence(SEQ_CST)


class EventfdTransport:
    """Non-blocking eventfd kicks: the south never waits on a north context."""

    __slots__ = ("fd", "kicks")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.kicks = 0

    @classmethod
    def create(cls) -> EventfdTransport:
        return cls(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))

    def kick(self) -> None:
        self.kicks += 1
        try:
            os.eventfd_write(self.fd, 1)
        except BlockingIOError:
            pass  # counter saturated: the other side has plenty of wake-ups queued

    def drain(self) -> int:
        """Consume pending kicks; returns how many had accumulated (0 if none)."""
        try:
            return os.eventfd_read(self.fd)
        except BlockingIOError:
            return 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class ShmSignal:
    """One shm_signal seen from one side.  ``buf`` is the shared mapping."""

    __slots__ = ("_buf", "_other", "_own", "sent", "suppressed", "transport")

    def __init__(
        self, buf: SharedBuffer, offset: int, side: int, transport: EventfdTransport | None
    ) -> None:
        self._buf = buf
        self._own = offset + 8 + 4 * side
        self._other = offset + 8 + 4 * (1 - side)
        self.transport = transport
        self.sent = 0
        self.suppressed = 0

    @staticmethod
    def format(buf: SharedBuffer, offset: int) -> None:
        """Initialise a signal block: both sides start enabled, nothing pending."""
        _HEAD.pack_into(buf, offset, MAGIC, VERSION)
        buf[offset + 8 : offset + 16] = b"\x01\x00\x00\x00\x01\x00\x00\x00"

    @staticmethod
    def validate(buf: bytes | SharedBuffer, offset: int) -> None:
        magic, version = _HEAD.unpack_from(buf, offset)
        if magic != MAGIC:
            raise Fault(f"shm_signal: bad magic {magic:#010x}")
        if version != VERSION:
            raise Fault(f"shm_signal: unsupported version {version}")

    # --- own side ---------------------------------------------------------
    def disarm(self) -> None:
        """Stop wake-ups while polling, and take what was pending."""
        buf = self._buf
        own = self._own
        buf[own + _ENABLED] = 0
        buf[own + _PENDING] = 0
        buf[own + _DIRTY] = 0

    def ack(self) -> None:
        """Take what was pending but stay armed."""
        buf = self._buf
        own = self._own
        buf[own + _PENDING] = 0
        buf[own + _DIRTY] = 0

    def arm(self) -> None:
        """Ask to be woken.  The caller re-checks its ring after this returns."""
        self._buf[self._own + _ENABLED] = 1
        # Expose enabled=1 before re-reading the other side's index: without
        # the fence that load may pass this store and a wake-up is lost.
        fence()

    @property
    def armed(self) -> bool:
        return bool(self._buf[self._own + _ENABLED])

    @property
    def dirty(self) -> bool:
        return bool(self._buf[self._own + _DIRTY])

    # --- towards the other side --------------------------------------------
    def notify(self, force: bool = False) -> bool:
        """Signal the other side, mitigated.  True if the transport was kicked.

        ``force`` kicks whatever the other side's flags say: signalling without
        mitigation, for comparison (``vbus bench``) and for peers that want it.
        """
        buf = self._buf
        other = self._other
        buf[other + _DIRTY] = 1
        # Expose the published index (stored before this call) before reading
        # the other side's enabled flag: the producer half of the handshake.
        fence()
        if force or (buf[other + _ENABLED] and not buf[other + _PENDING]):
            buf[other + _PENDING] = 1
            if self.transport is not None:
                self.transport.kick()
            self.sent += 1
            return True
        self.suppressed += 1
        return False
