"""Device models under test without a daemon: an in-memory queue and a harness.

``MockQueue`` keeps the queue contract (``vbus.queue``) over a plain
bytearray, as rust-vmm's virtio-queue mock does over guest memory: the test
plays the north.  It posts buffers (readable bytes, writable room, or a
chain mixing both), the device pops and pushes them, and the test reads the
completions in the order the device pushed them, with what the device wrote.
Every notification call is recorded, and the north's side of the policy
(whether it wants to be woken) is a flag the test sets.

``DeviceHarness`` opens a deviceclass the way the daemon does (a topology,
a device with validated attributes, a bus, a connection and its session),
registers queues with the session, and drives ``poll``/``rearm`` the way
the NAPI poller does::

    with DeviceHarness(Echo) as dev:
        tx = dev.queue(0, writable=False)
        rx = dev.queue(1, writable=True)
        tx.post(b"ping")
        rx.post(64)
        dev.poll()
        assert rx.written() == [b"ping"]

Nothing here touches a file descriptor or an event loop.
"""

from __future__ import annotations

import inspect
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Generic, TypeVar, cast

from vbus.core.device import DeviceModel, Session
from vbus.core.members import Identity, Peer
from vbus.core.model import Connection, Device, RevokeKind, Topology
from vbus.core.registry import Registry
from vbus.errors import Busy, Invalid
from vbus.memory import BufferMemory
from vbus.mitigation import DEFAULT_BUDGET
from vbus.queue import Buffer, QueueBase, QueueStats, Segment

__all__ = ["CONNECTOR", "Completion", "DeviceHarness", "MockQueue"]

CONNECTOR: Final = "testing"  # the connector name a harness's connection carries
DEFAULT_MEMORY = 1 << 20
_ALIGN = 64  # segments start on their own cache line, as a north's buffers would

M = TypeVar("M", bound=DeviceModel)


@dataclass(frozen=True, slots=True)
class Completion:
    """One buffer the device pushed: which, how much it wrote, and what."""

    buffer: Buffer
    written: int
    data: bytes  # the first ``written`` bytes of the writable segments, joined

    @property
    def index(self) -> int:
        return self.buffer.index

    @property
    def cookie(self) -> int:
        return self.buffer.cookie


class MockQueue(QueueBase):
    """An in-memory queue: the core of the contract, batch forms from ``QueueBase``.

    ``writable`` is the direction (False: the north posts data for the
    device; True: the north posts room for the device to fill).  Buffers
    live in ``memory``, a ``BufferMemory`` of ``memory_size`` bytes; its
    space is reused once every posted buffer has been completed.

    What the device did is recorded:

    - ``completions``: every push, in push order (``written()`` for the bytes);
    - ``calls``: the core calls in order (``"pop"``, ``"push"``,
      ``"kick_north"``, ``"disable_notify"``, ``"enable_notify"``; an empty
      ``pop`` is ``"pop:empty"``);
    - ``stats``: the ``QueueStats`` a real queue keeps;
    - ``notify_enabled``: whether the device asked to be woken (the south's flag);
      ``wakeups``: posts made while it was set, the kicks a north would send.

    ``north_armed`` is the north's flag: while False (the north is polling)
    ``kick_north`` is suppressed.  ``poll_bytes`` (None: unbounded) gives each
    poll the byte credit a real queue gives (see ``Queue.disable_notify``).
    """

    def __init__(
        self,
        *,
        writable: bool,
        memory_size: int = DEFAULT_MEMORY,
        poll_bytes: int | None = None,
    ) -> None:
        if poll_bytes is not None and poll_bytes < 1:
            raise Invalid("poll_bytes is at least 1 (a poll always takes one buffer)")
        self.writable = writable
        self.memory = BufferMemory(bytearray(memory_size))
        self.stats = QueueStats()
        self.poll_bytes = poll_bytes
        self.completions: list[Completion] = []
        self.calls: list[str] = []
        self.notify_enabled = True
        self.north_armed = True
        self.wakeups = 0
        self.closed = False
        self._posted: deque[Buffer] = deque()  # oldest first
        self._popped: dict[int, Buffer] = {}  # taken and not pushed, by index
        self._next_index = 0
        self._next_addr = 0
        self._credit: int | None = None  # bytes this poll may still take; None outside a poll

    # --- the north's side (the test) ----------------------------------------------
    def post(self, *segments: bytes | bytearray | memoryview | int, cookie: int = 0) -> Buffer:
        """Post one buffer: each argument is a segment, in chain order, either
        bytes (readable: data for the device) or an int (writable: room for
        that many bytes).  Returns the ``Buffer`` the device will pop."""
        self._check_open()
        if not segments:
            raise Invalid("a buffer has at least one segment")
        sizes = [seg if isinstance(seg, int) else len(seg) for seg in segments]
        if any(size < 0 for size in sizes):
            raise Invalid("a writable segment's capacity is not negative")
        addrs = []
        at = self._next_addr
        for size in sizes:
            addrs.append(at)
            at += (size + _ALIGN - 1) // _ALIGN * _ALIGN or _ALIGN
        if at > self.memory.size:
            raise Invalid(
                f"MockQueue memory full: {at} of {self.memory.size} bytes "
                "(complete buffers, or give a larger memory_size)"
            )
        self._next_addr = at
        parts: list[Segment] = []
        for seg, size, addr in zip(segments, sizes, addrs, strict=True):
            if isinstance(seg, int):
                self.memory.write(addr, bytes(size))  # room starts zeroed
                parts.append((addr, size, True))
            else:
                self.memory.write(addr, seg)
                parts.append((addr, size, False))
        buf = Buffer(self._next_index, cookie, tuple(parts))
        self._next_index += 1
        self._posted.append(buf)
        if self.notify_enabled:
            self.wakeups += 1
        return buf

    def post_many(self, items: Sequence[bytes | int]) -> list[Buffer]:
        """One single-segment buffer per item (bytes: readable; int: room)."""
        return [self.post(item) for item in items]

    def written(self) -> list[bytes]:
        """What the device wrote into each completed buffer, in push order."""
        return [completion.data for completion in self.completions]

    @property
    def outstanding(self) -> int:
        """Buffers the device popped and has not pushed."""
        return len(self._popped)

    # --- the core ----------------------------------------------------------------------
    def pending(self) -> int:
        self._check_open()
        return len(self._posted)

    def pop(self) -> Buffer | None:
        self._check_open()
        credit = self._credit
        if not self._posted or (credit is not None and credit <= 0):
            self.calls.append("pop:empty")
            return None
        buf = self._posted.popleft()
        if credit is not None and not self.writable:  # the device will read it
            self._credit = credit - (buf.length - buf.capacity)
        self._popped[buf.index] = buf
        self.calls.append("pop")
        return buf

    def push(self, buf: Buffer, written: int = 0) -> None:
        self._check_open()
        popped = self._popped.get(buf.index)
        if popped is None or popped != buf:
            raise Invalid(
                f"buffer {buf.index} was not popped from this queue, or was pushed already"
            )
        if not 0 <= written <= buf.capacity:
            raise Invalid(
                f"cannot report {written} bytes written into buffer {buf.index} "
                f"(capacity {buf.capacity})"
            )
        del self._popped[buf.index]
        data = []
        left = written
        for addr, length, writable in buf.segments:
            if writable and left:
                take = min(length, left)
                data.append(self.memory.read(addr, take))
                left -= take
        self.completions.append(Completion(buf, written, b"".join(data)))
        self.stats.messages += 1
        self.stats.bytes += written if self.writable else buf.length - buf.capacity
        self.calls.append("push")
        if not self._posted and not self._popped:
            self._next_addr = 0  # nothing lives in the memory any more

    def kick_north(self) -> bool:
        self._check_open()
        self.calls.append("kick_north")
        if self.north_armed:
            self.stats.signals_sent += 1
            return True
        self.stats.signals_suppressed += 1
        return False

    def disable_notify(self) -> None:
        self._check_open()
        self.calls.append("disable_notify")
        self.notify_enabled = False
        self._credit = self.poll_bytes

    def enable_notify(self) -> bool:
        self._check_open()
        self.calls.append("enable_notify")
        self.notify_enabled = True
        self._credit = None
        return self.pending() > 0

    def close(self) -> None:
        """What a connector does when the connection goes: further calls are ``Invalid``."""
        self.closed = True

    def _check_open(self) -> None:
        if self.closed:
            raise Invalid("MockQueue used after close")


class DeviceHarness(Generic[M]):
    """One deviceclass, one device, one open connection, no daemon.

    ``attrs`` are validated as the admin tree would (``Invalid`` if one is
    bad).  ``queue()`` registers a ``MockQueue`` with the session (its
    ``shm()`` may refuse it, as it would refuse a north's), ``poll()`` runs
    the poller's loop until the device sleeps, ``call()`` is the call verb,
    ``close()`` closes the connection as a connector does: the session is
    closed, then every queue.  Errors from the device propagate to the test.
    """

    def __init__(
        self,
        deviceclass: type[M],
        attrs: Mapping[str, str | int | bool] | None = None,
        *,
        name: str = "dev0",
        peer: Identity | None = None,
    ) -> None:
        registry = Registry()
        registry.register(deviceclass)
        self.topology = Topology(registry, _NoTasks(), 0)
        self.device: Device = self.topology.create_device(name, deviceclass.name, dict(attrs or {}))
        self.topology.create_bus("test")
        self.topology.link("test", name)
        self.revoked: list[tuple[RevokeKind, str]] = []
        self.conn: Connection = self.topology.open(
            "test",
            name,
            peer if peer is not None else Peer(pid=1, uid=0, gid=0),
            CONNECTOR,
            self._revoke,
        )
        session = self.conn.session
        assert session is not None
        self.session: Session = session
        self.queues: dict[int, QueueBase] = {}
        self.polls = 0

    @property
    def model(self) -> M:
        """The device model (an instance of the harness's deviceclass)."""
        return cast(M, self.device.model)

    def _revoke(self, conn: Connection, kind: RevokeKind, reason: str) -> None:
        self.revoked.append((kind, reason))

    # --- queues and polling -----------------------------------------------------------
    def add_queue(self, index: int, queue: QueueBase) -> QueueBase:
        """Register any queue as queue ``index`` (``Session.shm``)."""
        self.session.shm(index, queue)
        self.queues[index] = queue
        return queue

    def queue(self, index: int, *, writable: bool, **kwargs: Any) -> MockQueue:
        """A new ``MockQueue`` registered as queue ``index``; ``kwargs`` go to it."""
        queue = MockQueue(writable=writable, **kwargs)
        self.add_queue(index, queue)
        return queue

    def poll(self, budget: int = DEFAULT_BUDGET, max_polls: int = 1000) -> int:
        """What the NAPI poller does after a wake-up, until the device sleeps:
        ``quiesce``, ``poll(budget)``, and again while the budget was used up or
        ``rearm`` says work is pending.  Returns the work done in all.  ``Busy``
        if the device is still not asleep after ``max_polls`` polls (a device
        that never settles would spin the daemon's loop)."""
        session = self.session
        total = 0
        for _ in range(max_polls):
            session.quiesce()
            self.polls += 1
            done = session.poll(budget)
            total += done
            if done >= budget:
                continue
            if not session.rearm():
                return total
        raise Busy(f"the device is still not asleep after {max_polls} polls ({total} done)")

    # --- the call verb ------------------------------------------------------------------
    def call(self, func: int, data: bytes) -> bytes:
        """``call()`` that answers at once; ``Invalid`` if it answers later (use ``acall``)."""
        result = self.session.call(func, data)
        if inspect.isawaitable(result):
            if inspect.iscoroutine(result):
                result.close()
            raise Invalid(f"call({func}) answers later: await acall() instead")
        return bytes(result)

    async def acall(self, func: int, data: bytes) -> bytes:
        """``call()``, awaiting the answer if the device gives it later."""
        result = self.session.call(func, data)
        if inspect.isawaitable(result):
            result = await result
        return bytes(result)

    def set_attribute(self, name: str, value: str | int | bool) -> None:
        """Change an attribute as an administrator would (validated, then the model told)."""
        self.topology.set_attribute(self.device.name, name, value)

    # --- teardown --------------------------------------------------------------------------
    def close(self) -> None:
        """Close the connection in the connector's order: the queues first (a
        session must not touch them while closing), then the session (its
        error propagates).  Idempotent."""
        if self.conn.closed:
            return
        for queue in self.queues.values():
            close = getattr(queue, "close", None)
            if close is not None:
                close()
        session, self.conn.session = self.conn.session, None
        try:
            if session is not None:
                session.close()
        finally:
            self.topology.close(self.conn, "closed by the test")

    def __enter__(self) -> DeviceHarness[M]:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class _NoTasks:
    """No process table: the harness admits its peer without member rules."""

    def starttime(self, pid: int) -> int | None:
        return None

    def parent(self, pid: int) -> int | None:
        return None

    def uid(self, pid: int) -> int | None:
        return None
