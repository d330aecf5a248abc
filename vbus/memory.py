"""Memory a north context shares with the south, behind one bounds-checked interface.

A device model sees ``Memory`` only: ``read``/``write``/``view`` at an address,
whatever backs it.  Userspace regions are sealed memfds (docs/design.md 3.1): an
unsealed file could be truncated under our mapping and kill the daemon with
SIGBUS, so it is refused at registration, as is anything that is not a memfd.
Every address the north hands us is checked here; a bad one is a ``Fault`` of
that north context.

Only shmem (tmpfs) memfds are taken.  Seals stop truncation, but a hugetlbfs
memfd can still lose pages under our mapping (``fallocate(PUNCH_HOLE)`` then
an empty huge-page pool), and the daemon's next access would die of SIGBUS;
on shmem a punched hole just reads back as fresh zero pages.

Three shapes of north memory, one protocol:

- ``BufferMemory`` / ``MemfdRegion``: one region, addresses are offsets into
  it (the userspace connector's sealed memfd).  The ring's fast path slices
  its buffer directly.
- ``GuestMemory``: guest-physical RAM in several regions, each a guest base,
  a size and a window of a backing mapping (a KVM memory table, vhost-user's
  SET_MEM_TABLE).  ``from_memfds`` builds one from the VMM's sealed memfds
  with the same checks as ``MemfdRegion``.
- ``PageMemory``: pages mapped one by one (Xen grants): address = page
  number * 4 KiB + offset.  A GuestMemory with one region per page would do
  the same job, but grants come and go at run time (a GuestMemory is fixed
  at construction and would be rebuilt, O(regions), per grant), a netfront
  alone maps hundreds of them (past any sane region bound, and each lookup
  a bisection instead of one dict probe).

An access never spans two regions (nor two pages), even where they are
contiguous in guest-physical space.  Each access is one translation to one
(buffer, offset) and one slice of one mapping; ``view()`` can only hand out
one live memoryview of one mapping, and a copy stitched from two would
break what a view promises (live, no double fetch hidden in it).  KVM
memory tables are rarely contiguous anyway, and where vhost-user lets a
virtio descriptor run from one region into the next, that is the queue's
business: ``GuestMemory.split`` cuts such a range into one piece per
region, and the virtqueue makes each piece a segment of the ``Buffer``
(segments are part of the queue interface).  vbus's own ring (ioq) has one
segment per descriptor, so there a buffer crossing a region boundary is a
``Fault`` of the north, as a buffer outside its memory is.

Read-only regions (KVM_MEM_READONLY slots, read-only grants) are refused to
every south write: ``write``, ``check_write``, ``translate(write=True)``;
``view``/``cast`` of them give read-only views, and ``from_memfds`` maps
them without PROT_WRITE, so even a stray store raises instead of landing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import mmap
import os
import stat
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Literal, Protocol, TypeAlias

from vbus.errors import Exists, Fault, Invalid, NotFound, TooBig

__all__ = [
    "PAGE_SIZE",
    "REQUIRED_SEALS",
    "BufferMemory",
    "GuestMemory",
    "GuestRegion",
    "MemfdRegion",
    "Memory",
    "PageMemory",
    "RingMemory",
    "SharedBuffer",
    "create_memfd",
    "validate_memfd",
]

SharedBuffer: TypeAlias = bytearray | mmap.mmap
"""What rings and signals live in: an mmap in production, a bytearray in tests."""

REQUIRED_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
DEFAULT_MAX_REGION = 1 << 30  # 1 GiB per registered region
TMPFS_MAGIC = 0x01021994  # linux/magic.h: shmem, what memfd_create gives without MFD_HUGETLB
HUGETLBFS_MAGIC = 0x958458F6
PAGE_SIZE = 4096
DEFAULT_MAX_REGIONS = (
    64  # a guest's memory table (KVM slots, vhost-user's VHOST_MEMORY_MAX_NREGIONS is 8)
)
DEFAULT_MAX_GUEST = 1 << 36  # 64 GiB of guest RAM mapped per guest
DEFAULT_MAX_PAGES = 4096  # mapped grants per PageMemory
_ADDR_LIMIT = 1 << 64

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.fstatfs.argtypes = (ctypes.c_int, ctypes.c_void_p)


def fs_type(fd: int) -> int:
    """``f_type`` of the filesystem behind ``fd`` (fstatfs(2); Python has no binding)."""
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on x86-64
    if _libc.fstatfs(fd, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int.from_bytes(buf.raw[: ctypes.sizeof(ctypes.c_long)], "little")


class Memory(Protocol):
    """The device's view of north memory: every access is bounds-checked."""

    size: int
    """One past the highest address; ``check`` says which addresses below it
    are memory (guest memory has holes)."""

    def check(self, addr: int, length: int) -> None:
        """Raise ``Fault`` unless ``[addr, addr + length)`` lies inside this memory."""
        ...

    def read(self, addr: int, length: int) -> bytes: ...

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        """Bounds-checked store; ``Fault`` also where the memory is read-only."""
        ...

    def view(self, addr: int, length: int) -> memoryview: ...


class RingMemory(Memory, Protocol):
    """What a ring's south needs on top of ``Memory``: where a range lives.

    Every implementation here has it: ``BufferMemory``, ``GuestMemory``,
    ``PageMemory``."""

    def check_write(self, addr: int, length: int) -> None:
        """``check``, and the south may also store there (not a read-only region)."""
        ...

    def translate(self, addr: int, length: int, *, write: bool = False) -> tuple[SharedBuffer, int]:
        """The buffer that holds ``[addr, addr + length)`` whole and the range's
        offset in it.  ``Fault`` where ``check`` (``check_write`` with
        ``write``) would fault: the range is in one piece or not at all."""
        ...

    def cast(self, addr: int, length: int, fmt: Literal["I", "Q"]) -> memoryview[int]:
        """An aligned native-width view, released by the memory's ``release``/``close``."""
        ...


class BufferMemory:
    """Memory over any writable buffer (a bytearray in tests, an mmap in production).

    ``buf`` is public for the engine's batch paths (slicing the mmap object is
    about twice as fast as slicing a memoryview of it); everything they take
    from it has been bounds-checked against ``size`` first.
    """

    __slots__ = ("_views", "buf", "size")

    def __init__(self, buf: SharedBuffer) -> None:
        self.buf = buf
        self.size = len(buf)
        self._views: list[memoryview] = []

    def check(self, addr: int, length: int) -> None:
        if addr < 0 or length < 0 or addr + length > self.size:
            raise Fault(
                f"address range [{addr:#x}, +{length:#x}) outside {self.size:#x}-byte memory"
            )

    check_write = check  # all of it is writable

    def translate(self, addr: int, length: int, *, write: bool = False) -> tuple[SharedBuffer, int]:
        """Addresses are offsets into ``buf``."""
        self.check(addr, length)
        return self.buf, addr

    def read(self, addr: int, length: int) -> bytes:
        self.check(addr, length)
        return bytes(self.buf[addr : addr + length])

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        # Size in bytes: len() of a cast memoryview ('I', 'Q') counts items, which
        # let an oversized write pass the check (and grow a bytearray past its end).
        length = data.nbytes if isinstance(data, memoryview) else len(data)
        self.check(addr, length)
        self.buf[addr : addr + length] = data

    def view(self, addr: int, length: int) -> memoryview:
        """A live view: the north may change it at any time (snapshot before trusting).

        Not tracked: release it when done, or the mapping outlives ``close()``
        until the view is garbage.  (Tracking every view would grow without bound
        for a device that takes one per message.)"""
        self.check(addr, length)
        return memoryview(self.buf)[addr : addr + length]

    def cast(self, addr: int, length: int, fmt: Literal["I", "Q"]) -> memoryview[int]:
        """An aligned native-width view (for ring indexes: one load or store each)."""
        self.check(addr, length)
        view = memoryview(self.buf)[addr : addr + length].cast(fmt)
        self._views.append(view)
        return view

    def release(self) -> None:
        for view in self._views:
            view.release()
        self._views.clear()

    def close(self) -> None:
        """Release the views handed out (the buffer itself is the caller's)."""
        self.release()


class MemfdRegion(BufferMemory):
    """A sealed memfd mapped shared; the fd itself is not kept."""

    __slots__ = ("name",)

    def __init__(self, mapping: mmap.mmap, name: str = "") -> None:
        super().__init__(mapping)
        self.name = name

    @classmethod
    def from_fd(
        cls,
        fd: int,
        *,
        max_size: int = DEFAULT_MAX_REGION,
        expected_size: int | None = None,
        admit: Callable[[int], None] | None = None,
    ) -> MemfdRegion:
        """Validate ``fd`` (a shmem memfd, sealed against shrink and grow, sane
        size) and map it.  ``admit(size)``, called before mapping, may refuse
        (raise) on the grounds of what the north already holds.

        Raises ``Invalid`` with the reason; the caller still owns and closes ``fd``.
        """
        size = validate_memfd(fd, max_size=max_size)
        if expected_size is not None and size != expected_size:
            raise Invalid(f"memfd holds {size} bytes, {expected_size} expected")
        if admit is not None:
            admit(size)
        try:
            mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            raise Invalid(f"cannot map memfd: {exc.strerror}") from None
        return cls(mapping, name=_fd_name(fd))

    def close(self) -> None:
        """Unmap.  Views handed out are released first so the unmap can happen."""
        self.release()
        mapping = self.buf
        assert isinstance(mapping, mmap.mmap)
        try:
            mapping.close()
        except BufferError:
            # Someone still holds an export; the mapping goes when they drop it.
            pass


@dataclass(frozen=True, slots=True, eq=False)
class GuestRegion:
    """One piece of guest RAM: guest-physical ``[base, base + size)`` is
    ``buf[offset : offset + size]``."""

    base: int
    size: int
    buf: SharedBuffer
    offset: int = 0
    readonly: bool = False

    @property
    def end(self) -> int:
        return self.base + self.size


def _check_layout(spans: Sequence[tuple[int, int, int, int, bool]], max_regions: int) -> list[int]:
    """Validate a memory table: (base, size, offset, backing length, is a file
    mapping) per region.  Returns the region indexes sorted by base."""
    if not spans:
        raise Invalid("guest memory needs at least one region")
    if len(spans) > max_regions:
        raise Invalid(f"{len(spans)} guest memory regions exceed the limit of {max_regions}")
    for i, (base, size, offset, backing, mapping) in enumerate(spans):
        where = f"guest memory region {i}"
        if size <= 0:
            raise Invalid(f"{where}: size {size} is not positive")
        if base < 0 or offset < 0:
            raise Invalid(f"{where}: negative base or offset")
        if base + size > _ADDR_LIMIT:
            raise Invalid(f"{where}: [{base:#x}, +{size:#x}) wraps past 2**64")
        if mapping and (base | size | offset) % PAGE_SIZE:
            raise Invalid(
                f"{where}: base {base:#x}, size {size:#x} and offset {offset:#x} "
                f"of a mapping must be {PAGE_SIZE}-byte aligned"
            )
        if offset + size > backing:
            raise Invalid(f"{where}: a backing of {backing} bytes has no [{offset:#x}, +{size:#x})")
    order = sorted(range(len(spans)), key=lambda i: spans[i][0])
    for prev, cur in pairwise(order):
        pbase, psize = spans[prev][:2]
        cbase, csize = spans[cur][:2]
        if cbase < pbase + psize:
            raise Invalid(
                f"guest memory regions {prev} [{pbase:#x}, +{psize:#x}) and "
                f"{cur} [{cbase:#x}, +{csize:#x}) overlap"
            )
    return order


class GuestMemory:
    """Guest-physical memory in several regions (a KVM memory table,
    vhost-user's SET_MEM_TABLE): addresses are guest-physical.

    A range is memory only inside one region (module docstring: no access
    spans two regions); ``translate`` gives the region's buffer and the
    range's offset in it, one bisection over the region bases.  Fixed at
    construction: a new memory table is a new ``GuestMemory``.
    """

    __slots__ = (
        "_bases",
        "_bufs",
        "_ends",
        "_owned",
        "_readonly",
        "_shifts",
        "_views",
        "flat",
        "mapped",
        "regions",
        "size",
    )

    def __init__(
        self,
        regions: Sequence[GuestRegion],
        *,
        max_regions: int = DEFAULT_MAX_REGIONS,
        owned: Sequence[mmap.mmap] = (),
    ) -> None:
        """Validate the table (``Invalid`` with the reason): 1..``max_regions``
        regions of positive size, inside their backing, neither overlapping
        nor wrapping past 2**64; base, size and offset 4 KiB aligned where the
        backing is a mapping.  ``owned`` mappings are closed by ``close()``."""
        spans = [
            (r.base, r.size, r.offset, len(r.buf), isinstance(r.buf, mmap.mmap)) for r in regions
        ]
        order = _check_layout(spans, max_regions)
        self.regions = tuple(regions[i] for i in order)
        self._bases = [r.base for r in self.regions]
        self._ends = [r.end for r in self.regions]
        self._shifts = [r.offset - r.base for r in self.regions]
        self._bufs = [r.buf for r in self.regions]
        self._readonly = [r.readonly for r in self.regions]
        self._views: list[memoryview] = []
        self._owned = list(owned)
        self.size = self._ends[-1]
        self.mapped = sum(r.size for r in self.regions)
        only = self.regions[0]
        # One writable region at 0 that is its whole buffer: addresses are
        # offsets into it, and a ring can take the single-region fast path.
        self.flat: SharedBuffer | None = (
            only.buf
            if len(self.regions) == 1
            and only.base == only.offset == 0
            and only.size == len(only.buf)
            and not only.readonly
            else None
        )

    @classmethod
    def from_memfds(
        cls,
        table: Sequence[tuple[int, int, int, int] | tuple[int, int, int, int, bool]],
        *,
        max_regions: int = DEFAULT_MAX_REGIONS,
        max_size: int = DEFAULT_MAX_GUEST,
        admit: Callable[[int], None] | None = None,
    ) -> GuestMemory:
        """Map a VMM's memory table: ``(fd, guest_base, size, file_offset[,
        readonly])`` per region.  Each fd passes ``validate_memfd`` (shmem,
        sealed, open read-write); the regions pass the table checks and must
        lie inside their file; ``size`` bytes in all at most ``max_size``.
        ``admit(total)``, called before anything is mapped, may refuse.  Read-only
        regions are mapped without PROT_WRITE.  Raises ``Invalid`` (``TooBig``)
        with the reason; the fds stay with the caller, the mappings are
        released by ``close()``."""
        if len(table) > max_regions:  # before touching any fd
            raise Invalid(f"{len(table)} guest memory regions exceed the limit of {max_regions}")
        spans = []
        for i, (fd, base, size, offset, *_ro) in enumerate(table):
            try:
                file_size = validate_memfd(fd, max_size=_ADDR_LIMIT)
            except Invalid as exc:
                raise Invalid(f"guest memory region {i}: {exc.message}") from None
            spans.append((base, size, offset, file_size, True))
        _check_layout(spans, max_regions)
        total = sum(span[1] for span in spans)
        if total > max_size:
            raise TooBig(f"guest memory of {total} bytes exceeds the {max_size}-byte limit")
        if admit is not None:
            admit(total)
        mappings: list[mmap.mmap] = []
        regions = []
        try:
            for entry in table:
                fd, base, size, offset = entry[:4]
                readonly = any(entry[4:])
                prot = mmap.PROT_READ if readonly else mmap.PROT_READ | mmap.PROT_WRITE
                try:
                    mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, prot, offset=offset)
                except OSError as exc:
                    raise Invalid(f"cannot map memfd: {exc.strerror}") from None
                mappings.append(mapping)
                regions.append(GuestRegion(base, size, mapping, 0, readonly))
            return cls(regions, max_regions=max_regions, owned=mappings)
        except BaseException:
            for mapping in mappings:
                mapping.close()
            raise

    # --- where a range lives ----------------------------------------------------
    def translate(self, addr: int, length: int, *, write: bool = False) -> tuple[SharedBuffer, int]:
        i = bisect_right(self._bases, addr) - 1
        if (
            i >= 0
            and length >= 0
            and addr + length <= self._ends[i]
            and not (write and self._readonly[i])
        ):
            return self._bufs[i], addr + self._shifts[i]
        raise self._fault(addr, length, write)

    def _index(self, addr: int, length: int, write: bool) -> int:
        i = bisect_right(self._bases, addr) - 1
        if (
            i >= 0
            and length >= 0
            and addr + length <= self._ends[i]
            and not (write and self._readonly[i])
        ):
            return i
        raise self._fault(addr, length, write)

    def _fault(self, addr: int, length: int, write: bool) -> Fault:
        where = f"address range [{addr:#x}, +{length:#x})"
        i = bisect_right(self._bases, addr) - 1
        if (
            addr < 0
            or length < 0
            or i < 0
            or addr > self._ends[i]
            or (addr == self._ends[i] and length)
        ):
            return Fault(f"{where} outside every region of guest memory")
        region = f"[{self._bases[i]:#x}, {self._ends[i]:#x})"
        if addr + length > self._ends[i]:
            return Fault(f"{where} crosses the end of the guest memory region {region}")
        return Fault(f"{where} is in the read-only guest memory region {region}")

    def check(self, addr: int, length: int) -> None:
        self.translate(addr, length)

    def check_write(self, addr: int, length: int) -> None:
        self.translate(addr, length, write=True)

    def split(self, addr: int, length: int, *, write: bool = False) -> list[tuple[int, int]]:
        """``[addr, addr + length)`` as (addr, length) pieces, one per region it
        runs through, for a queue whose format lets a buffer run on into the
        next region where they are contiguous (virtio, for vhost-user): each
        piece becomes a segment, which every access here takes whole.  ``Fault``
        at a hole, outside, or (``write``) in a read-only region."""
        if length < 0:
            raise self._fault(addr, length, write)
        pieces = []
        while True:
            i = bisect_right(self._bases, addr) - 1
            if i < 0 or addr > self._ends[i] or (addr == self._ends[i] and length):
                raise self._fault(addr, length, write)
            if write and self._readonly[i]:
                raise self._fault(addr, 0, write)
            take = min(length, self._ends[i] - addr)
            pieces.append((addr, take))
            addr += take
            length -= take
            if not length:
                return pieces

    # --- access -------------------------------------------------------------------
    def read(self, addr: int, length: int) -> bytes:
        buf, at = self.translate(addr, length)
        return bytes(buf[at : at + length])

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        length = data.nbytes if isinstance(data, memoryview) else len(data)  # bytes, not items
        buf, at = self.translate(addr, length, write=True)
        buf[at : at + length] = data

    def view(self, addr: int, length: int) -> memoryview:
        """A live view (snapshot before trusting), read-only over a read-only
        region.  Not tracked: release it when done (as ``BufferMemory.view``)."""
        i = self._index(addr, length, False)
        at = addr + self._shifts[i]
        view = memoryview(self._bufs[i])[at : at + length]
        return view.toreadonly() if self._readonly[i] else view

    def cast(self, addr: int, length: int, fmt: Literal["I", "Q"]) -> memoryview[int]:
        """An aligned native-width view (read-only over a read-only region)."""
        view = self.view(addr, length).cast(fmt)
        self._views.append(view)
        return view

    def release(self) -> None:
        for view in self._views:
            view.release()
        self._views.clear()

    def close(self) -> None:
        """Release the cast views, then unmap the mappings this memory owns."""
        self.release()
        for mapping in self._owned:
            try:
                mapping.close()
            except BufferError:
                pass  # still exported: the mapping goes when its last user drops it


class PageMemory:
    """Pages mapped one by one (Xen grants): address = ``frame * PAGE_SIZE +
    offset``, where ``frame`` is the number the connector mapped the page
    under (a grant reference).  A range lies inside one page or is a ``Fault``;
    each lookup is one dict probe.  Pages come and go while the memory is in
    use (``map_page``/``unmap_page``); the connector stops the rings that use
    a page before it unmaps it.
    """

    __slots__ = ("_pages", "_views", "max_pages", "size")

    def __init__(self, *, max_pages: int = DEFAULT_MAX_PAGES) -> None:
        self._pages: dict[int, tuple[SharedBuffer, int, bool]] = {}
        self._views: list[memoryview] = []
        self.max_pages = max_pages
        self.size = 0

    def map_page(
        self, frame: int, buf: SharedBuffer, offset: int = 0, *, readonly: bool = False
    ) -> None:
        """Make ``buf[offset : offset + PAGE_SIZE]`` the page ``frame``."""
        if not 0 <= frame < _ADDR_LIMIT // PAGE_SIZE:
            raise Invalid(f"page frame {frame} is outside the 64-bit address space")
        if frame in self._pages:
            raise Exists(f"page frame {frame} is already mapped")
        if len(self._pages) >= self.max_pages:
            raise Invalid(f"{self.max_pages} pages are mapped already, the limit")
        if offset < 0 or offset + PAGE_SIZE > len(buf):
            raise Invalid(f"a backing of {len(buf)} bytes has no page at {offset:#x}")
        if isinstance(buf, mmap.mmap) and offset % PAGE_SIZE:
            raise Invalid(f"page offset {offset:#x} in a mapping is not {PAGE_SIZE}-byte aligned")
        self._pages[frame] = (buf, offset, readonly)
        self.size = max(self.size, (frame + 1) * PAGE_SIZE)

    def unmap_page(self, frame: int) -> None:
        if self._pages.pop(frame, None) is None:
            raise NotFound(f"page frame {frame} is not mapped")
        self.size = (max(self._pages) + 1) * PAGE_SIZE if self._pages else 0

    def _page(self, addr: int, length: int, write: bool) -> tuple[SharedBuffer, int, bool]:
        frame, at = divmod(addr, PAGE_SIZE)
        page = self._pages.get(frame)
        if at == 0 and length == 0 and page is None and frame:
            frame, at = frame - 1, PAGE_SIZE  # empty, at the end of the page before
            page = self._pages.get(frame)
        where = f"address range [{addr:#x}, +{length:#x})"
        if page is None or addr < 0 or length < 0:
            raise Fault(f"{where} outside every mapped page")
        if at + length > PAGE_SIZE:
            raise Fault(f"{where} crosses the end of page {frame}")
        if write and page[2]:
            raise Fault(f"{where} is in the read-only page {frame}")
        return page[0], page[1] + at, page[2]

    def translate(self, addr: int, length: int, *, write: bool = False) -> tuple[SharedBuffer, int]:
        buf, at, _readonly = self._page(addr, length, write)
        return buf, at

    def check(self, addr: int, length: int) -> None:
        self._page(addr, length, False)

    def check_write(self, addr: int, length: int) -> None:
        self._page(addr, length, True)

    def read(self, addr: int, length: int) -> bytes:
        buf, at, _readonly = self._page(addr, length, False)
        return bytes(buf[at : at + length])

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        length = data.nbytes if isinstance(data, memoryview) else len(data)
        buf, at, _readonly = self._page(addr, length, True)
        buf[at : at + length] = data

    def view(self, addr: int, length: int) -> memoryview:
        """A live view of one page (read-only for a read-only grant); not tracked."""
        buf, at, readonly = self._page(addr, length, False)
        view = memoryview(buf)[at : at + length]
        return view.toreadonly() if readonly else view

    def cast(self, addr: int, length: int, fmt: Literal["I", "Q"]) -> memoryview[int]:
        view = self.view(addr, length).cast(fmt)
        self._views.append(view)
        return view

    def release(self) -> None:
        for view in self._views:
            view.release()
        self._views.clear()


def validate_memfd(fd: int, *, max_size: int = DEFAULT_MAX_REGION) -> int:
    """The size of ``fd`` if the south may map it: a shmem memfd open for
    reading and writing, sealed against shrink and grow, of 1..``max_size``
    bytes.  ``Invalid`` (``TooBig`` for the size) with the reason otherwise."""
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise Invalid(f"bad file descriptor: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise Invalid("file descriptor is not a memfd (not a regular file)")
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        kind = fs_type(fd)
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    except OSError:
        raise Invalid("file descriptor is not a memfd (it cannot be sealed)") from None
    if kind == HUGETLBFS_MAGIC:
        raise Invalid(
            "hugetlb memfds are refused: their pages can vanish under the mapping (SIGBUS)"
        )
    if kind != TMPFS_MAGIC:
        raise Invalid(f"file descriptor is not a shmem memfd (filesystem {kind:#x})")
    if flags & os.O_ACCMODE != os.O_RDWR:
        raise Invalid("memfd is not open for reading and writing")
    if seals & REQUIRED_SEALS != REQUIRED_SEALS:
        raise Invalid("memfd is not sealed: F_SEAL_SHRINK and F_SEAL_GROW are required")
    # Read the size only now that the seals fix it: the client keeps its own
    # fd and may have resized the file between the first fstat and sealing.
    size = os.fstat(fd).st_size
    if size <= 0:
        raise Invalid("memfd is empty")
    if size > max_size:
        raise TooBig(f"memfd of {size} bytes exceeds the {max_size}-byte limit")
    return size


def _fd_name(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def create_memfd(name: str, size: int) -> tuple[int, mmap.mmap]:
    """North helper: a memfd of ``size`` bytes, sealed as the south requires, and its mapping."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, REQUIRED_SEALS | fcntl.F_SEAL_SEAL)
        mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        os.close(fd)
        raise
    return fd, mapping
