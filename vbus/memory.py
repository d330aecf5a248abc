"""Memory a north context shares with the south, behind one bounds-checked interface.

A device model sees ``Memory`` only: ``read``/``write``/``view`` at an address,
whatever backs it.  Userspace regions are sealed memfds (DESIGN.md 3.1): an
unsealed file could be truncated under our mapping and kill the daemon with
SIGBUS, so it is refused at registration, as is anything that is not a memfd.
Every address the north hands us is checked here; a bad one is a ``Fault`` of
that north context.

Only shmem (tmpfs) memfds are taken.  Seals stop truncation, but a hugetlbfs
memfd can still lose pages under our mapping (``fallocate(PUNCH_HOLE)`` then
an empty huge-page pool), and the daemon's next access would die of SIGBUS;
on shmem a punched hole just reads back as fresh zero pages.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import mmap
import os
import stat
from collections.abc import Callable
from typing import Literal, Protocol, TypeAlias

from vbus.errors import Fault, Invalid, TooBig

__all__ = [
    "REQUIRED_SEALS",
    "BufferMemory",
    "MemfdRegion",
    "Memory",
    "SharedBuffer",
    "create_memfd",
]

SharedBuffer: TypeAlias = bytearray | mmap.mmap
"""What rings and signals live in: an mmap in production, a bytearray in tests."""

REQUIRED_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
DEFAULT_MAX_REGION = 1 << 30  # 1 GiB per registered region
TMPFS_MAGIC = 0x01021994  # linux/magic.h: shmem, what memfd_create gives without MFD_HUGETLB
HUGETLBFS_MAGIC = 0x958458F6

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

    def check(self, addr: int, length: int) -> None:
        """Raise ``Fault`` unless ``[addr, addr + length)`` lies inside this memory."""
        ...

    def read(self, addr: int, length: int) -> bytes: ...

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None: ...

    def view(self, addr: int, length: int) -> memoryview: ...


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
