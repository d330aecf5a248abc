"""A virtio split virtqueue behind the queue interface (docs/design.md 3.5, 4.7).

The driver (a guest's virtio driver, through its VMM) owns the descriptor
table and the available ring; the device, here, owns the used ring.  Layout
(virtio 1.x 2.7, little-endian, ``num`` a power of two of at most 32768):

```
descriptor table  num x {u64 addr, u32 len, u16 flags, u16 next}   16-byte aligned
available ring    u16 flags, u16 idx, u16 ring[num], u16 used_event   2-byte aligned
used ring         u16 flags, u16 idx, {u32 id, u32 len}[num], u16 avail_event   4-byte aligned
```

A ``Buffer`` is one descriptor chain (or, with a merge target, several:
below), its ``index`` the chain's head, its segments the chain's
descriptors in order, each cut where it crosses from one guest memory
region into the next (``GuestMemory.split``).  Indirect descriptors
(VIRTIO_RING_F_INDIRECT_DESC) are followed one level deep.

Everything the driver wrote is read once and checked before it is used: a
head or ``next`` outside the table, a loop, a chain longer than the ring
(or its indirect table), an indirect descriptor where it is not allowed, a
readable descriptor after a writable one, a buffer outside guest memory, an
available index that moved by more than the ring size, a head made
available twice, a used index changed behind the device's back: each is a
``Fault``, and the connection that owns the queue stops being serviced.

Notifications.  With VIRTIO_RING_F_EVENT_IDX the device writes
``avail_event`` when it re-enables notifications and signals the driver
only when the used index passes the driver's ``used_event``
(``vring_need_event``); without it, the device's ``VRING_USED_F_NO_NOTIFY``
and the driver's ``VRING_AVAIL_F_NO_INTERRUPT`` flags do the same job.

Merged buffers (VIRTIO_NET_F_MRG_RXBUF).  A device that writes one message
per buffer (venet) needs buffers at least as large as its largest message;
a driver that merges posts small ones.  With ``merge=(target, offset)``, a
south->north queue hands the device buffers made of as many chains as it
takes to hold ``target`` bytes; ``push`` uses only the chains the written
length covers (each its own used element, with its own length), writes
their count as a u16 at byte ``offset`` of the message (virtio-net's
``num_buffers``) and keeps the chains left over for the next buffer.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Sequence
from typing import Final, Literal

from vbus.errors import Fault, Invalid
from vbus.memory import GuestMemory
from vbus.queue import Buffer, QueueBase, QueueStats, Segment
from vbus.signal import Transport, fence

__all__ = [
    "DESC_F_INDIRECT",
    "DESC_F_NEXT",
    "DESC_F_WRITE",
    "F_EVENT_IDX",
    "F_INDIRECT_DESC",
    "F_VERSION_1",
    "VirtQueue",
    "ring_sizes",
]

F_INDIRECT_DESC: Final = 1 << 28
F_EVENT_IDX: Final = 1 << 29
F_VERSION_1: Final = 1 << 32
DESC_F_NEXT: Final = 1
DESC_F_WRITE: Final = 2
DESC_F_INDIRECT: Final = 4
AVAIL_F_NO_INTERRUPT: Final = 1
USED_F_NO_NOTIFY: Final = 1
DEFAULT_POLL_BYTES: Final = 4 << 20  # bytes one poll may take before it yields
_DESC: Final = struct.Struct("<QIHH")
_U16: Final = struct.Struct("<H")
_MAX_CHAIN_BYTES: Final = 1 << 32  # a used length is a u32


_Chain = tuple[int, tuple[Segment, ...], int]  # head, segments, writable capacity


def ring_sizes(num: int) -> tuple[int, int, int]:
    """Bytes of the descriptor table, the available ring and the used ring."""
    return 16 * num, 6 + 2 * num, 6 + 8 * num


class VirtQueue(QueueBase):
    """One split virtqueue, device side, over guest memory.

    ``desc``, ``avail``, ``used`` are guest-physical addresses, ``next_avail``
    the first available entry not consumed yet (SET_VRING_BASE), ``call``
    the transport that interrupts the driver.  The ring's parts must lie in
    ``memory``, aligned, the used ring writable (``Fault`` otherwise).
    """

    def __init__(
        self,
        memory: GuestMemory,
        num: int,
        desc: int,
        avail: int,
        used: int,
        call: Transport | None,
        *,
        writable: bool,
        next_avail: int = 0,
        event_idx: bool = False,
        indirect: bool = False,
        merge: tuple[int, int] | None = None,
        poll_bytes: int = DEFAULT_POLL_BYTES,
    ) -> None:
        if not 0 < num <= 32768 or num & (num - 1):
            raise Invalid(f"virtqueue size {num} is not a power of two of at most 32768")
        desc_len, avail_len, used_len = ring_sizes(num)
        if desc % 16 or avail % 2 or used % 4:
            raise Fault("virtqueue parts are not aligned (16, 2, 4 bytes)")
        memory.check(desc, desc_len)
        memory.check_write(used, used_len)
        self.memory: GuestMemory = memory
        self.num = num
        self.desc = desc
        self.writable = writable
        self.call = call
        self.stats = QueueStats()
        self.event_idx = event_idx
        self.indirect = indirect
        self.merge = merge if writable else None
        self.poll_bytes = poll_bytes
        self.next_avail = next_avail & 0xFFFF
        self._views: list[memoryview] = []
        # Aligned native u16/u32 views: one load or store per index, never torn.
        self._avail = self._cast(avail, avail_len, "H")  # flags, idx, ring[num], used_event
        self._used_head = self._cast(used, 4, "H")  # flags, idx
        self._used_ring = self._cast(used + 4, 8 * num, "I")  # {id, len}[num]
        self._avail_event = self._cast(used + 4 + 8 * num, 2, "H")
        self.used_idx = self._used_head[1]
        self._signalled = self.used_idx  # used index when the driver was last considered
        self._inflight: dict[int, Buffer] = {}
        self._merged: dict[int, list[_Chain]] = {}  # first head -> the chains of a merged buffer
        self._stash: deque[_Chain] = deque()  # chains taken from the ring, not used yet
        self._credit: int | None = None
        self.closed = False

    def _cast(self, addr: int, length: int, fmt: Literal["H", "I"]) -> memoryview[int]:
        view = self.memory.view(addr, length).cast(fmt)
        self._views.append(view)
        return view

    # --- the available side -----------------------------------------------------
    def _available(self) -> int:
        n = (self._avail[1] - self.next_avail) & 0xFFFF
        if n > self.num:
            raise Fault(
                f"available index moved {n} entries ahead of the device (ring of {self.num})"
            )
        return n

    def _take(self) -> tuple[int, tuple[Segment, ...]] | None:
        """The next available chain, validated, or None."""
        if not self._available():
            return None
        head = self._avail[2 + (self.next_avail & (self.num - 1))]
        if head >= self.num:
            raise Fault(f"available head {head} is outside the descriptor table of {self.num}")
        if head in self._inflight or head in self._merged:
            raise Fault(f"descriptor chain {head} made available while the device holds it")
        segments = self._chain(head)
        self.next_avail = (self.next_avail + 1) & 0xFFFF
        return head, segments

    def _chain(self, head: int) -> tuple[Segment, ...]:
        read = self.memory.read
        split = self.memory.split
        table, size, i = self.desc, self.num, head
        in_indirect = False
        seen: set[int] = set()
        segments: list[Segment] = []
        total = 0
        writing = False
        while True:
            if i in seen:
                where = "indirect table" if in_indirect else "descriptor table"
                raise Fault(f"descriptor loop in chain {head} (entry {i} of the {where} again)")
            if len(seen) >= size:
                raise Fault(f"descriptor chain {head} is longer than its table ({size})")
            seen.add(i)
            addr, length, flags, nxt = _DESC.unpack(read(table + 16 * i, 16))
            if flags & DESC_F_INDIRECT:
                if not self.indirect:
                    raise Fault(f"chain {head}: indirect descriptor, INDIRECT_DESC not negotiated")
                if in_indirect:
                    raise Fault(f"chain {head}: an indirect descriptor inside an indirect table")
                if flags & DESC_F_NEXT:
                    raise Fault(f"chain {head}: indirect descriptor with NEXT set")
                if not length or length % 16 or length // 16 > 32768:
                    raise Fault(f"chain {head}: indirect table of {length} bytes")
                self.memory.check(addr, length)
                table, size, i = addr, length // 16, 0
                in_indirect = True
                seen = set()
                continue
            write = bool(flags & DESC_F_WRITE)
            if writing and not write:
                raise Fault(f"chain {head}: a device-readable descriptor after a writable one")
            writing = write
            if length:
                total += length
                if total >= _MAX_CHAIN_BYTES:
                    raise Fault(f"chain {head} holds 4 GiB or more")
                for piece, piece_len in split(addr, length, write=write):
                    segments.append((piece, piece_len, write))
            if not flags & DESC_F_NEXT:
                return tuple(segments)
            if nxt >= size:
                raise Fault(f"chain {head}: next {nxt} is outside its table ({size})")
            i = nxt

    # --- the core -----------------------------------------------------------------
    def pending(self) -> int:
        self._check_open()
        if self.merge is None:
            return self._available()
        self._fill_stash()
        return self._mergeable()

    def pop(self) -> Buffer | None:
        self._check_open()
        credit = self._credit
        if credit is not None and credit <= 0:
            return None
        if self.merge is not None:
            buf = self._pop_merged()
        else:
            taken = self._take()
            if taken is None:
                return None
            buf = Buffer(taken[0], 0, taken[1])
            self._inflight[buf.index] = buf
        if buf is not None and credit is not None:
            self._credit = credit - buf.length
        return buf

    def push(self, buf: Buffer, written: int = 0) -> None:
        self._publish(self._used(buf, written))

    def push_many(self, items: Sequence[tuple[Buffer, int]]) -> None:
        elems: list[tuple[int, int]] = []
        for buf, written in items:
            elems += self._used(buf, written)
        self._publish(elems)

    def _used(self, buf: Buffer, written: int) -> list[tuple[int, int]]:
        """The used elements completing ``buf`` (checked, not yet published)."""
        self._check_open()
        head = buf.index
        if not 0 <= written <= buf.capacity:
            raise Invalid(f"written {written} is outside 0..{buf.capacity}")
        self.stats.messages += 1
        if self.merge is not None:
            chains = self._merged.get(head)
            if chains is None or self._inflight.get(head) is not buf:
                raise Invalid("push of a buffer this queue did not pop, or pushed already")
            del self._merged[head]
            del self._inflight[head]
            self.stats.bytes += written
            return self._merged_used(buf, chains, written)
        if self._inflight.get(head) is not buf:
            raise Invalid("push of a buffer this queue did not pop, or pushed already")
        del self._inflight[head]
        self.stats.bytes += written if self.writable else buf.length
        return [(head, written)]

    def _publish(self, elems: list[tuple[int, int]]) -> None:
        if not elems:
            return
        used_idx = self.used_idx
        if self._used_head[1] != used_idx:
            raise Fault(
                f"the used ring's index was changed by the driver "
                f"({self._used_head[1]}, the device wrote {used_idx})"
            )
        ring = self._used_ring
        mask = self.num - 1
        for head, length in elems:
            slot = 2 * (used_idx & mask)
            ring[slot] = head
            ring[slot + 1] = length
            used_idx = (used_idx + 1) & 0xFFFF
        # x86 keeps stores in order: the elements are visible before the index.
        self._used_head[1] = used_idx
        self.used_idx = used_idx

    def kick_north(self) -> bool:
        self._check_open()
        new = self.used_idx
        old = self._signalled
        if new == old:
            return False
        self._signalled = new
        fence()  # the new used index is visible before the driver's flag or event is read
        if self.event_idx:
            used_event = self._avail[2 + self.num]
            needed = ((new - used_event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
        else:
            needed = not self._avail[0] & AVAIL_F_NO_INTERRUPT
        if needed and self.call is not None:
            self.call.kick()
            self.stats.signals_sent += 1
            return True
        self.stats.signals_suppressed += 1
        return False

    def disable_notify(self) -> None:
        self._check_open()
        self._credit = self.poll_bytes
        if not self.event_idx:
            self._used_head[0] = self._used_head[0] | USED_F_NO_NOTIFY

    def enable_notify(self) -> bool:
        self._check_open()
        self._credit = None
        if self.event_idx:
            self._avail_event[0] = self.next_avail
        else:
            self._used_head[0] = self._used_head[0] & ~USED_F_NO_NOTIFY
        fence()  # the request to be kicked is visible before the index is read again
        return self.pending() > 0

    # --- merged buffers -------------------------------------------------------------
    def _fill_stash(self) -> None:
        while True:
            taken = self._take()
            if taken is None:
                return
            head, segments = taken
            capacity = sum(seg[1] for seg in segments if seg[2])
            self._stash.append((head, segments, capacity))

    def _mergeable(self) -> int:
        assert self.merge is not None
        target = self.merge[0]
        count = have = 0
        for _head, _segments, capacity in self._stash:
            have += capacity
            if have >= target:
                count += 1
                have = 0
        return count

    def _pop_merged(self) -> Buffer | None:
        assert self.merge is not None
        target = self.merge[0]
        self._fill_stash()
        stash = self._stash
        have = 0
        take = 0
        for _head, _segments, capacity in stash:
            have += capacity
            take += 1
            if have >= target:
                break
        else:
            return None
        chains = [stash.popleft() for _ in range(take)]
        segments = [seg for _head, segs, _capacity in chains for seg in segs]
        buf = Buffer(chains[0][0], 0, tuple(segments))
        self._merged[buf.index] = chains
        self._inflight[buf.index] = buf
        return buf

    def _merged_used(
        self, buf: Buffer, chains: list[_Chain], written: int
    ) -> list[tuple[int, int]]:
        elems: list[tuple[int, int]] = []
        left = written
        for head, _segments, capacity in chains:
            if elems and not left:
                break
            part = min(left, capacity)
            elems.append((head, part))
            left -= part
        # The chains left over go back in front of the stash, in ring order:
        # the next buffer starts with them.
        self._stash.extendleft(reversed(chains[len(elems) :]))
        offset = self.merge[1] if self.merge is not None else 0
        if written >= offset + 2:
            self._write_at(buf, offset, _U16.pack(len(elems)))
        return elems

    def _write_at(self, buf: Buffer, offset: int, data: bytes) -> None:
        """``data`` at byte ``offset`` of ``buf``'s writable segments."""
        at = 0
        for addr, length, writable in buf.segments:
            if not writable:
                continue
            if offset < at + length:
                start = offset - at
                piece = data[: length - start]
                self.memory.write(addr + start, piece)
                data = data[len(piece) :]
                offset += len(piece)
                if not data:
                    return
            at += length

    # --- restart and teardown -------------------------------------------------------
    def stop(self) -> int:
        """Stop the queue: the available index to resume from (GET_VRING_BASE).
        Chains taken for merging and never used are given back by resuming
        before them."""
        next_avail = (self.next_avail - len(self._stash)) & 0xFFFF
        self.close()
        return next_avail

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for view in self._views:
            view.release()
        self._views.clear()
        self._inflight.clear()
        self._merged.clear()
        self._stash.clear()

    def _check_open(self) -> None:
        if self.closed:
            raise Invalid("the virtqueue is stopped")
