"""The driver's side of a split virtqueue, in Python: a guest for tests, the soak and the bench.

``GuestRam`` is guest-physical memory in one buffer (a bytearray, or the
mapping of a memfd shared with the daemon) at a guest base address;
``Driver`` lays out one split virtqueue in it (virtio 1.x 2.7, the layout
in ``vbus.vhost.virtq``) and plays the driver: it posts descriptor chains,
direct or indirect, reads the used ring, and keeps the notification fields
(``used_event``, ``VRING_AVAIL_F_NO_INTERRUPT``) and its side of EVENT_IDX.
It trusts nothing it does not write itself only as far as a test needs;
hostile tests write the ring's fields directly (``poke``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Final

from vbus.memory import SharedBuffer

__all__ = ["Driver", "GuestRam"]

_DESC: Final = struct.Struct("<QIHH")
_U16: Final = struct.Struct("<H")
_ELEM: Final = struct.Struct("<II")
NEXT, WRITE, INDIRECT = 1, 2, 4


@dataclass
class GuestRam:
    """``buf`` as guest-physical memory from ``base`` on; a bump allocator."""

    buf: SharedBuffer
    base: int = 0
    top: int = 0

    def alloc(self, size: int, align: int = 64) -> int:
        at = -(-self.top // align) * align
        if at + size > len(self.buf):
            raise MemoryError("guest RAM exhausted")
        self.top = at + size
        return self.base + at

    def write(self, gpa: int, data: bytes) -> None:
        at = gpa - self.base
        self.buf[at : at + len(data)] = data

    def read(self, gpa: int, n: int) -> bytes:
        at = gpa - self.base
        return bytes(self.buf[at : at + n])

    def u16(self, gpa: int) -> int:
        value: int = _U16.unpack(self.read(gpa, 2))[0]
        return value

    def put_u16(self, gpa: int, value: int) -> None:
        self.write(gpa, _U16.pack(value & 0xFFFF))


@dataclass
class Driver:
    """One split virtqueue of ``num`` entries in ``ram``."""

    ram: GuestRam
    num: int = 256
    desc: int = 0
    avail: int = 0
    used: int = 0
    avail_idx: int = 0
    last_used: int = 0
    free: list[int] = field(default_factory=list)
    chains: dict[int, list[int]] = field(default_factory=dict)  # head -> its descriptors

    def __post_init__(self) -> None:
        self.desc = self.ram.alloc(16 * self.num, 4096)
        self.avail = self.ram.alloc(6 + 2 * self.num, 2)
        self.used = self.ram.alloc(6 + 8 * self.num, 4096)
        self.free = list(range(self.num))

    # --- posting ------------------------------------------------------------------
    def write_desc(self, i: int, addr: int, length: int, flags: int, nxt: int = 0) -> None:
        self.ram.write(self.desc + 16 * i, _DESC.pack(addr, length, flags, nxt))

    def chain(self, parts: list[tuple[int, int, bool]], *, publish: bool = True) -> int:
        """Post one chain of ``(gpa, length, writable)``; its head."""
        ids = [self.free.pop(0) for _ in parts]
        for n, (i, (addr, length, writable)) in enumerate(zip(ids, parts, strict=True)):
            last = n == len(parts) - 1
            flags = (WRITE if writable else 0) | (0 if last else NEXT)
            self.write_desc(i, addr, length, flags, 0 if last else ids[n + 1])
        self.chains[ids[0]] = ids
        if publish:
            self.make_available(ids[0])
        return ids[0]

    def indirect(self, parts: list[tuple[int, int, bool]], *, publish: bool = True) -> int:
        """Post one chain through an indirect table; its head."""
        table = self.ram.alloc(16 * len(parts), 16)
        for n, (addr, length, writable) in enumerate(parts):
            last = n == len(parts) - 1
            flags = (WRITE if writable else 0) | (0 if last else NEXT)
            self.ram.write(table + 16 * n, _DESC.pack(addr, length, flags, 0 if last else n + 1))
        head = self.free.pop(0)
        self.write_desc(head, table, 16 * len(parts), INDIRECT)
        self.chains[head] = [head]
        if publish:
            self.make_available(head)
        return head

    def buffer(self, data: bytes | int, *, writable: bool | None = None) -> int:
        """Post one single-descriptor buffer: bytes to send, or room of that size."""
        if isinstance(data, int):
            gpa = self.ram.alloc(data, 16)
            return self.chain([(gpa, data, True if writable is None else writable)])
        gpa = self.ram.alloc(len(data), 16)
        self.ram.write(gpa, data)
        return self.chain([(gpa, len(data), bool(writable))])

    def make_available(self, head: int) -> None:
        self.ram.put_u16(self.avail + 4 + 2 * (self.avail_idx % self.num), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.ram.put_u16(self.avail + 2, self.avail_idx)

    # --- completions ----------------------------------------------------------------
    def used_idx(self) -> int:
        return self.ram.u16(self.used + 2)

    def take_used(self) -> list[tuple[int, int]]:
        """Used elements since the last call ``(head, len)``; their descriptors are freed."""
        out = []
        end = self.used_idx()
        while self.last_used != end:
            slot = self.used + 4 + 8 * (self.last_used % self.num)
            head, length = _ELEM.unpack(self.ram.read(slot, 8))
            out.append((head, length))
            self.free.extend(self.chains.pop(head, []))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out

    # --- notification fields --------------------------------------------------------
    def set_used_event(self, value: int) -> None:
        self.ram.put_u16(self.avail + 4 + 2 * self.num, value)

    def set_no_interrupt(self, on: bool) -> None:
        self.ram.put_u16(self.avail, 1 if on else 0)

    def avail_event(self) -> int:
        return self.ram.u16(self.used + 4 + 8 * self.num)

    def used_flags(self) -> int:
        return self.ram.u16(self.used)

    def wants_kick(self, old_avail: int) -> bool:
        """EVENT_IDX: must the driver kick after moving avail from ``old_avail``?"""
        event = self.avail_event()
        return ((self.avail_idx - event - 1) & 0xFFFF) < ((self.avail_idx - old_avail) & 0xFFFF)

    def poke(self, gpa: int, data: bytes) -> None:
        """Write anything anywhere: a hostile driver."""
        self.ram.write(gpa, data)
