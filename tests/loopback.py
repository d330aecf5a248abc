"""A second connector, for tests only: an in-process north over the attachment core.

No socket and no other process: the north's rings live in a bytearray
(``BufferMemory``), its kicks are eventfds of this process, and it calls the
core directly.  What a connector must supply is all here: an identity to
join with, a ``Memory``, transports, and the ``Hooks`` through which the core
tells the north about faults and revocations.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from vbus.connectors.base import Attachment, Limits, North, NorthCore
from vbus.core.members import Peer
from vbus.core.model import RevokeKind, Topology
from vbus.core.resources import Ledger
from vbus.ioq import IoqNorth, IoqSouth, pool_layout
from vbus.memory import BufferMemory
from vbus.signal import EventfdTransport


class LoopbackNorth:
    """One in-process north context; records what the core told it."""

    def __init__(self, connector: LoopbackConnector, identity: Peer) -> None:
        self.connector = connector
        self.events: list[tuple[str, int, str]] = []
        self.north: North = connector.core.north(identity, self)
        self.rings: list[tuple[IoqNorth, EventfdTransport]] = []

    # the core's hooks
    def faulted(self, handle: int, reason: str) -> None:
        self.events.append(("fault", handle, reason))

    def revoked(self, handle: int, kind: RevokeKind, reason: str) -> None:
        self.events.append((kind, handle, reason))

    def expelled(self, reason: str) -> None:
        self.events.append(("expelled", 0, reason))
        self.connector.norths.discard(self)

    def shm(
        self, attachment: Attachment, index: int, *, writable: bool, count: int = 64
    ) -> IoqNorth:
        """A ring in plain memory, registered as queue ``index``."""
        data, total = pool_layout(count, 256)
        buf = bytearray(total)
        kick = EventfdTransport(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
        call = EventfdTransport(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
        north = IoqNorth(buf, 0, count, data, 256, kick)
        memory = BufferMemory(buf)
        south = IoqSouth(memory, 0, count, call, writable=writable)
        self.north.account.take(shm=total)
        attachment.add_queue(index, south, kick, [kick, call, memory], held=(total, 0, 0))
        if writable:
            north.post_empty(count)
            north.signal.notify()
        self.rings.append((north, call))
        return north

    def close(self) -> None:
        self.north.release("closed by the client")
        self.connector.norths.discard(self)
        for ring, call in self.rings:
            ring.close()
            call.close()
        self.rings.clear()


class LoopbackConnector:
    name = "loopback"

    def __init__(
        self, topology: Topology, loop: asyncio.AbstractEventLoop, ledger: Ledger | None = None
    ) -> None:
        self.core = NorthCore(self.name, topology, loop, ledger, Limits())
        self.counters = self.core.counters
        self.norths: set[LoopbackNorth] = set()

    def connect(self, identity: Peer) -> LoopbackNorth | None:
        north = LoopbackNorth(self, identity)
        if north.north.join() is None:
            north.north.release("denied")
            return None
        self.norths.add(north)
        return north

    def start(self) -> None:
        pass

    def stop(self, reason: str) -> None:
        for north in list(self.norths):
            north.close()

    def clients(self) -> int:
        return len(self.norths)

    def describe(self) -> list[dict[str, Any]]:
        return [north.north.describe() for north in self.norths]

    def queue_totals(self) -> dict[str, int]:
        return self.core.queue_totals()
