"""A vif's two rings as the two queues of a venet port (docs/design.md 4.8).

The device model sees the queue contract of ``vbus.queue`` (3.5), as it
does over ioq rings and virtqueues; underneath are Xen's netif rings
(``vbus.xen.netif``) in the frontend's granted pages, and the data moves
by grant copy (``GrantCopier``: the hypervisor copies between the domU's
pages and a buffer of this process; nothing of the domU but its two ring
pages is ever mapped).  That copy is the one copy of every byte: what the
domU granted is read once, into memory the domU cannot touch, and only then
parsed.

- ``NetifTx`` (queue 0, north->south): each transmitted packet is checked
  by ``TxBackRing.next_packet`` (a breach is a ``Fault``), its fragments
  copied in one batch with the other packets of the poll, its netif flags
  turned into a ``virtio_net_hdr_v1`` (``tx_to_venet``), and its slots
  answered: NETIF_RSP_OKAY, or NETIF_RSP_ERROR for a frame venet cannot take.
- ``NetifRx`` (queue 1, south->north): a posted buffer is room for one venet
  frame in a local staging slot, offered while the frontend has posted
  enough rx requests for the largest frame the port negotiated (a page per
  4 KiB, one more for a GSO extra).  When the device completes it, the frame
  is translated (``venet_to_rx``), placed on the ring (``RxBackRing.place``),
  copied into the frontend's pages and its responses staged.
- ``kick_north`` publishes the responses and notifies the event channel
  when the frontend asked (``rsp_event``); ``enable_notify`` arms
  ``req_event`` and looks once more (``RING_FINAL_CHECK_FOR_REQUESTS`` on
  tx; on rx at the next request while too few are posted for a frame, as
  netback's ``xenvif_rx_ring_slots_available``).
  One event channel serves both rings (``PortKick``, the poller's transport).

A grant copy that fails (a grant the domU revoked, a reference that is not
its to give) is a ``Fault``: the vif is disconnected, as for any other breach.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from vbus.errors import Fault, Invalid
from vbus.memory import BufferMemory
from vbus.net import vnet
from vbus.queue import Buffer, QueueBase, QueueStats
from vbus.xen.dom0 import GNTST, EventChannels, GrantCopier
from vbus.xen.netif import (
    MAX_TX_SIZE,
    PAGE_SIZE,
    RSP_ERROR,
    RSP_OKAY,
    BackRing,
    RxBackRing,
    TxBackRing,
    TxPacket,
    tx_to_venet,
    venet_to_rx,
)

__all__ = ["TX_BATCH_BYTES", "NetifRx", "NetifTx", "PortKick", "rx_slots"]

# A poll's packets are copied in one batch into a buffer of this size (plus
# one largest packet): past it the poll stops taking packets.
TX_BATCH_BYTES: Final = 1 << 20
TX_BATCH_PACKETS: Final = 64
_SEGMENTS_PER_PACKET: Final = 19  # netif's first slot and 18 more (LEGACY_SLOTS_MAX)
_TX_POP_SLOTS: Final = 16  # buffers popped one by one (the core form) at a time
_TX_SLOT: Final = vnet.HDR_SIZE + MAX_TX_SIZE


def _copy_failed(statuses: list[int], what: str) -> Fault | None:
    for status in statuses:
        if status:
            return Fault(f"{what}: grant copy failed ({GNTST.get(status, status)})")
    return None


class PortKick:
    """The vif's event channel as a ``Transport``: readable when the domU
    notifies, ``kick`` notifies it.  The port is the only one bound on its
    ``EventChannels`` (each vif opens its own), which owns and closes it."""

    def __init__(self, chans: EventChannels, port: int) -> None:
        self.chans = chans
        self.port = port
        self.fd = chans.fileno()
        self.kicks = 0

    def kick(self) -> None:
        self.chans.notify(self.port)
        self.kicks += 1

    def drain(self) -> int:
        fired = self.chans.pending()
        for port in set(fired):
            self.chans.unmask(port)  # the driver masked it when it fired
        return len(fired)

    def close(self) -> None:
        self.fd = -1


class _Ring(QueueBase):
    """What both queues share: the stats, the kick, the close."""

    ring: BackRing

    def __init__(self, copier: GrantCopier, kick: PortKick) -> None:
        self.copier = copier
        self.kick = kick
        self.stats = QueueStats()
        self.closed = False
        self._published = 0  # rsp_prod_pvt when last pushed

    def _live(self) -> None:
        if self.closed:
            raise Invalid("the vif's queue is closed")

    def kick_north(self) -> bool:
        self._live()
        ring = self.ring
        if ring.rsp_prod_pvt == self._published:
            return False
        self._published = ring.rsp_prod_pvt
        if ring.push():
            self.kick.kick()
            self.stats.signals_sent += 1
            return True
        self.stats.signals_suppressed += 1
        return False

    def disable_notify(self) -> None:
        # netif's mitigation is req_event: it stays behind req_cons until
        # ``enable_notify`` arms it, and the frontend notifies only past it.
        self._live()

    def close(self) -> None:
        self.closed = True


class NetifTx(_Ring):
    """Queue 0 of a vif's venet port: the frontend's packets."""

    writable = False

    def __init__(self, ring: TxBackRing, copier: GrantCopier, kick: PortKick) -> None:
        super().__init__(copier, kick)
        if copier.size < TX_BATCH_BYTES + MAX_TX_SIZE:
            raise Invalid("the tx copier's buffer is smaller than a batch")
        self.ring: TxBackRing = ring
        self.refused = 0  # packets venet cannot take, answered NETIF_RSP_ERROR
        self._pop_buf = bytearray(_TX_POP_SLOTS * _TX_SLOT)
        self.memory = BufferMemory(self._pop_buf)
        self._popped: dict[int, TxPacket] = {}
        self._free = list(range(_TX_POP_SLOTS - 1, -1, -1))

    def pending(self) -> int:
        self._live()
        return self.ring.unconsumed()

    def enable_notify(self) -> bool:
        self._live()
        return self.ring.final_check()

    def _take(self, budget: int) -> list[TxPacket]:
        """Up to ``budget`` whole packets, their bytes queued on the copier."""
        ring = self.ring
        copier = self.copier
        packets: list[TxPacket] = []
        at = 0
        while len(packets) < budget and at < TX_BATCH_BYTES:
            packet = ring.next_packet()
            if packet is None:
                break
            packets.append(packet)
            for gref, offset, length in packet.fragments:
                if length:
                    copier.from_grant(gref, offset, length, at)
                    at += length
        return packets

    def _frames(self, packets: list[TxPacket]) -> list[bytes | None]:
        """Copy the queued fragments; each packet as a venet frame, or None
        (answered NETIF_RSP_ERROR)."""
        failed = _copy_failed(self.copier.run(), "a transmitted packet")
        if failed is not None:
            raise failed
        view = self.copier.buffer
        frames: list[bytes | None] = []
        at = 0
        for packet in packets:
            size = packet.size
            frames.append(tx_to_venet(packet, bytes(view[at : at + size])))
            at += size
        return frames

    def read_many(self, budget: int) -> list[bytes]:
        self._live()
        packets = self._take(min(budget, TX_BATCH_PACKETS))
        if not packets:
            return []
        out: list[bytes] = []
        respond = self.ring.respond
        for packet, frame in zip(packets, self._frames(packets), strict=True):
            if frame is None:
                self.refused += 1
                respond(packet, RSP_ERROR)
                continue
            respond(packet, RSP_OKAY)
            out.append(frame)
        self.stats.messages += len(packets)
        self.stats.bytes += sum(map(len, out))
        return out

    def pop(self) -> Buffer | None:
        self._live()
        while self._free:
            packets = self._take(1)
            if not packets:
                return None
            packet = packets[0]
            frame = self._frames(packets)[0]
            if frame is None:
                self.refused += 1
                self.ring.respond(packet, RSP_ERROR)
                self.stats.messages += 1
                continue
            slot = self._free.pop()
            self.memory.write(slot * _TX_SLOT, frame)
            self._popped[slot] = packet
            return Buffer(slot, 0, ((slot * _TX_SLOT, len(frame), False),))
        return None

    def push(self, buf: Buffer, written: int = 0) -> None:
        self._live()
        packet = self._popped.pop(buf.index, None)
        if packet is None:
            raise Invalid(f"buffer {buf.index} was not popped from this queue")
        if written:
            self._popped[buf.index] = packet
            raise Invalid("a tx buffer has nothing to write into")
        self.ring.respond(packet, RSP_OKAY)
        self._free.append(buf.index)
        self.stats.messages += 1
        self.stats.bytes += buf.length


def rx_slots(capacity: int, gso: bool) -> int:
    """Rx requests the largest frame of ``capacity`` bytes (header included) takes."""
    body = max(1, capacity - vnet.HDR_SIZE)
    return -(-body // PAGE_SIZE) + (1 if gso else 0)


class NetifRx(_Ring):
    """Queue 1 of a vif's venet port: room for frames to the frontend.

    ``capacity`` is the largest frame the port may deliver (header
    included); ``gso`` whether it may be a super-frame (a GSO extra).  The
    copier's buffer is the staging memory: ``slots`` buffers of ``capacity``.
    """

    writable = True

    def __init__(
        self, ring: RxBackRing, copier: GrantCopier, kick: PortKick, capacity: int, gso: bool
    ) -> None:
        super().__init__(copier, kick)
        self.ring: RxBackRing = ring
        self.capacity = capacity
        self.per_frame = rx_slots(capacity, gso)
        self.slots = copier.size // capacity
        if self.slots < 1:
            raise Invalid("the rx copier's buffer holds no frame")
        self.memory = BufferMemory(copier.array)
        self.refused = 0  # frames netif cannot carry (dropped)
        self._reserved = 0  # requests held for popped buffers
        self._popped: set[int] = set()
        self._free = list(range(self.slots - 1, -1, -1))

    def pending(self) -> int:
        self._live()
        room = (self.ring.unconsumed() - self._reserved) // self.per_frame
        return max(0, min(room, len(self._free)))

    def enable_notify(self) -> bool:
        self._live()
        # Not final_check: requests may be there, only too few for the largest
        # frame, and the frontend must then notify at its next one.
        self.ring.slots_available(self._reserved + self.per_frame)
        return self.pending() > 0

    def pop(self) -> Buffer | None:
        if self.pending() == 0:
            return None
        slot = self._free.pop()
        self._popped.add(slot)
        self._reserved += self.per_frame
        return Buffer(slot, 0, ((slot * self.capacity, self.capacity, True),))

    def push(self, buf: Buffer, written: int = 0) -> None:
        self.push_many(((buf, written),))

    def push_many(self, items: Sequence[tuple[Buffer, int]]) -> None:
        self._live()
        seen: set[int] = set()
        for buf, written in items:
            if buf.index not in self._popped or buf.index in seen:
                raise Invalid(f"buffer {buf.index} was not popped, or is handed back twice")
            if not 0 <= written <= self.capacity:
                raise Invalid(f"written {written} is outside 0..{self.capacity}")
            seen.add(buf.index)
        view = self.copier.buffer
        ring = self.ring
        copier = self.copier
        delivered = 0
        nbytes = 0
        for buf, written in items:
            slot = buf.index
            self._popped.discard(slot)
            self._free.append(slot)
            self._reserved -= self.per_frame
            if not written:
                continue
            at = slot * self.capacity
            meta = venet_to_rx(view[at : at + written])
            if meta is None:
                self.refused += 1
                continue
            copies = ring.place(meta)
            if copies is None:  # cannot happen: the requests were reserved
                self.refused += 1
                continue
            body = at + vnet.HDR_SIZE
            for copy in copies:
                copier.to_grant(copy.gref, 0, body + copy.start, copy.length)
            delivered += 1
            nbytes += written - vnet.HDR_SIZE
        failed = _copy_failed(copier.run(), "a received frame")
        if failed is not None:
            raise failed
        self.stats.messages += delivered
        self.stats.bytes += nbytes
