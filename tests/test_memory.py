"""vbus.memory: bounds-checked access, which file descriptors may become a region, and
guest memory of several regions (or of mapped pages) checked against a simple model."""

from __future__ import annotations

import fcntl
import mmap
import os
import re
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vbus.errors import Exists, Fault, Invalid, NoSpace, NotFound, TooBig
from vbus.memory import (
    DEFAULT_MAX_REGIONS,
    PAGE_SIZE,
    REQUIRED_SEALS,
    BufferMemory,
    GuestMemory,
    GuestRegion,
    MemfdRegion,
    PageMemory,
    create_memfd,
)

SIZE = 4096


@pytest.fixture(params=["bytearray", "mmap"])
def memory(request: pytest.FixtureRequest) -> Iterator[BufferMemory]:
    """The same checks over both backings: a bytearray (tests) and an mmap (production)."""
    buf: bytearray | mmap.mmap
    if request.param == "bytearray":
        buf = bytearray(range(256)) * (SIZE // 256)
    else:
        buf = mmap.mmap(-1, SIZE)
        buf[:] = bytes(range(256)) * (SIZE // 256)
    mem = BufferMemory(buf)
    yield mem
    mem.release()
    if isinstance(buf, mmap.mmap):
        buf.close()


def _snapshot(mem: BufferMemory) -> bytes:
    return bytes(mem.buf[:])


# --- BufferMemory bounds -------------------------------------------------------

IN_BOUNDS = [(0, 0), (0, 1), (0, SIZE), (SIZE - 1, 1), (SIZE, 0), (100, 200)]
OUT_OF_BOUNDS = [
    (-1, 1),
    (-1, 0),
    (0, -1),
    (SIZE, -1),
    (-SIZE, SIZE + 1),  # sum lands inside, the start does not
    (SIZE, 1),  # off by one at the end
    (SIZE - 1, 2),
    (0, SIZE + 1),
    (SIZE + 1, 0),
    (2**64, 0),
    (2**64 - 1, 2),  # would wrap to 1 in 64-bit arithmetic
    (1, 2**64 - 1),
    (2**63, 2**63),
]


@pytest.mark.parametrize(("addr", "length"), IN_BOUNDS)
def test_check_accepts_ranges_inside(memory: BufferMemory, addr: int, length: int) -> None:
    memory.check(addr, length)
    assert memory.read(addr, length) == _snapshot(memory)[addr : addr + length]


@pytest.mark.parametrize(("addr", "length"), OUT_OF_BOUNDS)
def test_every_access_refuses_ranges_outside(memory: BufferMemory, addr: int, length: int) -> None:
    before = _snapshot(memory)
    with pytest.raises(Fault, match="outside"):
        memory.check(addr, length)
    with pytest.raises(Fault):
        memory.read(addr, length)
    with pytest.raises(Fault):
        memory.view(addr, length)
    with pytest.raises(Fault):
        memory.cast(addr, length, "I")
    if length >= 0:
        with pytest.raises(Fault):
            memory.write(addr, b"\xee" * min(length, 2 * SIZE))
    assert _snapshot(memory) == before
    assert len(memory.buf) == SIZE


def test_fault_message_names_the_range(memory: BufferMemory) -> None:
    with pytest.raises(Fault) as info:
        memory.read(SIZE - 2, 3)
    assert f"{SIZE - 2:#x}" in info.value.message
    assert f"{SIZE:#x}-byte" in info.value.message


def test_read_returns_an_independent_copy(memory: BufferMemory) -> None:
    data = memory.read(SIZE - 4, 4)
    assert data == bytes(range(252, 256))
    assert isinstance(data, bytes)
    memory.buf[SIZE - 4 : SIZE] = b"\x00" * 4
    assert data == bytes(range(252, 256))


def test_write_at_the_very_end(memory: BufferMemory) -> None:
    memory.write(SIZE - 4, b"abcd")
    assert memory.read(SIZE - 4, 4) == b"abcd"
    before = _snapshot(memory)
    with pytest.raises(Fault):
        memory.write(SIZE - 3, b"abcd")
    with pytest.raises(Fault):
        memory.write(-1, b"x")  # a negative index would land at the end otherwise
    assert _snapshot(memory) == before
    assert len(memory.buf) == SIZE


def test_write_of_a_cast_memoryview_is_checked_in_bytes(memory: BufferMemory) -> None:
    # len() of an 'I' view counts 4-byte items: 2 items are 8 bytes.
    words = memoryview(bytes(range(8))).cast("I")
    before = _snapshot(memory)
    with pytest.raises(Fault):
        memory.write(SIZE - 4, words)
    assert len(memory.buf) == SIZE
    assert _snapshot(memory) == before
    memory.write(SIZE - 8, words)
    assert memory.read(SIZE - 8, 8) == bytes(range(8))


def test_view_is_live_in_both_directions(memory: BufferMemory) -> None:
    view = memory.view(SIZE - 4, 4)
    assert len(view) == 4
    view[0] = 0x7F
    assert memory.buf[SIZE - 4] == 0x7F
    memory.buf[SIZE - 1] = 0x11
    assert view[3] == 0x11


@pytest.mark.parametrize(("fmt", "width"), [("I", 4), ("Q", 8)])
def test_cast_gives_native_words(memory: BufferMemory, fmt: str, width: int) -> None:
    words = memory.cast(SIZE - 2 * width, 2 * width, fmt)  # type: ignore[arg-type]
    assert len(words) == 2
    words[1] = 2 ** (8 * width) - 1
    assert memory.read(SIZE - width, width) == b"\xff" * width
    with pytest.raises(Fault):
        memory.cast(SIZE - width, 2 * width, fmt)  # type: ignore[arg-type]


def test_release_invalidates_cast_views_only(memory: BufferMemory) -> None:
    view = memory.view(0, 16)  # untracked: a device may take one per message
    words = memory.cast(0, 16, "Q")
    memory.release()
    assert view[0] == memory.buf[0]
    with pytest.raises(ValueError):
        words[0]
    view.release()
    memory.release()  # twice is harmless


# --- MemfdRegion.from_fd: what is accepted -------------------------------------


def _memfd(
    size: int, seals: int | None = REQUIRED_SEALS, *, allow_sealing: bool = True
) -> tuple[int, str]:
    """A hand-made memfd (no helper), optionally sealed; returns (fd, name)."""
    name = f"vbus-test-{uuid.uuid4().hex[:12]}"
    flags = os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if allow_sealing else 0)
    fd = os.memfd_create(name, flags)
    if size:
        os.ftruncate(fd, size)
    if seals is not None:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd, name


@pytest.fixture
def fds() -> Iterator[list[int]]:
    """File descriptors a test opens; all closed afterwards."""
    opened: list[int] = []
    yield opened
    for fd in opened:
        try:
            os.close(fd)
        except OSError:
            pass


def _maps_lines(name: str) -> int:
    with open("/proc/self/maps") as maps:
        return sum(name in line for line in maps)


def test_accepts_a_memfd_from_create_memfd(fds: list[int]) -> None:
    fd, north = create_memfd("vbus-test-helper", 8192)
    fds.append(fd)
    assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & REQUIRED_SEALS == REQUIRED_SEALS
    region = MemfdRegion.from_fd(fd)
    try:
        assert region.size == 8192
        assert "memfd:vbus-test-helper" in region.name
        # One shared file: what the south writes, the north sees, and back.
        region.write(8190, b"ok")
        assert north[8190:8192] == b"ok"
        north[0:5] = b"hello"
        assert region.read(0, 5) == b"hello"
    finally:
        region.close()
        north.close()


def test_accepts_a_hand_made_memfd_with_exactly_the_two_seals(fds: list[int]) -> None:
    fd, name = _memfd(4096)
    fds.append(fd)
    assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) == REQUIRED_SEALS
    region = MemfdRegion.from_fd(fd, max_size=4096, expected_size=4096)
    try:
        assert region.size == 4096
        assert name in region.name
        region.write(0, b"x")
        assert os.pread(fd, 1, 0) == b"x"
    finally:
        region.close()


def test_the_fd_stays_with_the_caller(fds: list[int]) -> None:
    fd, _ = _memfd(4096)
    fds.append(fd)
    region = MemfdRegion.from_fd(fd)
    region.close()
    os.fstat(fd)  # still open: from_fd neither kept nor closed it


def test_size_is_taken_after_the_seals(fds: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that shrinks and seals between the south's fstat and its seal check
    gets a region of the sealed size (not a mapping past the end of the file)."""
    fd, _ = _memfd(8192, seals=None)
    fds.append(fd)
    real_fcntl = fcntl.fcntl

    def racing_fcntl(fd_: int, cmd: int, arg: int = 0) -> int:
        if cmd == fcntl.F_GET_SEALS and not real_fcntl(fd_, fcntl.F_GET_SEALS):
            os.ftruncate(fd_, 4096)  # the client, right after the south's fstat
            real_fcntl(fd_, fcntl.F_ADD_SEALS, REQUIRED_SEALS)
        return real_fcntl(fd_, cmd, arg)

    monkeypatch.setattr(fcntl, "fcntl", racing_fcntl)
    region = MemfdRegion.from_fd(fd)
    try:
        assert region.size == 4096 == os.fstat(fd).st_size
        assert region.read(4095, 1) == b"\x00"
    finally:
        region.close()


# --- MemfdRegion.from_fd: what is refused --------------------------------------


def test_refuses_an_unsealed_memfd(fds: list[int]) -> None:
    fd, _ = _memfd(4096, seals=None)
    fds.append(fd)
    with pytest.raises(Invalid, match="not sealed"):
        MemfdRegion.from_fd(fd)
    # The reason: the owner could shrink it under our mapping (SIGBUS).
    os.ftruncate(fd, 0)


def test_refuses_a_memfd_that_can_never_be_sealed(fds: list[int]) -> None:
    fd, _ = _memfd(4096, seals=None, allow_sealing=False)
    fds.append(fd)
    with pytest.raises(Invalid, match="not sealed"):
        MemfdRegion.from_fd(fd)


@pytest.mark.parametrize("seal", [fcntl.F_SEAL_SHRINK, fcntl.F_SEAL_GROW])
def test_refuses_a_memfd_with_only_one_seal(fds: list[int], seal: int) -> None:
    fd, _ = _memfd(4096, seals=seal | fcntl.F_SEAL_SEAL)  # and it can never get the other
    fds.append(fd)
    with pytest.raises(Invalid, match="not sealed"):
        MemfdRegion.from_fd(fd)


def test_refuses_a_regular_file(fds: list[int], tmp_path: Path) -> None:
    path = tmp_path / "region"
    path.write_bytes(bytes(4096))
    fd = os.open(path, os.O_RDWR)
    fds.append(fd)
    with pytest.raises(Invalid, match="memfd"):
        MemfdRegion.from_fd(fd)


def test_refuses_a_posix_shm_file(fds: list[int]) -> None:
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm on this machine")
    path = f"/dev/shm/vbus-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    fds.append(fd)
    try:
        os.ftruncate(fd, 4096)
        with pytest.raises(Invalid, match="memfd"):
            MemfdRegion.from_fd(fd)
        # A shm file can never be sealed, so it can always be truncated under us.
        with pytest.raises(PermissionError):
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, REQUIRED_SEALS)
    finally:
        os.unlink(path)


def test_refuses_a_pipe(fds: list[int]) -> None:
    r, w = os.pipe()
    fds += [r, w]
    for fd in (r, w):
        with pytest.raises(Invalid, match="not a regular file"):
            MemfdRegion.from_fd(fd)


def test_refuses_an_eventfd(fds: list[int]) -> None:
    fd = os.eventfd(0)
    fds.append(fd)
    with pytest.raises(Invalid, match="not a regular file"):
        MemfdRegion.from_fd(fd)


def test_refuses_a_socket() -> None:
    a, b = socket.socketpair()
    with a, b, pytest.raises(Invalid, match="not a regular file"):
        MemfdRegion.from_fd(a.fileno())


def test_refuses_a_closed_fd() -> None:
    fd, _ = _memfd(4096)
    os.close(fd)
    with pytest.raises(Invalid, match="bad file descriptor"):
        MemfdRegion.from_fd(fd)
    with pytest.raises(Invalid, match="bad file descriptor"):
        MemfdRegion.from_fd(-1)


def test_refuses_an_empty_memfd(fds: list[int]) -> None:
    fd, _ = _memfd(0)
    fds.append(fd)
    with pytest.raises(Invalid, match="empty"):
        MemfdRegion.from_fd(fd)


def test_refuses_a_memfd_above_max_size(fds: list[int]) -> None:
    fd, _ = _memfd(8192)
    fds.append(fd)
    with pytest.raises(TooBig, match="8192"):
        MemfdRegion.from_fd(fd, max_size=8191)
    MemfdRegion.from_fd(fd, max_size=8192).close()  # the limit itself is fine


def test_refuses_a_size_that_does_not_match(fds: list[int]) -> None:
    fd, _ = _memfd(8192)
    fds.append(fd)
    for expected in (4096, 8193, 0):
        with pytest.raises(Invalid, match=f"{expected} expected"):
            MemfdRegion.from_fd(fd, expected_size=expected)
    MemfdRegion.from_fd(fd, expected_size=8192).close()


def test_refuses_a_memfd_it_cannot_map_writable(fds: list[int]) -> None:
    fd, _ = _memfd(4096, seals=REQUIRED_SEALS | fcntl.F_SEAL_WRITE)
    fds.append(fd)
    with pytest.raises(Invalid, match="cannot map"):
        MemfdRegion.from_fd(fd)
    fd2, _ = _memfd(4096)
    fds.append(fd2)
    read_only = os.open(f"/proc/self/fd/{fd2}", os.O_RDONLY)
    fds.append(read_only)
    with pytest.raises(Invalid, match="not open for reading and writing"):
        MemfdRegion.from_fd(read_only)


# --- sealing and unmapping -----------------------------------------------------


def test_a_sealed_memfd_cannot_change_size(fds: list[int]) -> None:
    """Why mapping it is safe: not even its owner can shrink it under the mapping."""
    fd, _ = _memfd(8192)
    fds.append(fd)
    region = MemfdRegion.from_fd(fd)
    try:
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 4096)
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 0)
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 16384)
        with pytest.raises(PermissionError):
            os.posix_fallocate(fd, 0, 16384)
        assert os.fstat(fd).st_size == 8192
        assert region.read(8191, 1) == b"\x00"  # the last byte is still backed
    finally:
        region.close()


def test_close_unmaps_even_with_views_handed_out(fds: list[int]) -> None:
    fd, name = _memfd(3 * 4096)
    fds.append(fd)
    assert _maps_lines(name) == 0
    region = MemfdRegion.from_fd(fd)
    view = region.view(0, 64)
    words = region.cast(64, 64, "Q")
    view[0] = 1
    words[0] = 2
    view.release()  # the user's job for view(); cast() views are released by close()
    assert _maps_lines(name) == 1
    region.close()
    assert _maps_lines(name) == 0
    assert region.buf.closed  # type: ignore[union-attr]
    with pytest.raises(ValueError):
        words[0]
    region.close()  # idempotent
    assert _maps_lines(name) == 0
    assert os.pread(fd, 1, 0) == b"\x01"  # the data lives on in the file


def test_close_with_a_view_still_exported_does_not_raise(fds: list[int]) -> None:
    fd, name = _memfd(4096)
    fds.append(fd)
    region = MemfdRegion.from_fd(fd)
    derived = region.view(0, 64)[8:16]  # a view of a view: not tracked by the region
    region.close()
    assert derived[0] == 0  # still valid: the mapping waits for its last user
    derived.release()
    del region
    assert _maps_lines(name) == 0


# --- GuestMemory: what a memory table may be ------------------------------------

G = 1 << 64


def _region(
    base: int, size: int, *, backing: int | None = None, offset: int = 0, **kw: bool
) -> GuestRegion:
    return GuestRegion(
        base, size, bytearray(offset + size if backing is None else backing), offset, **kw
    )


REFUSED_TABLES: dict[str, tuple[list[GuestRegion], str]] = {
    "no regions": ([], "at least one region"),
    "size 0": ([_region(0, 16), GuestRegion(0x100, 0, bytearray(16))], "region 1: size 0"),
    "negative size": ([GuestRegion(0, -16, bytearray(16))], "size -16"),
    "negative base": ([_region(-4096, 4096)], "negative base"),
    "negative offset": ([GuestRegion(0, 16, bytearray(64), -8)], "negative"),
    "wraps past 2**64": ([_region(G - 4096, 8192, backing=8192)], "wraps past 2**64"),
    "one past 2**64": ([_region(G - 15, 16)], "wraps"),
    "backing too small": ([GuestRegion(0, 64, bytearray(64), 1)], "has no [0x1, +0x40)"),
    "partial overlap": ([_region(0x1000, 0x100), _region(0x10FF, 0x10)], "overlap"),
    "same base": ([_region(0x1000, 0x10), _region(0x1000, 0x10)], "overlap"),
    "contained": ([_region(0x1000, 0x1000), _region(0x1800, 0x10)], "overlap"),
    "contained, listed first": ([_region(0x1800, 0x10), _region(0x1000, 0x1000)], "overlap"),
    "too many": (
        [_region(i * 16, 16) for i in range(DEFAULT_MAX_REGIONS + 1)],
        "exceed the limit of 64",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED_TABLES))
def test_guest_memory_refuses_a_bad_table(case: str) -> None:
    regions, message = REFUSED_TABLES[case]
    with pytest.raises(Invalid, match=re.escape(message)):
        GuestMemory(regions)


@pytest.mark.parametrize(
    ("base", "size", "offset"), [(0x1001, 0x1000, 0), (0x1000, 0x1001, 0), (0x1000, 0x1000, 8)]
)
def test_guest_memory_refuses_unaligned_mappings(base: int, size: int, offset: int) -> None:
    mapping = mmap.mmap(-1, 4 * PAGE_SIZE)
    try:
        with pytest.raises(Invalid, match="4096-byte aligned"):
            GuestMemory([GuestRegion(base, size, mapping, offset)])
        GuestMemory([GuestRegion(0x1000, 0x2000, mapping, 0x1000)]).close()  # aligned: taken
        # A bytearray (tests, copies) has no page to align to.
        GuestMemory([GuestRegion(base, size, bytearray(offset + size), offset)])
    finally:
        mapping.close()


def test_guest_memory_takes_adjacent_regions_in_any_order_up_to_the_limit() -> None:
    regions = [_region(0x3000, 0x1000), _region(0x1000, 0x1000), _region(0x2000, 0x1000)]
    mem = GuestMemory(regions, max_regions=3)
    assert [r.base for r in mem.regions] == [0x1000, 0x2000, 0x3000]
    assert (mem.size, mem.mapped, mem.flat) == (0x4000, 0x3000, None)
    with pytest.raises(Invalid, match="4 guest memory regions exceed the limit of 3"):
        GuestMemory([*regions, _region(0x8000, 16)], max_regions=3)
    top = GuestMemory([_region(G - 4096, 4096)])  # ends exactly at 2**64
    assert top.read(G - 1, 1) == b"\0"


def test_guest_memory_of_one_region_at_zero_is_flat() -> None:
    buf = bytearray(4096)
    assert GuestMemory([GuestRegion(0, 4096, buf)]).flat is buf
    assert GuestMemory([GuestRegion(0, 4096, buf, readonly=True)]).flat is None
    assert GuestMemory([GuestRegion(0, 2048, buf)]).flat is None  # not all of its buffer
    assert GuestMemory([GuestRegion(0, 2048, buf, 2048)]).flat is None
    assert GuestMemory([GuestRegion(4096, 4096, buf)]).flat is None


# --- GuestMemory: every boundary ------------------------------------------------------

# Four regions: two adjacent ones with different backings (the first at an
# offset of its buffer), a gap, a read-only one, and one that ends at 2**64.
R0 = (0x1000, 0x1000)
R1 = (0x2000, 0x1000)
R2 = (0x10000, 0x800)
R3 = (G - 0x1000, 0x1000)


@pytest.fixture
def guest() -> GuestMemory:
    return GuestMemory(
        [
            GuestRegion(*R1, bytearray(b"\x11" * 0x1000)),
            GuestRegion(*R0, bytearray(b"\x07" * 7 + bytes(range(256)) * 16), 7),
            GuestRegion(*R2, bytearray(b"\x22" * 0x800), readonly=True),
            GuestRegion(*R3, bytearray(b"\x33" * 0x1000)),
        ]
    )


GUEST_INSIDE = [
    (0x1000, 0),
    (0x1000, 1),
    (0x1000, 0x1000),  # all of R0
    (0x1FFF, 1),
    (0x2000, 0),  # empty at R0's end (and R1's start)
    (0x2000, 0x1000),
    (0x3000, 0),  # empty at R1's end, before the gap
    (0x10000, 0x800),
    (0x10800, 0),
    (G - 0x1000, 0x1000),
    (G - 1, 1),
    (G, 0),  # empty at the very end of the address space
]
GUEST_OUTSIDE = [
    ((0, 1), "outside"),
    ((0xFFF, 1), "outside"),  # one before R0
    ((0xFFF, 0), "outside"),  # empty, but in the gap
    ((0xFFF, 2), "outside"),  # starts in the gap, ends in R0
    ((0x1FFF, 2), "crosses the end of the guest memory region [0x1000, 0x2000)"),  # R0 into R1
    ((0x1000, 0x2000), "crosses"),  # both adjacent regions whole
    ((0x2FFF, 2), "crosses the end of the guest memory region [0x2000, 0x3000)"),  # R1 into the gap
    ((0x3000, 1), "outside"),
    ((0x3001, 0), "outside"),
    ((0x107FF, 2), "crosses"),
    ((0x10800, 1), "outside"),
    ((G - 1, 2), "crosses"),
    ((G, 1), "outside"),
    ((G + 0x1000, 0), "outside"),
    ((-1, 1), "outside"),
    ((0x1000, -1), "outside"),
    ((0x1800, -1), "outside"),
]


def _model(addr: int, length: int) -> tuple[int, int] | None:
    """(base, size) of the region holding [addr, addr + length), the simple way
    (an empty range where one region ends and the next begins: the next)."""
    found = None
    for base, size in (R0, R1, R2, R3):
        if length >= 0 and base <= addr and addr + length <= base + size:
            found = base, size
    return found


@pytest.mark.parametrize(("addr", "length"), GUEST_INSIDE)
def test_guest_memory_translates_ranges_inside_one_region(
    guest: GuestMemory, addr: int, length: int
) -> None:
    found = _model(addr, length)
    assert found is not None
    region = next(r for r in guest.regions if r.base == found[0])
    guest.check(addr, length)
    buf, at = guest.translate(addr, length)
    assert buf is region.buf and at == addr - region.base + region.offset
    assert guest.read(addr, length) == bytes(region.buf[at : at + length])
    view = guest.view(addr, length)
    assert view.tobytes() == guest.read(addr, length)
    view.release()


@pytest.mark.parametrize(("case", "message"), GUEST_OUTSIDE)
def test_guest_memory_faults_every_range_outside_one_region(
    guest: GuestMemory, case: tuple[int, int], message: str
) -> None:
    addr, length = case
    assert _model(addr, length) is None
    before = [bytes(r.buf) for r in guest.regions]
    with pytest.raises(Fault, match=re.escape(message)):
        guest.check(addr, length)
    for access in (
        guest.check_write,
        guest.translate,
        guest.read,
        guest.view,
        lambda a, n: guest.cast(a, n, "I"),
    ):
        with pytest.raises(Fault):
            access(addr, length)
    if length >= 0:
        with pytest.raises(Fault):
            guest.write(addr, b"\xee" * length)
    assert [bytes(r.buf) for r in guest.regions] == before
    assert [len(r.buf) for r in guest.regions] == [0x1007, 0x1000, 0x800, 0x1000]


def test_guest_memory_reads_and_writes_land_in_the_right_backing(guest: GuestMemory) -> None:
    r0, r1 = guest.regions[0], guest.regions[1]
    assert guest.read(0x1000, 4) == bytes(range(4))  # after the 7 bytes R0's backing skips
    guest.write(0x1FFC, b"abcd")
    guest.write(0x2000, b"efgh")
    assert r0.buf[0x1007 - 4 :] == b"abcd" and r1.buf[:4] == b"efgh"
    words = guest.cast(0x2008, 16, "Q")
    words[1] = 2**64 - 1
    assert r1.buf[0x10:0x18] == b"\xff" * 8
    guest.release()
    with pytest.raises(ValueError):
        words[0]
    with pytest.raises(Fault):  # counted in bytes, not in items
        guest.write(0x2FFC, memoryview(bytes(8)).cast("I"))


def test_guest_memory_read_only_region(guest: GuestMemory) -> None:
    addr = R2[0] + 16
    guest.check(addr, 16)
    assert guest.read(addr, 4) == b"\x22" * 4
    assert guest.translate(addr, 4)[1] == 16
    for attempt in (
        lambda: guest.check_write(addr, 16),
        lambda: guest.translate(addr, 16, write=True),
        lambda: guest.write(addr, b"x"),
        lambda: guest.split(addr, 16, write=True),
    ):
        with pytest.raises(Fault, match=r"read-only guest memory region \[0x10000, 0x10800\)"):
            attempt()
    view = guest.view(addr, 16)
    assert view.readonly
    with pytest.raises(TypeError):
        view[0] = 1
    words = guest.cast(addr, 16, "I")
    assert words.readonly
    assert guest.regions[2].buf == b"\x22" * 0x800
    guest.check_write(0x1000, 0x1000)  # the others are writable
    guest.translate(G - 8, 8, write=True)


def test_split_cuts_a_range_where_it_passes_into_the_next_region(guest: GuestMemory) -> None:
    assert guest.split(0x1800, 0x1000) == [(0x1800, 0x800), (0x2000, 0x800)]
    assert guest.split(0x1000, 0x2000) == [(0x1000, 0x1000), (0x2000, 0x1000)]
    assert guest.split(0x1800, 16) == [(0x1800, 16)]
    assert guest.split(0x2000, 0) == [(0x2000, 0)]
    assert guest.split(0x1800, 0x800, write=True) == [(0x1800, 0x800)]
    for addr, length in ((0x2800, 0x1000), (0xFFF, 2), (0x3001, 0), (0x1000, -1)):
        with pytest.raises(Fault):
            guest.split(addr, length)  # into the gap, from it, in it, negative


@st.composite
def _layouts(draw: st.DrawFn) -> list[tuple[int, int, bool]]:
    """Non-overlapping (base, size, readonly), in a random order; some adjacent."""
    regions, at = [], draw(st.integers(0, 64))
    for _ in range(draw(st.integers(1, 6))):
        size = draw(st.integers(1, 64))
        regions.append((at, size, draw(st.booleans())))
        at += size + draw(st.sampled_from([0, 0, 1, 17]))
    return draw(st.permutations(regions))


@settings(max_examples=300, deadline=None)
@given(
    layout=_layouts(),
    ranges=st.lists(st.tuples(st.integers(-2, 600), st.integers(-2, 80)), max_size=40),
)
def test_guest_memory_agrees_with_a_simple_model(
    layout: list[tuple[int, int, bool]], ranges: list[tuple[int, int]]
) -> None:
    backings = [bytearray(size + 3) for _base, size, _ro in layout]
    mem = GuestMemory(
        [GuestRegion(b, s, buf, 3, ro) for (b, s, ro), buf in zip(layout, backings, strict=True)]
    )
    edges = [e for b, s, _ in layout for e in (b - 1, b, b + s - 1, b + s)]
    for addr, length in ranges + [(e, n) for e in edges for n in (0, 1, 2)]:
        i = _owner(layout, addr, length)
        if i is None:
            with pytest.raises(Fault):
                mem.check(addr, length)
            continue
        mem.check(addr, length)
        assert mem.translate(addr, length) == (backings[i], addr - layout[i][0] + 3)
        if layout[i][2]:
            with pytest.raises(Fault, match="read-only"):
                mem.check_write(addr, length)
        else:
            mem.check_write(addr, length)


def _owner(layout: list[tuple[int, int, bool]], addr: int, length: int) -> int | None:
    """The model: the region that contains ``addr`` holds the range if the range
    ends inside it; an empty range may also sit at the very end of a region."""
    if length < 0:
        return None
    for i, (base, size, _ro) in enumerate(layout):
        if base <= addr < base + size:
            return i if addr + length <= base + size else None
    for i, (base, size, _ro) in enumerate(layout):
        if length == 0 and addr == base + size:
            return i
    return None


# --- GuestMemory.from_memfds ------------------------------------------------------


def test_from_memfds_maps_a_memory_table(fds: list[int]) -> None:
    fd, name = _memfd(4 * PAGE_SIZE)
    other, other_name = _memfd(PAGE_SIZE)
    fds += [fd, other]
    seen: list[int] = []
    mem = GuestMemory.from_memfds(
        [
            (fd, 0x100000, 2 * PAGE_SIZE, 2 * PAGE_SIZE),  # the file's second half
            (other, 0x0, PAGE_SIZE, 0),
            (fd, 0x200000, PAGE_SIZE, 0, True),  # the same file again, read-only
        ],
        admit=seen.append,
    )
    try:
        assert seen == [4 * PAGE_SIZE]
        assert (mem.size, mem.mapped) == (0x201000, 4 * PAGE_SIZE)
        assert _maps_lines(name) == 2 and _maps_lines(other_name) == 1
        mem.write(0x100000, b"half")
        mem.write(0x0FFC, b"end!")
        assert os.pread(fd, 4, 2 * PAGE_SIZE) == b"half"
        assert os.pread(other, 4, PAGE_SIZE - 4) == b"end!"
        os.pwrite(fd, b"rom", 0)
        assert mem.read(0x200000, 3) == b"rom"
        with pytest.raises(Fault, match="read-only"):
            mem.write(0x200000, b"x")
        ro_buf = mem.regions[2].buf
        with pytest.raises(TypeError):  # mapped without PROT_WRITE: not even a stray store
            ro_buf[0:1] = b"x"
        with pytest.raises(Fault, match="outside"):
            mem.read(0x102000, 1)
        words = mem.cast(0x0, 8, "Q")
    finally:
        mem.close()
    assert _maps_lines(name) == 0 and _maps_lines(other_name) == 0
    with pytest.raises(ValueError):
        words[0]
    mem.close()  # idempotent


def test_from_memfds_refusals(fds: list[int]) -> None:
    fd, name = _memfd(2 * PAGE_SIZE)
    unsealed, _ = _memfd(PAGE_SIZE, seals=None)
    fds += [fd, unsealed]
    cases: list[tuple[list[tuple[int, int, int, int]], type[Exception], str]] = [
        (
            [(fd, 0, PAGE_SIZE, 0), (unsealed, PAGE_SIZE, PAGE_SIZE, 0)],
            Invalid,
            "region 1: memfd is not sealed",
        ),
        ([(fd, 0, 3 * PAGE_SIZE, 0)], Invalid, "a backing of 8192 bytes has no"),
        ([(fd, 0, PAGE_SIZE, 2 * PAGE_SIZE)], Invalid, "has no"),
        ([(fd, 0, PAGE_SIZE, 512)], Invalid, "aligned"),
        ([(fd, 100, PAGE_SIZE, 0)], Invalid, "aligned"),
        ([(fd, 0, 2 * PAGE_SIZE, 0), (fd, PAGE_SIZE, PAGE_SIZE, 0)], Invalid, "overlap"),
        ([], Invalid, "at least one region"),
        ([(-1, 0, PAGE_SIZE, 0)], Invalid, "region 0: bad file descriptor"),
        (
            [(-1, i * PAGE_SIZE, PAGE_SIZE, 0) for i in range(65)],
            Invalid,
            "65 guest memory regions",
        ),
    ]
    for table, error, message in cases:
        with pytest.raises(error, match=re.escape(message)):
            GuestMemory.from_memfds(table, admit=lambda n: pytest.fail("admitted"))
    with pytest.raises(TooBig, match="exceeds the 4096-byte limit"):
        GuestMemory.from_memfds([(fd, 0, 2 * PAGE_SIZE, 0)], max_size=PAGE_SIZE)

    def refuse(total: int) -> None:
        raise NoSpace(f"{total} bytes is too much")

    with pytest.raises(NoSpace, match="8192 bytes"):
        GuestMemory.from_memfds(
            [(fd, 0, PAGE_SIZE, 0), (fd, PAGE_SIZE, PAGE_SIZE, 0)], admit=refuse
        )
    assert _maps_lines(name) == 0  # nothing mapped by a refusal


# --- PageMemory -----------------------------------------------------------------------


def test_page_memory_maps_pages_one_by_one() -> None:
    mem = PageMemory(max_pages=3)
    a, b = bytearray(b"\xaa" * PAGE_SIZE), bytearray(2 * PAGE_SIZE)
    mem.map_page(5, a)
    mem.map_page(6, b, PAGE_SIZE)  # the second half of its backing
    mem.map_page(9, bytearray(PAGE_SIZE), readonly=True)
    assert mem.size == 10 * PAGE_SIZE
    assert mem.read(5 * PAGE_SIZE + 10, 2) == b"\xaa\xaa"
    mem.write(6 * PAGE_SIZE + 1, b"hi")
    assert b[PAGE_SIZE + 1 : PAGE_SIZE + 3] == b"hi"
    assert mem.translate(6 * PAGE_SIZE + 1, 2) == (b, PAGE_SIZE + 1)
    mem.check(6 * PAGE_SIZE, 0)
    mem.check(7 * PAGE_SIZE, 0)  # empty, at the end of page 6
    for addr, length, message in [
        (6 * PAGE_SIZE - 1, 2, "crosses the end of page 5"),  # even into a mapped page
        (4 * PAGE_SIZE, 1, "outside every mapped page"),
        (7 * PAGE_SIZE, 1, "outside"),
        (8 * PAGE_SIZE, 0, "outside"),
        (-1, 1, "outside"),
        (5 * PAGE_SIZE, -1, "outside"),
    ]:
        with pytest.raises(Fault, match=message):
            mem.check(addr, length)
    with pytest.raises(Fault, match="read-only page 9"):
        mem.write(9 * PAGE_SIZE, b"x")
    assert mem.view(9 * PAGE_SIZE, 4).readonly
    with pytest.raises(Exists):
        mem.map_page(5, a)
    with pytest.raises(Invalid, match="limit"):
        mem.map_page(1, a)
    mem.unmap_page(9)
    assert mem.size == 7 * PAGE_SIZE
    with pytest.raises(NotFound):
        mem.unmap_page(9)
    with pytest.raises(Fault):
        mem.read(9 * PAGE_SIZE, 1)
    for frame, buf, offset in [
        (-1, a, 0),
        (G // PAGE_SIZE, a, 0),
        (1, a, 1),
        (1, bytearray(100), 0),
    ]:
        with pytest.raises(Invalid):
            mem.map_page(frame, buf, offset)
    mapping = mmap.mmap(-1, 2 * PAGE_SIZE)
    try:
        with pytest.raises(Invalid, match="aligned"):
            mem.map_page(1, mapping, 16)
    finally:
        mapping.close()
