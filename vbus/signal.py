"""shm_signal (docs/design.md 3.2): the unit of notification and of mitigation.

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

Transports are what a kick travels over.  An eventfd received from a north
context (``SharedEventfd``) shares its *file description* with that north: it
can clear ``O_NONBLOCK`` at any moment, fill the counter to 2**64-2, or drain
it under us.  So the south never relies on the description's flags:

- reads use ``preadv2(RWF_NOWAIT)``, non-blocking per call whatever the flags;
- writes (``eventfd_write`` has no per-call non-blocking form: RWF_NOWAIT
  writes are EOPNOTSUPP) run under a 5 ms ``ITIMER_REAL`` guard whose SIGALRM
  interrupts a write that blocked; that north is then faulted.  Arming and
  disarming costs ~0.6 us per kick, and mitigation makes kicks rare;
- a semaphore-mode eventfd (readable forever, one count per read) and an
  ``O_PATH`` descriptor are refused at registration (``SharedEventfd.adopt``).

The process that kicks shared eventfds owns SIGALRM (vbusd does).
"""

from __future__ import annotations

import fcntl
import os
import signal as _signals
import struct
import threading
from typing import Protocol

from atomicshm import SEQ_CST
from atomicshm import fence as _fence

from vbus.errors import Fault, Invalid
from vbus.memory import SharedBuffer

__all__ = [
    "NORTH",
    "SIGNAL_SIZE",
    "SOUTH",
    "EventfdTransport",
    "SharedEventfd",
    "ShmSignal",
    "Transport",
    "fence",
]

MAGIC = 0x56425347
VERSION = 1
SIGNAL_SIZE = 16
NORTH, SOUTH = 0, 1

_HEAD = struct.Struct("<II")
_ENABLED, _PENDING, _DIRTY = 0, 1, 2


def fence() -> None:
    """Full memory barrier (store->load ordering included)."""
    _fence(SEQ_CST)


class Transport(Protocol):
    """What a kick travels over: an eventfd here; an irqfd, ioeventfd or event
    channel elsewhere.  ``fd`` is what the event loop waits on (-1 once closed)."""

    fd: int
    kicks: int

    def kick(self) -> None:
        """Wake the other side.  Never blocks; raises ``Fault`` if the other
        side made the transport unusable."""
        ...

    def drain(self) -> int:
        """Consume pending kicks; how many had accumulated (0 if none)."""
        ...

    def close(self) -> None: ...


class EventfdTransport:
    """Kicks over an eventfd this process created and set non-blocking itself.

    For descriptors nobody else can change (the client library's own, tests);
    an eventfd received from another context is a ``SharedEventfd``.
    """

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


WRITE_GUARD = 0.005  # seconds a kick may block before it is interrupted
_EVENTFD = "anon_inode:[eventfd]"


def _interrupt(signum: int, frame: object) -> None:
    """SIGALRM: returning normally is enough; the blocked write fails with EINTR."""


def _install_guard() -> None:
    if _signals.getsignal(_signals.SIGALRM) is not _interrupt:
        _signals.signal(_signals.SIGALRM, _interrupt)


class SharedEventfd(EventfdTransport):
    """An eventfd whose file description another context shares (see the top
    of this module): every read and write is safe whatever that context does.

    Kicks must come from the main thread (the daemon's loop): SIGALRM is
    handled there, so only a write on that thread can be interrupted.
    """

    __slots__ = ("_word", "role")

    def __init__(self, fd: int, role: str = "signal") -> None:
        super().__init__(fd)
        self.role = role
        self._word = bytearray(8)

    @classmethod
    def adopt(cls, fd: int, role: str, *, read: bool) -> SharedEventfd:
        """Validate a received descriptor and wrap it; ``Invalid`` says why not.

        ``read``: the south will wait on it and drain it (a kick descriptor),
        so non-blocking reads are probed now.  The caller keeps owning ``fd``
        until this returns.
        """
        try:
            kind = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            kind = ""
        if kind != _EVENTFD:
            raise Invalid(f"the {role} descriptor is not an eventfd")
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            if flags & os.O_PATH:
                raise Invalid(f"the {role} descriptor is an O_PATH descriptor (no I/O possible)")
            if flags & os.O_ACCMODE != os.O_RDWR:
                raise Invalid(f"the {role} eventfd is not open for reading and writing")
            with open(f"/proc/self/fdinfo/{fd}", "rb") as info:
                if b"eventfd-semaphore: 1" in info.read(4096):
                    raise Invalid(f"the {role} eventfd is in semaphore mode (EFD_SEMAPHORE)")
            # A courtesy only: the other side can clear it again at any time.
            fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
        except OSError as exc:
            raise Invalid(f"the {role} descriptor cannot be used: {exc.strerror}") from None
        transport = cls(fd, role)
        if read:
            try:
                os.preadv(fd, [transport._word], -1, os.RWF_NOWAIT)
            except BlockingIOError:
                pass
            except OSError as exc:
                raise Invalid(
                    f"the {role} eventfd cannot be read without blocking here "
                    f"(preadv2 RWF_NOWAIT: {exc.strerror})"
                ) from None
        if threading.current_thread() is threading.main_thread():
            _install_guard()
        return transport

    def kick(self) -> None:
        self.kicks += 1
        _signals.setitimer(_signals.ITIMER_REAL, WRITE_GUARD)
        try:
            os.eventfd_write(self.fd, 1)
        except BlockingIOError:
            pass  # counter saturated, description non-blocking: wake-ups are queued
        except InterruptedError:
            raise Fault(
                f"{self.role} eventfd: a signal write would block "
                "(counter full and O_NONBLOCK cleared by the other side)"
            ) from None
        except OSError as exc:
            raise Fault(f"{self.role} eventfd: signal write failed: {exc.strerror}") from None
        finally:
            _signals.setitimer(_signals.ITIMER_REAL, 0)

    def drain(self) -> int:
        word = self._word
        try:
            if os.preadv(self.fd, [word], -1, os.RWF_NOWAIT) != 8:
                return 0
        except BlockingIOError:
            return 0  # empty (the other side may have drained it first)
        except OSError as exc:
            raise Fault(f"{self.role} eventfd: read failed: {exc.strerror}") from None
        return int.from_bytes(word, "little")


class ShmSignal:
    """One shm_signal seen from one side.  ``buf`` is the shared mapping."""

    __slots__ = ("_buf", "_other", "_own", "sent", "suppressed", "transport")

    def __init__(
        self, buf: SharedBuffer, offset: int, side: int, transport: Transport | None
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
