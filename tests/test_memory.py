"""vbus.memory: bounds-checked access, and which file descriptors may become a region."""

from __future__ import annotations

import fcntl
import mmap
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from vbus.errors import Fault, Invalid, TooBig
from vbus.memory import REQUIRED_SEALS, BufferMemory, MemfdRegion, create_memfd

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
