"""The queue a device model sees (docs/design.md 3.5): the contract every connector's queue keeps.

A device model never parses a ring.  It sees queues, and each connector
supplies them over its own ring format: ``vbus.ioq.IoqSouth`` over vbus's
descriptor ring today; virtio split virtqueues (vhost-user, KVM) and Xen
rings implement the same contract.  Device code written against ``Queue``
runs over all of them, and ``vbus.testing.MockQueue`` runs it in memory.

The core is five calls and one query, the loop of rust-vmm's virtio-queue::

    q.disable_notify()                    # start of a poll
    while (buf := q.pop()) is not None:   # a posted buffer, validated
        written = serve(buf)              # read its readable segments, write its writable ones
        q.push(buf, written)              # complete it: any popped buffer, in any order
    q.kick_north()                        # the queue decides whether the north is woken
    if q.enable_notify():                 # end of the poll: armed, fenced, re-checked
        ...                               # work slipped in: poll again instead of sleeping

plus ``pending()``, how many posted buffers are waiting.  The batch forms
(``pop_many``, ``push_many``, ``read_span``, ``read_many``, ``write_many``)
move a whole available range per poll, because per-message Python work, not
the ring, is what limits throughput.  ``QueueBase`` gives each of them a
default in terms of the core, so a new queue implements only the core and
overrides a batch form where its ring allows something faster (ioq does).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from vbus.errors import Invalid
from vbus.memory import Memory

__all__ = ["Buffer", "Queue", "QueueBase", "QueueStats", "Segment"]

Segment = tuple[int, int, bool]
"""``(addr, length, writable)``: one piece of a buffer in the queue's ``Memory``."""


@dataclass(slots=True, frozen=True)
class Buffer:
    """A snapshot of one posted buffer (a descriptor, or a descriptor chain),
    already bounds-checked against the queue's ``Memory``.

    ``segments`` are ``(addr, length, writable)`` in chain order.  A buffer may
    mix both kinds, as a virtio chain does (a request header the device reads,
    then room for the reply it writes): the device reads the readable
    segments and writes at most ``length`` bytes into each writable one.  An
    ioq descriptor is one segment, readable on a north->south queue and
    writable on a south->north one.  ``index`` is the queue's name for the
    buffer (its ring position, its chain head); ``cookie`` is an opaque value
    the north attached, copied out for the device.
    """

    index: int
    cookie: int
    segments: tuple[Segment, ...]

    @property
    def length(self) -> int:
        """Bytes in all segments, readable and writable."""
        return sum(seg[1] for seg in self.segments)

    @property
    def capacity(self) -> int:
        """Bytes the device may write: the writable segments' lengths."""
        return sum(seg[1] for seg in self.segments if seg[2])


@dataclass(slots=True)
class QueueStats:
    """Counters of one queue, south side.  "Signals per message" is first class."""

    messages: int = 0  # buffers handed back to the north
    bytes: int = 0  # payload bytes moved through those buffers
    signals_sent: int = 0  # south -> north kicks that reached the transport
    signals_suppressed: int = 0  # kicks skipped because the north was polling
    stalls: int = 0  # times the south found no buffer to fill (backpressure)

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


class Queue(Protocol):
    """What a device model codes against.  Single consumer: the south owns it.

    A queue has a direction, ``writable``: False on a north->south queue (the
    north posts buffers that carry data for the device, tx-like), True on a
    south->north one (the north posts room for the device to fill, rx-like).
    Segments still carry their own flags, and ``pop``/``push`` serve both
    kinds on either queue; the direction says what ``pending()`` means
    (work, or room) and which of the data paths apply.

    Completion may be out of order: ``push`` takes any buffer this queue
    popped and has not had back, in any order (a device may finish a slow
    request after a quick one).  A queue whose ring publishes completions in
    ring order (ioq) holds an early one until those popped before it are
    pushed too; a buffer never pushed holds back the ones after it.

    Notification policy belongs to the queue: the device calls
    ``kick_north()`` after completing buffers and ``disable_notify()`` /
    ``enable_notify()`` around a poll, and the queue decides, from its ring's
    rules (shm_signal flags for ioq, EVENT_IDX for virtio), whether a kick
    reaches the transport.  ``Fault`` from any call means the north broke
    the ring's rules: that connection is faulted, nobody else notices.
    """

    stats: QueueStats
    writable: bool  # south->north queue: the south fills the buffers

    @property
    def memory(self) -> Memory:
        """The north memory the buffers point into (bounds-checked access)."""
        ...

    # --- the core ------------------------------------------------------------
    def pending(self) -> int:
        """Buffers the north has posted and the south has not popped yet."""
        ...

    def pop(self) -> Buffer | None:
        """Take the next posted buffer (its segments validated), or None when
        there is none (or this poll's byte credit is spent, see
        ``disable_notify``).  Nothing is handed back: ``push`` does that."""
        ...

    def push(self, buf: Buffer, written: int = 0) -> None:
        """Complete ``buf``, a buffer this queue popped: hand it back to the
        north.  ``written`` bytes were put into its writable segments, filled
        in segment order (virtio's used length); ``0 <= written <=
        buf.capacity``.  Any popped buffer, in any order; ``Invalid`` for one
        not popped from this queue, already pushed, or a ``written`` out of
        range."""
        ...

    def kick_north(self) -> bool:
        """Tell the north that buffers were completed, mitigated: True if the
        transport was kicked, False if the queue's policy suppressed it (the
        north is polling, or already has a wake-up pending)."""
        ...

    def disable_notify(self) -> None:
        """Start of a poll: no wake-ups until ``enable_notify``.  The poll gets a
        byte credit (``poll_bytes``): the read paths take at least one buffer
        and stop once the credit is spent, so that a north posting huge or
        overlapping buffers cannot make one poll hold the loop; ``pending()``
        still counts what is left, so the poller comes back for it."""
        ...

    def enable_notify(self) -> bool:
        """End of a poll: ask to be woken, full fence, re-check: True if work is
        already pending (the caller must poll again instead of sleeping).
        Outside a poll the byte credit does not apply."""
        ...

    # --- batch forms (defaults in QueueBase) -----------------------------------
    def pop_many(self, budget: int) -> list[Buffer]:
        """Up to ``budget`` buffers, as ``pop`` would give them one by one."""
        ...

    def push_many(self, items: Sequence[tuple[Buffer, int]]) -> None:
        """``push`` each ``(buffer, written)``, published at once where the ring allows."""
        ...

    def read_span(self, budget: int, gather: bool = False) -> tuple[bytes, list[int]]:
        """North->south fastest path: up to ``budget`` payloads back to back in
        one bytes object, and their lengths; all handed back, published once.
        The span may stop early where the payloads stop being contiguous in
        the north's memory (call again for the rest); ``gather=True`` takes
        all ``budget`` payloads at once.  ``Invalid`` on a queue the south fills."""
        ...

    def read_many(self, budget: int) -> list[bytes]:
        """North->south fast path: take up to ``budget`` buffers, copy each payload
        (its readable segments, joined) out once, hand them all back, publish once.
        ``Invalid`` on a queue the south fills."""
        ...

    def write_many(self, payloads: Sequence[bytes]) -> int:
        """South->north fast path: fill one posted buffer per payload (in order,
        across its writable segments) and publish once.  Returns how many were
        written; fewer than asked means the north has not posted enough
        buffers (backpressure, counted as a stall).  A payload longer than its
        buffer is truncated to the buffer's capacity, and the written length
        says so.  ``Invalid`` on a queue the north fills."""
        ...


class QueueBase(ABC):
    """A queue that implements the core (``pending``, ``pop``, ``push``,
    ``kick_north``, ``disable_notify``, ``enable_notify``) and inherits the
    batch forms from here, built on the core: correct for any ring, one
    buffer at a time.  Override a batch form only where the ring has
    something faster.
    """

    stats: QueueStats
    writable: bool
    memory: Memory

    @abstractmethod
    def pending(self) -> int: ...

    @abstractmethod
    def pop(self) -> Buffer | None: ...

    @abstractmethod
    def push(self, buf: Buffer, written: int = 0) -> None: ...

    @abstractmethod
    def kick_north(self) -> bool: ...

    @abstractmethod
    def disable_notify(self) -> None: ...

    @abstractmethod
    def enable_notify(self) -> bool: ...

    # --- batch forms, in terms of the core ----------------------------------------
    def pop_many(self, budget: int) -> list[Buffer]:
        bufs: list[Buffer] = []
        while len(bufs) < budget:
            buf = self.pop()
            if buf is None:
                break
            bufs.append(buf)
        return bufs

    def push_many(self, items: Sequence[tuple[Buffer, int]]) -> None:
        for buf, written in items:
            self.push(buf, written)

    def read_many(self, budget: int) -> list[bytes]:
        if self.writable:
            raise Invalid("read_many on a queue the south fills")
        payloads = []
        for buf in self.pop_many(budget):
            payloads.append(self.gather(buf))
            self.push(buf, 0)
        return payloads

    def read_span(self, budget: int, gather: bool = False) -> tuple[bytes, list[int]]:
        if self.writable:
            raise Invalid("read_span on a queue the south fills")
        payloads = self.read_many(budget)
        return b"".join(payloads), [len(payload) for payload in payloads]

    def write_many(self, payloads: Sequence[bytes]) -> int:
        if not self.writable:
            raise Invalid("write_many on a queue the north fills")
        done = 0
        for payload in payloads:
            buf = self.pop()
            if buf is None:
                self.stats.stalls += 1
                break
            self.push(buf, self.scatter(buf, payload))
            done += 1
        return done

    # --- walking segments ------------------------------------------------------------
    def gather(self, buf: Buffer) -> bytes:
        """The bytes of ``buf``'s readable segments, joined in chain order."""
        read = self.memory.read
        return b"".join(
            [read(addr, length) for addr, length, writable in buf.segments if not writable]
        )

    def scatter(self, buf: Buffer, data: bytes) -> int:
        """Write ``data`` across ``buf``'s writable segments in chain order,
        truncated to its capacity; returns how many bytes were written."""
        done = 0
        for addr, length, writable in buf.segments:
            if not writable:
                continue
            if done >= len(data):
                break
            piece = data[done : done + length]
            self.memory.write(addr, piece)
            done += len(piece)
        return done
