"""Grant tables: what a domain lets another map of its memory (Xen's public grant_table.h).

A domain's grant table is an array of ``struct grant_entry_v1`` in a memfd it
shares when it attaches::

    u16 flags   GTF_permit_access (type), GTF_readonly; GTF_reading / GTF_writing set by Xen
    u16 domid   the domain allowed to map it
    u32 frame   the granting domain's page frame (gfn)

The domain fills ``domid`` and ``frame``, then (after a barrier) ``flags``;
it ends access with a compare-and-swap of ``flags`` to 0 that must see
neither GTF_reading nor GTF_writing, so a grant that is mapped cannot be
taken back.  The backend maps a reference only if the entry grants
``GTF_permit_access`` to dom0 and its frame lies inside that domain's
memory; it pins the entry by a compare-and-swap of ``flags`` and ``domid``
together (one u32, as Xen's ``_set_status_v1``), setting GTF_reading, and
GTF_writing unless GTF_readonly.  A read-only grant is mapped from a
read-only mapping of the domain's memory.  Pins are counted per reference;
the last unmap clears both bits with an atomic AND.

Every access to the table goes through ``atomicshm`` (aligned, atomic,
sequentially consistent; docs/design.md 3.2): the domain writes the same
words from its own process at any moment.
"""

from __future__ import annotations

import mmap
from typing import Final

from atomicshm import AtomicView, fence

from vbus.errors import Fault, Invalid
from vbus.memory import PAGE_SIZE, PageMemory, SharedBuffer

__all__ = [
    "ENTRY_SIZE",
    "GTF_PERMIT_ACCESS",
    "GTF_READING",
    "GTF_READONLY",
    "GTF_WRITING",
    "GrantMapper",
    "GrantMemory",
    "GrantTable",
]

ENTRY_SIZE: Final = 8
GTF_INVALID: Final = 0
GTF_PERMIT_ACCESS: Final = 1
GTF_TYPE_MASK: Final = 3
GTF_READONLY: Final = 1 << 2
GTF_READING: Final = 1 << 3
GTF_WRITING: Final = 1 << 4
_IN_USE = GTF_READING | GTF_WRITING
_PIN_TRIES = 64  # compare-and-swap rounds lost to a domain rewriting its entry


class GrantTable:
    """The shared array, for either side: the domain grants and ends access,
    the backend pins and unpins (both through atomic operations)."""

    def __init__(self, buf: SharedBuffer) -> None:
        if len(buf) < ENTRY_SIZE or len(buf) % ENTRY_SIZE:
            raise Invalid(f"a grant table of {len(buf)} bytes is not whole entries")
        self.buf = buf
        self.entries = len(buf) // ENTRY_SIZE
        self.atomic = AtomicView(buf)

    def _offset(self, ref: int) -> int:
        if not 0 <= ref < self.entries:
            raise Fault(f"grant reference {ref} is outside the {self.entries}-entry table")
        return ref * ENTRY_SIZE

    def entry(self, ref: int) -> tuple[int, int, int]:
        """(flags, domid, frame), each read atomically."""
        at = self._offset(ref)
        word = self.atomic.load_u32(at)
        return word & 0xFFFF, word >> 16, self.atomic.load_u32(at + 4)

    # --- the granting domain ----------------------------------------------------------
    def grant(self, ref: int, domid: int, frame: int, *, readonly: bool = False) -> None:
        """Introduce a valid entry: domid, frame, barrier, then flags."""
        at = self._offset(ref)
        if self.atomic.load_u16(at) & GTF_TYPE_MASK:
            raise Invalid(f"grant reference {ref} is in use")
        self.atomic.store_u16(at + 2, domid)
        self.atomic.store_u32(at + 4, frame)
        fence()
        self.atomic.store_u16(at, GTF_PERMIT_ACCESS | (GTF_READONLY if readonly else 0))

    def end_access(self, ref: int) -> bool:
        """Invalidate an entry; False (and nothing changed) while it is mapped."""
        at = self._offset(ref)
        while True:
            flags = self.atomic.load_u16(at)
            if flags & _IN_USE:
                return False
            if self.atomic.cas_u16(at, flags, 0) == flags:
                return True

    # --- the backend ----------------------------------------------------------------------
    def pin(self, ref: int, domid: int) -> tuple[int, bool]:
        """Pin ``ref`` for ``domid``: (frame, readonly).  ``Fault`` unless the
        entry grants access to ``domid``."""
        at = self._offset(ref)
        for _ in range(_PIN_TRIES):
            word = self.atomic.load_u32(at)
            flags, granted = word & 0xFFFF, word >> 16
            if flags & GTF_TYPE_MASK != GTF_PERMIT_ACCESS:
                raise Fault(f"grant reference {ref} grants no access (flags {flags:#x})")
            if granted != domid:
                raise Fault(f"grant reference {ref} is for domain {granted}, not {domid}")
            readonly = bool(flags & GTF_READONLY)
            new = flags | GTF_READING | (0 if readonly else GTF_WRITING)
            if self.atomic.cas_u32(at, word, (granted << 16) | new) == word:
                return self.atomic.load_u32(at + 4), readonly
        raise Fault(f"grant reference {ref} keeps changing under the backend")

    def unpin(self, ref: int) -> None:
        self.atomic.fetch_and_u16(self._offset(ref), ~_IN_USE & 0xFFFF)

    def close(self) -> None:
        self.atomic.close()


class GrantMapper:
    """One domain's grants as the backend maps them: pins counted per reference,
    frames checked against the domain's memory."""

    def __init__(self, table: GrantTable, rw: mmap.mmap, ro: mmap.mmap, *, backend: int = 0):
        self.table = table
        self.rw = rw
        self.ro = ro
        self.pages = len(rw) // PAGE_SIZE
        self.backend = backend
        self.pins: dict[int, tuple[int, int, bool]] = {}  # ref -> (count, frame, readonly)

    def map(self, ref: int) -> tuple[mmap.mmap, int, bool]:
        """(mapping, offset, readonly) of the page ``ref`` grants; ``Fault`` if it may not."""
        pinned = self.pins.get(ref)
        if pinned is not None:
            count, frame, readonly = pinned
            self.pins[ref] = (count + 1, frame, readonly)
        else:
            frame, readonly = self.table.pin(ref, self.backend)
            if frame >= self.pages:
                self.table.unpin(ref)
                raise Fault(
                    f"grant reference {ref} names frame {frame}, outside the domain's "
                    f"{self.pages} pages"
                )
            self.pins[ref] = (1, frame, readonly)
        return (self.ro if readonly else self.rw), frame * PAGE_SIZE, readonly

    def unmap(self, ref: int) -> None:
        count, frame, readonly = self.pins[ref]
        if count > 1:
            self.pins[ref] = (count - 1, frame, readonly)
            return
        del self.pins[ref]
        self.table.unpin(ref)

    def release(self) -> None:
        for ref in list(self.pins):
            del self.pins[ref]
            self.table.unpin(ref)

    @property
    def mapped(self) -> int:
        return len(self.pins)


class GrantMemory(PageMemory):
    """A device connection's ``Memory``: exactly the grants it mapped, at
    ``ref * 4096`` (nothing else of the domain's memory is reachable)."""

    __slots__ = ("mapper", "refs")

    def __init__(self, mapper: GrantMapper, *, max_pages: int = 4096) -> None:
        super().__init__(max_pages=max_pages)
        self.mapper = mapper
        self.refs: list[int] = []

    def map_grant(self, ref: int) -> None:
        if ref in self.refs:
            raise Fault(f"grant reference {ref} is listed twice")
        if len(self.refs) >= self.max_pages:
            raise Fault(f"more than {self.max_pages} grants on one device")
        buf, offset, readonly = self.mapper.map(ref)
        try:
            self.map_page(ref, buf, offset, readonly=readonly)
        except Invalid as exc:
            self.mapper.unmap(ref)
            raise Fault(exc.message) from None
        self.refs.append(ref)

    def readonly(self, ref: int) -> bool:
        return self.mapper.pins[ref][2]

    def close(self) -> None:
        """Unmap every grant (the domain may end access to them again)."""
        self.release()
        for ref in self.refs:
            self.unmap_page(ref)
            self.mapper.unmap(ref)
        self.refs.clear()
