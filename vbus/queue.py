"""The queue a device model sees (DESIGN.md 3.5): buffers in, buffers out, notification control.

A device model never parses a ring.  ``ioq`` implements this interface over
vbus's own descriptor ring; the vhost-user connector implements it over virtio
split virtqueues.  Batch forms move a whole available range per poll, because
per-message Python work, not the ring, is what limits throughput.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from vbus.memory import Memory

__all__ = ["Buffer", "Queue", "QueueStats"]


@dataclass(slots=True, frozen=True)
class Buffer:
    """A snapshot of one descriptor (chain), already bounds-checked against ``Memory``.

    ``segments`` are ``(addr, length, writable)``: the south reads the readable
    ones and writes at most ``length`` bytes into the writable ones.
    """

    index: int
    cookie: int
    segments: tuple[tuple[int, int, bool], ...]

    @property
    def length(self) -> int:
        return sum(seg[1] for seg in self.segments)


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
    """What a device model codes against.  Single consumer: the south owns it."""

    stats: QueueStats
    writable: bool  # south->north queue: the south fills the buffers

    @property
    def memory(self) -> Memory:
        """The north memory the buffers point into (bounds-checked access)."""
        ...

    def pending(self) -> int:
        """Buffers the north has made available and the south has not taken."""
        ...

    def pop(self) -> Buffer | None: ...

    def pop_many(self, budget: int) -> list[Buffer]: ...

    def push(self, buf: Buffer, written: int = 0) -> None:
        """Hand ``buf`` back; ``written`` bytes were put into its writable segments."""
        ...

    def push_many(self, items: Sequence[tuple[Buffer, int]]) -> None: ...

    def read_span(self, budget: int, gather: bool = False) -> tuple[bytes, list[int]]:
        """North->south fastest path: up to ``budget`` payloads back to back in
        one bytes object, and their lengths; all handed back, published once.
        The span may stop early where the payloads stop being contiguous in
        the north's memory (call again for the rest); ``gather=True`` takes
        all ``budget`` payloads at once."""
        ...

    def read_many(self, budget: int) -> list[bytes]:
        """North->south fast path: take up to ``budget`` buffers, copy each payload
        out once, hand them all back, publish once."""
        ...

    def write_many(self, payloads: Sequence[bytes]) -> int:
        """South->north fast path: fill one empty buffer per payload (in order) and
        publish once.  Returns how many were written; fewer than asked means the
        north has not posted enough buffers (backpressure, counted as a stall).
        A payload longer than its buffer is a fault of the caller's choosing:
        it is truncated and the buffer's length says so."""
        ...

    def kick_north(self) -> bool:
        """Mitigated south->north signal; True if the transport was kicked."""
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
