"""vbus.ioq: the descriptor ring, both ends, over a plain bytearray.

The south trusts nothing in shared memory: every test that breaks the ring
checks that the south answers with ``Fault`` (or ``Invalid`` for local misuse)
and leaves memory as it was.  Every ring test runs twice: over one flat
region (the userspace connector's memory, the fast path) and over guest
memory of two regions, the ring in the first and the buffers in the second.
"""

from __future__ import annotations

import random
import re
import struct
from collections import deque
from collections.abc import Callable, Iterator
from itertools import pairwise

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vbus.errors import Fault, Invalid, TooBig
from vbus.ioq import (
    DESC_SIZE,
    HEADER_SIZE,
    MAX_COUNT,
    SPLIT_FROM,
    IoqNorth,
    IoqSouth,
    format_ring,
    pool_layout,
    ring_bytes,
)
from vbus.memory import PAGE_SIZE, BufferMemory, GuestMemory, GuestRegion, PageMemory
from vbus.queue import Buffer
from vbus.signal import NORTH, SOUTH, EventfdTransport

COUNT = 8
BUF_SIZE = 64
NEAR_WRAP = 0xFFFFFFF0
M32 = 0xFFFFFFFF
VALID_AT, INUSE_AT = 64, 128  # byte offsets of the two indexes in the header
SIGNAL_AT = 16
_DESC = struct.Struct("<QQQBB6x")
FLAG_VALID, FLAG_SOWN = 24, 25


MEMORIES = ("flat", "guest")


def two_regions(buf: bytearray, split: int) -> GuestMemory:
    """Guest memory of two adjacent regions over ``buf``, guest address =
    offset in ``buf`` (what the north writes): [0, split) and [split, end)."""
    return GuestMemory(
        [GuestRegion(0, split, buf, 0), GuestRegion(split, len(buf) - split, buf, split)]
    )


class Ring:
    """A north and a south end on one bytearray, with eventfds both ways.

    ``memory="guest"``: the south sees the bytearray as guest memory of two
    regions, the ring (and what precedes it) in the first, the buffer pool in
    the second."""

    def __init__(
        self,
        *,
        writable: bool,
        count: int = COUNT,
        buf_size: int = BUF_SIZE,
        start: int = 0,
        max_len: int | None = None,
        exact: bool = False,
        offset: int = 0,
        memory: str = "flat",
    ) -> None:
        data, total = pool_layout(count, buf_size)
        data += offset
        total = data + count * buf_size if exact else total + offset
        self.count = count
        self.offset = offset
        self.data = data
        self.buf = bytearray(total)
        self.size = total
        self.kick = EventfdTransport.create()  # north -> south
        self.call = EventfdTransport.create()  # south -> north
        self.north = IoqNorth(self.buf, offset, count, data, buf_size, self.kick)
        self.hdr = memoryview(self.buf)[offset : offset + HEADER_SIZE].cast("I")
        if start:
            # Both ends resume from the same indexes (docs/design.md 7): near 2**32
            # the free-running counters wrap during the test.
            self.hdr[VALID_AT // 4] = self.hdr[INUSE_AT // 4] = start
            self.north.valid = self.north.reaped = start
        self.memory: BufferMemory | GuestMemory = (
            BufferMemory(self.buf) if memory == "flat" else two_regions(self.buf, data)
        )
        kwargs = {} if max_len is None else {"max_len": max_len}
        self.south = IoqSouth(self.memory, offset, count, self.call, writable=writable, **kwargs)

    @property
    def valid(self) -> int:
        return self.hdr[VALID_AT // 4]

    @valid.setter
    def valid(self, value: int) -> None:
        self.hdr[VALID_AT // 4] = value & M32

    @property
    def inuse(self) -> int:
        return self.hdr[INUSE_AT // 4]

    def desc_at(self, index: int) -> int:
        return self.offset + HEADER_SIZE + (index & (self.count - 1)) * DESC_SIZE

    def desc(self, index: int) -> tuple[int, int, int, int, int]:
        return _DESC.unpack_from(self.buf, self.desc_at(index))

    def set_desc(self, index: int, **fields: int) -> None:
        at = self.desc_at(index)
        for name, value in fields.items():
            if name in ("cookie", "ptr", "len"):
                struct.pack_into(
                    "<Q", self.buf, at + 8 * ("cookie", "ptr", "len").index(name), value
                )
            else:
                self.buf[at + {"valid": FLAG_VALID, "sown": FLAG_SOWN}[name]] = value

    def close(self) -> None:
        self.south.close()
        self.north.close()
        self.hdr.release()
        self.memory.release()
        self.kick.close()
        self.call.close()


@pytest.fixture(params=MEMORIES)
def rings(request: pytest.FixtureRequest) -> Iterator[Callable[..., Ring]]:
    made: list[Ring] = []

    def make(**kwargs: object) -> Ring:
        kwargs.setdefault("memory", request.param)
        ring = Ring(**kwargs)  # type: ignore[arg-type]
        made.append(ring)
        return ring

    yield make
    for ring in made:
        ring.close()


def _msgs(n: int, tag: int = 0, size: int | None = None) -> list[bytes]:
    return [
        bytes([(tag + i) & 0xFF]) * (size if size is not None else 1 + (tag + i) % BUF_SIZE)
        for i in range(n)
    ]


# --- layout -------------------------------------------------------------------


def test_layout_keeps_indexes_and_descriptors_on_their_own_cache_lines() -> None:
    assert (HEADER_SIZE, DESC_SIZE) == (192, 32)
    assert VALID_AT // 64 != INUSE_AT // 64 != HEADER_SIZE // 64
    assert 64 % DESC_SIZE == 0 and HEADER_SIZE % 64 == 0  # no descriptor straddles a line
    assert ring_bytes(8) == 192 + 8 * 32
    data, total = pool_layout(8, 100)
    assert data % 64 == 0 and data >= ring_bytes(8)
    assert total % 4096 == 0 and total >= data + 8 * 100


def test_format_ring_writes_a_fresh_ring() -> None:
    buf = bytearray(b"\xee" * 1024)
    format_ring(buf, 64, 4)
    assert struct.unpack_from("<IIII", buf, 64) == (0x56424951, 1, 4, 0)
    assert buf[64 + SIGNAL_AT : 64 + 32] == struct.pack("<II", 0x56425347, 1) + b"\x01\0\0\0" * 2
    assert buf[64 + 32 : 64 + ring_bytes(4)] == bytes(ring_bytes(4) - 32)  # indexes, descs
    assert buf[:64] == b"\xee" * 64 and buf[64 + ring_bytes(4) :] == b"\xee" * (
        1024 - 64 - ring_bytes(4)
    )


@pytest.mark.parametrize(
    ("offset", "count", "size"),
    [
        (32, 4, 1024),  # unaligned
        (0, 6, 1024),  # not a power of two
        (0, 0, 1024),
        (0, 2 * MAX_COUNT, 1024),
        (0, 4, ring_bytes(4) - 1),  # one byte short
        (64, 4, ring_bytes(4)),
        (-64, 4, 1024),  # would index from the end
    ],
)
def test_format_ring_refuses_bad_geometry(offset: int, count: int, size: int) -> None:
    buf = bytearray(size)
    with pytest.raises(Invalid):
        format_ring(buf, offset, count)
    assert buf == bytearray(size)  # neither written nor grown


# --- registration ---------------------------------------------------------------


def _formatted(count: int = COUNT, size: int = 4096) -> bytearray:
    buf = bytearray(size)
    format_ring(buf, 0, count)
    return buf


@pytest.mark.parametrize("count", [0, 3, 6, 100, MAX_COUNT * 2, -8])
def test_registration_refuses_a_count_that_is_not_a_power_of_two(count: int) -> None:
    with pytest.raises(Invalid, match="power of two"):
        IoqSouth(BufferMemory(_formatted()), 0, count, None, writable=False)


def test_registration_refuses_an_unaligned_offset() -> None:
    with pytest.raises(Invalid, match="aligned"):
        IoqSouth(BufferMemory(_formatted()), 32, COUNT, None, writable=False)


@pytest.mark.parametrize(
    ("offset", "size"),
    [(0, ring_bytes(COUNT) - 1), (4096 - 64, 4096), (-64, 4096), (1 << 64, 4096)],
)
def test_registration_refuses_a_ring_outside_the_memory(offset: int, size: int) -> None:
    with pytest.raises(Fault, match="does not fit"):
        IoqSouth(BufferMemory(bytearray(size)), offset, COUNT, None, writable=False)


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ((0, struct.pack("<I", 0x51494256)), "bad magic"),
        ((4, struct.pack("<I", 2)), "version 2"),
        ((4, struct.pack("<I", 0)), "version 0"),
        ((8, struct.pack("<I", 16)), "16 descriptors, 8 registered"),
        ((8, struct.pack("<I", 4)), "4 descriptors, 8 registered"),
        ((SIGNAL_AT, b"XXXX"), "shm_signal: bad magic"),
        ((SIGNAL_AT + 4, struct.pack("<I", 9)), "shm_signal: unsupported version 9"),
        ((VALID_AT, struct.pack("<I", COUNT + 1)), "ahead"),
        ((VALID_AT, struct.pack("<I", M32)), "ahead"),  # behind inuse = far ahead
    ],
)
def test_registration_refuses_a_broken_header(patch: tuple[int, bytes], message: str) -> None:
    buf = _formatted()
    at, data = patch
    buf[at : at + len(data)] = data
    with pytest.raises(Fault, match=message):
        IoqSouth(BufferMemory(buf), 0, COUNT, None, writable=False)


def test_registration_accepts_a_full_ring_at_any_index(rings: Callable[..., Ring]) -> None:
    ring = rings(writable=False, start=NEAR_WRAP + 12)
    ring.north.send_many(_msgs(COUNT))
    again = IoqSouth(ring.memory, 0, COUNT, None, writable=False)  # a restarted south
    assert again.pending() == COUNT
    assert again.read_many(COUNT) == _msgs(COUNT)
    assert ring.inuse == (NEAR_WRAP + 12 + COUNT) & M32


# --- round trips ------------------------------------------------------------------


@pytest.mark.parametrize("start", [0, NEAR_WRAP, M32 - 2])
@pytest.mark.parametrize("offset", [0, 128])
def test_north_to_south_round_trip(rings: Callable[..., Ring], start: int, offset: int) -> None:
    """Random partial batches against a model: slots wrap many times, indexes past 2**32."""
    ring = rings(writable=False, start=start, offset=offset)
    north, south = ring.north, ring.south
    rng = random.Random(start ^ offset)
    model: deque[bytes] = deque()
    sent = received = nbytes = 0
    for step in range(400):
        if rng.random() < 0.5:
            space = COUNT - len(model)
            assert north.space() == space
            want = rng.randint(0, COUNT)
            batch = _msgs(want, tag=step)
            n = north.send_many(batch)
            assert n == min(want, space)
            model.extend(batch[:n])
            sent += n
        else:
            budget = rng.randint(0, COUNT + 2)
            assert south.pending() == len(model)
            got = south.read_many(budget)
            expected = [model.popleft() for _ in range(min(budget, len(model)))]
            assert got == expected
            received += len(got)
            nbytes += sum(map(len, got))
        assert ring.valid == (start + sent) & M32
        assert ring.inuse == (start + received) & M32
    assert received > 100
    assert south.stats.messages == received and south.stats.bytes == nbytes
    if start >= NEAR_WRAP:
        assert ring.valid < start  # the free-running index really wrapped


@pytest.mark.parametrize("sizes", [(1, 64), (2048, 4096), (1, 4096)])
def test_read_span_round_trip(rings: Callable[..., Ring], sizes: tuple[int, int]) -> None:
    """Spans against a model, small messages (packed with one join) and large
    ones (copied one by one): in order, byte for byte; a span stops at most
    once, where the north's data area wraps, and then holds at least half
    of what was asked."""
    ring = rings(writable=False, buf_size=sizes[1])
    north, south = ring.north, ring.south
    rng = random.Random(sizes[1])
    model: deque[bytes] = deque()
    received = 0
    short = 0
    for step in range(600):
        if rng.random() < 0.5:
            batch = [
                bytes([(step + i) & 0xFF]) * rng.randint(*sizes)
                for i in range(rng.randint(1, COUNT))
            ]
            model.extend(batch[: north.send_many(batch)])
        else:
            budget = rng.randint(1, COUNT)
            asked = min(budget, len(model))
            data, lens = south.read_span(budget)
            assert len(lens) * 2 >= asked
            short += len(lens) < asked
            expected = [model.popleft() for _ in lens]
            assert lens == list(map(len, expected))
            assert data == b"".join(expected)
            received += len(lens)
    assert received > 300
    assert short > 0  # the wrap really was crossed by some span


@pytest.mark.parametrize("start", [0, NEAR_WRAP, M32])
def test_south_to_north_round_trip(rings: Callable[..., Ring], start: int) -> None:
    ring = rings(writable=True, start=start)
    north, south = ring.north, ring.south
    north.post_empty(COUNT)
    assert south.pending() == COUNT
    rng = random.Random(start)
    model: deque[bytes] = deque()
    written = reaped = 0
    for step in range(400):
        if rng.random() < 0.5:
            want = rng.randint(0, COUNT + 2)
            batch = _msgs(want, tag=step)
            free = COUNT - len(model)
            assert south.pending() == free
            n = south.write_many(batch)
            assert n == min(want, free)
            model.extend(batch[:n])
            written += n
        else:
            limit = rng.randint(0, COUNT)
            expected = [model.popleft() for _ in range(min(limit, len(model)))]
            got = north.recv_many(limit)
            assert got == expected
            reaped += len(got)
        assert ring.inuse == (start + written) & M32
        assert ring.valid == (start + COUNT + reaped) & M32  # recv_many reposts at once
    assert written > 100
    assert south.stats.messages == written
    if start:
        assert ring.inuse < start


@pytest.mark.parametrize("start", [0, NEAR_WRAP])
def test_send_from_reads_straight_into_the_ring(rings: Callable[..., Ring], start: int) -> None:
    """send_from against a model: messages of random lengths written in place
    (the data area wraps many times), some dropped by the reader, stops when
    the reader has nothing more, and room_for says when one more fits."""
    ring = rings(writable=False, start=start, buf_size=256)
    north, south = ring.north, ring.south
    rng = random.Random(start)
    model: deque[bytes] = deque()
    sent = 0
    for step in range(400):
        if rng.random() < 0.5:
            offered = [bytes([(step + i) & 0xFF]) * rng.randint(0, 200) for i in range(6)]
            drop = {i for i in range(6) if rng.random() < 0.2}
            taken: list[bytes] = []

            def readinto(
                view: memoryview,
                offered: list[bytes] = offered,
                drop: set[int] = drop,
                taken: list[bytes] = taken,
            ) -> int | None:
                if not offered:
                    return None  # nothing more to read
                i = 6 - len(offered)
                msg = offered.pop(0)
                assert len(view) == 201
                view[: len(msg)] = msg
                if i in drop:
                    return -1
                taken.append(msg)
                return len(msg)

            fits = north.room_for(201)
            n = north.send_from(readinto, 201, rng.randint(1, COUNT))
            assert n == len(taken)
            assert fits == (len(offered) < 6)  # room for one: the reader was called
            model.extend(taken)
            sent += n
        else:
            budget = rng.randint(1, COUNT)
            expected = [model.popleft() for _ in range(min(budget, len(model)))]
            assert south.read_many(budget) == expected
    assert sent > 100
    while not north.room_for(201):
        model.popleft()
        south.read_many(1)
    with pytest.raises(TooBig):
        north.send_from(lambda view: 0, 257, 1)


def test_recv_each_hands_out_views_and_reposts(rings: Callable[..., Ring]) -> None:
    ring = rings(writable=True)
    north, south = ring.north, ring.south
    north.post_empty(COUNT)
    batch = _msgs(COUNT, tag=3)
    assert south.write_many(batch) == COUNT
    got: list[bytes] = []
    assert north.recv_each(lambda view: got.append(bytes(view)), 5) == 5
    assert got == batch[:5]
    assert ring.valid == COUNT + 5  # the five buffers were posted again
    assert north.recv_each(lambda view: got.append(bytes(view)), COUNT) == COUNT - 5
    assert got == batch
    assert north.recv_each(lambda view: got.append(bytes(view)), COUNT) == 0


def test_send_many_posts_only_what_fits(rings: Callable[..., Ring]) -> None:
    ring = rings(writable=False)
    assert ring.north.send_many(_msgs(COUNT + 3)) == COUNT
    assert ring.north.send_many(_msgs(1)) == 0
    assert ring.south.read_many(100) == _msgs(COUNT)
    with pytest.raises(TooBig):
        ring.north.send_many([bytes(BUF_SIZE + 1)])


def test_write_many_truncates_a_payload_to_its_buffer(rings: Callable[..., Ring]) -> None:
    ring = rings(writable=True)
    ring.north.post_empty(2)
    long = bytes(range(BUF_SIZE + 10))
    assert ring.south.write_many([long, b"short"]) == 2
    assert ring.desc(0)[2] == BUF_SIZE
    assert ring.north.recv_many(2) == [long[:BUF_SIZE], b"short"]
    assert ring.south.stats.bytes == BUF_SIZE + 5


def test_write_many_backpressure(rings: Callable[..., Ring]) -> None:
    ring = rings(writable=True)
    south = ring.south
    ring.north.post_empty(2)
    assert south.write_many(_msgs(5)) == 2
    assert south.stats.stalls == 1
    assert south.write_many(_msgs(1)) == 0
    assert south.stats.stalls == 2
    assert south.write_many([]) == 0
    assert south.stats.stalls == 2  # asking for nothing is not a stall
    assert ring.north.recv_many(10) == _msgs(2)
    assert south.write_many(_msgs(1)) == 1  # recv_many posted the buffers again


def test_fast_paths_refuse_misuse(rings: Callable[..., Ring]) -> None:
    ring = rings(writable=False)
    with pytest.raises(Invalid, match="north fills"):
        ring.south.write_many([b"x"])
    ring.north.send_many(_msgs(2))
    assert ring.south.pop() is not None
    with pytest.raises(Invalid, match="popped"):
        ring.south.read_many(1)
    out = rings(writable=True)
    out.north.post_empty(2)
    assert out.south.pop() is not None
    with pytest.raises(Invalid, match="popped"):
        out.south.write_many([b"x"])


# --- general path -----------------------------------------------------------------


def test_pop_and_push_in_order_with_cookies(rings: Callable[..., Ring]) -> None:
    ring = rings(writable=False, start=NEAR_WRAP + 14)  # wraps inside this batch
    south = ring.south
    assert south.pop() is None
    assert south.pop_many(4) == []
    base = NEAR_WRAP + 14
    for i in range(4):
        ring.set_desc(base + i, cookie=0xC0DE_0000 + i)
    ring.north.send_many(_msgs(4))
    first = south.pop()
    assert first is not None
    assert first.index == base and first.cookie == 0xC0DE_0000
    ((ptr, length, writable),) = first.segments
    assert not writable and length == first.length == 1
    assert ring.memory.read(ptr, length) == _msgs(1)[0]
    rest = south.pop_many(2)
    assert [b.index for b in rest] == [(base + 1) & M32, (base + 2) & M32]
    assert [b.cookie for b in rest] == [0xC0DE_0001, 0xC0DE_0002]
    assert south.pending() == 1  # counted from the south's cursor
    assert ring.inuse == base  # nothing handed back yet
    south.push(first)
    assert ring.inuse == (base + 1) & M32
    assert ring.desc(base)[4] == 0  # sown cleared
    assert ring.north.completed() == 1
    south.push_many([(rest[0], 0), (rest[1], 0)])
    assert ring.inuse == (base + 3) & M32
    assert south.stats.messages == 3


def test_push_refuses_foreign_buffers_and_second_pushes(rings: Callable[..., Ring]) -> None:
    ring = rings(writable=False)
    south = ring.south
    ring.north.send_many(_msgs(4))
    a, b, c = south.pop_many(3)
    before = bytes(ring.buf)
    not_popped = Buffer(3, 0, ((0, 1, False),))
    with pytest.raises(Invalid, match="not popped"):
        south.push(not_popped)
    with pytest.raises(Invalid, match="not popped"):
        south.push_many([(a, 0), (b, 0), (c, 0), (not_popped, 0)])
    with pytest.raises(Invalid, match="not popped"):
        south.push_many([(b, 0), (b, 0)])  # the same buffer twice in one batch
    with pytest.raises(Invalid, match="written"):
        south.push_many([(b, 0), (c, 1)])  # the south does not write into a north->south buffer
    assert bytes(ring.buf) == before  # nothing handed back by a refused push
    south.push(a)
    with pytest.raises(Invalid, match="not popped"):
        south.push(a)  # handed back already
    south.push(c)  # out of order: held
    with pytest.raises(Invalid, match="not popped"):
        south.push(c)  # held already
    assert ring.inuse == 1
    south.push(b)
    assert ring.inuse == 3


@pytest.mark.parametrize("start", [0, NEAR_WRAP + 14])
def test_out_of_order_completion_is_published_in_ring_order(
    rings: Callable[..., Ring], start: int
) -> None:
    """The contract lets a device push popped buffers in any order; ioq's
    ``inuse`` is one counter, so each is published with the run it completes."""
    ring = rings(writable=True, start=start)
    south, north = ring.south, ring.north
    north.post_empty(4)
    a, b, c, d = south.pop_many(4)
    for buf, reply in ((a, b"A"), (b, b"BB"), (c, b"CCC"), (d, b"DDDD")):
        ((ptr, _length, _writable),) = buf.segments
        ring.memory.write(ptr, reply)
    south.push(c, 3)
    south.push(b, 2)
    assert ring.inuse == start & M32  # a still holds the ring
    assert north.completed() == 0
    assert ring.desc(c.index)[2] == 3  # its length already written, not yet published
    with pytest.raises(Invalid, match="popped"):
        south.write_many([b"x"])  # the data paths hand back in ring order
    assert south.kick_north() is True  # nothing to see yet, but kicking is harmless
    south.push(a, 1)
    assert ring.inuse == (start + 3) & M32  # a, b, c at once
    assert south.stats.messages == 3
    assert north.recv_many(8) == [b"A", b"BB", b"CCC"]
    south.push_many([(d, 4)])
    assert north.recv_many(8) == [b"DDDD"]
    assert south.stats.bytes == 10
    assert south.write_many([b"again"]) == 1  # nothing held: the fast path is back
    assert north.recv_many(8) == [b"again"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(order=st.permutations(range(COUNT)), batch=st.integers(1, 3), writable=st.booleans())
def test_any_completion_order_hands_every_buffer_back_once(
    order: list[int], batch: int, writable: bool
) -> None:
    ring = Ring(writable=writable, start=NEAR_WRAP + 12)
    try:
        south, north = ring.south, ring.north
        if writable:
            north.post_empty(COUNT)
        else:
            assert north.send_many(_msgs(COUNT)) == COUNT
        bufs = south.pop_many(COUNT)
        published = [ring.inuse]
        items = [(bufs[i], i + 1 if writable else 0) for i in order]
        for k in range(0, COUNT, batch):
            south.push_many(items[k : k + batch])
            published.append(ring.inuse)
            # inuse only ever covers a prefix of the ring whose buffers were all pushed
            done = {order[j] for j in range(min(k + batch, COUNT))}
            covered = (ring.inuse - (NEAR_WRAP + 12)) & M32
            assert set(range(covered)) <= done
            assert covered == COUNT or covered not in done
        assert ring.inuse == (NEAR_WRAP + 12 + COUNT) & M32
        assert south.stats.messages == COUNT
        assert all((b - a) & M32 <= COUNT for a, b in pairwise(published))  # never backwards
        if writable:
            assert [ring.desc(buf.index)[2] for buf in bufs] == list(range(1, COUNT + 1))
        assert all(ring.desc(buf.index)[4] == 0 for buf in bufs)  # sown cleared on every one
    finally:
        ring.close()


def test_push_reports_written_bytes_on_a_queue_the_south_fills(
    rings: Callable[..., Ring],
) -> None:
    ring = rings(writable=True)
    south = ring.south
    ring.north.post_empty(2)
    a, b = south.pop_many(2)
    ((ptr, length, writable),) = a.segments
    assert writable and length == BUF_SIZE
    with pytest.raises(Invalid, match="written"):
        south.push(a, BUF_SIZE + 1)
    ring.memory.write(ptr, b"reply")
    south.push(a, 5)
    south.push(b, 0)
    assert ring.north.recv_many(2) == [b"reply", b""]
    assert south.stats.bytes == 5


# --- faults ---------------------------------------------------------------------

Breakage = Callable[[Ring, int], None]

BREAKAGES: dict[str, tuple[Breakage, str]] = {
    "north index too far ahead": (lambda r, i: setattr(r, "valid", r.inuse + COUNT + 1), "ahead"),
    "north index behind": (lambda r, i: setattr(r, "valid", r.inuse - 1), "ahead"),
    "descriptor not valid": (lambda r, i: r.set_desc(i, valid=0), "is not valid (0)"),
    "descriptor valid=2": (lambda r, i: r.set_desc(i, valid=2), "is not valid (2)"),
    "not south-owned": (lambda r, i: r.set_desc(i, sown=0), "not owned by the south (0)"),
    "ptr outside": (lambda r, i: r.set_desc(i, ptr=r.size, len=1), "outside"),
    "ptr+len one past": (lambda r, i: r.set_desc(i, ptr=r.size - 4, len=5), "outside"),
    "len above max_len": (lambda r, i: r.set_desc(i, len=BUF_SIZE + 1), "exceeds the queue's 64"),
    "ptr+len overflows u64": (lambda r, i: r.set_desc(i, ptr=2**64 - 8, len=16), "outside"),
    "ptr 2**64-1": (lambda r, i: r.set_desc(i, ptr=2**64 - 1, len=1), "outside"),
}
# Guest memory says more where a range starts inside a region and runs past its end.
GUEST_MESSAGES = {"ptr+len one past": "crosses the end of the guest memory region"}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
@pytest.mark.parametrize("path", ["read_many", "pop_many", "write_many"])
def test_every_broken_descriptor_is_a_fault(
    rings: Callable[..., Ring], breakage: str, path: str
) -> None:
    writable = path == "write_many"
    start = NEAR_WRAP + 14
    ring = rings(writable=writable, start=start, max_len=BUF_SIZE)
    if writable:
        ring.north.post_empty(4)
    else:
        ring.north.send_many(_msgs(4))
    culprit = start + 2  # the third of four: the batch check must name it
    breaker, message = BREAKAGES[breakage]
    if isinstance(ring.memory, GuestMemory):
        message = GUEST_MESSAGES.get(breakage, message)
    breaker(ring, culprit)
    before = bytes(ring.buf)
    with pytest.raises(Fault, match=re.escape(message)) as info:
        if path == "read_many":
            ring.south.read_many(4)
        elif path == "pop_many":
            ring.south.pop_many(4)
        else:
            ring.south.write_many(_msgs(4))
    if "index" not in breakage:
        assert re.search(rf"descriptor {culprit & M32}\b", info.value.message)
    assert bytes(ring.buf) == before  # a fault hands nothing back and writes nothing
    assert ring.south.stats.messages == 0


@pytest.mark.parametrize("breakage", ["ptr outside", "ptr+len one past", "ptr+len overflows u64"])
def test_large_messages_are_copied_out_one_by_one_and_checked(
    rings: Callable[..., Ring], breakage: str
) -> None:
    """read_many copies messages of SPLIT_FROM bytes or more straight out of the
    north's memory, each once: the same messages, the same bounds checks."""
    ring = rings(writable=False, buf_size=4096, max_len=4096)
    north, south = ring.north, ring.south
    batch = [bytes([i]) * (SPLIT_FROM + 100 * i) for i in range(4)]
    assert north.send_many(batch) == 4
    assert south.read_many(8) == batch
    assert south.stats.bytes == sum(map(len, batch))
    assert north.send_many(batch) == 4
    culprit = ring.inuse + 2
    breaker, message = BREAKAGES[breakage]
    if isinstance(ring.memory, GuestMemory):
        message = GUEST_MESSAGES.get(breakage, message)
    breaker(ring, culprit)
    before = bytes(ring.buf)
    with pytest.raises(Fault, match=re.escape(message)) as info:
        south.read_many(8)
    assert re.search(rf"descriptor {culprit & M32}\b", info.value.message)
    assert bytes(ring.buf) == before
    assert south.stats.messages == 4


@pytest.mark.parametrize(
    ("ptr_of", "length", "expected_of"),
    [
        (lambda size: size, 0, lambda buf: b""),  # empty at the very end
        (lambda size: size - 3, 3, lambda buf: bytes(buf[-3:])),  # last bytes
        (lambda size: 0, BUF_SIZE, lambda buf: bytes(buf[:BUF_SIZE])),  # len == max_len
    ],
)
def test_boundary_descriptors_are_accepted(
    rings: Callable[..., Ring],
    ptr_of: Callable[[int], int],
    length: int,
    expected_of: Callable[[bytearray], bytes],
) -> None:
    ring = rings(writable=False, max_len=BUF_SIZE)
    ring.buf[-3:] = b"end"
    ring.north.send_many([b"x"])
    ring.set_desc(0, ptr=ptr_of(ring.size), len=length)
    assert ring.south.read_many(1) == [expected_of(ring.buf)]


# --- double fetch: the south acts on its snapshot ---------------------------------


class RewritingSouth(IoqSouth):
    """A south whose north rewrites every descriptor right after it was snapshotted."""

    def _snapshot(self, first: int, n: int) -> bytes:
        raw = bytes(super()._snapshot(first, n))
        for i in range(n):
            at = self._base + ((first + i) & self._mask) * DESC_SIZE
            self._ring[at : at + DESC_SIZE] = _DESC.pack(0xBAD, 2**64 - 1, 2**64 - 1, 0, 0)
        return raw


@pytest.mark.parametrize("writable", [False, True])
def test_south_acts_on_its_snapshot(rings: Callable[..., Ring], writable: bool) -> None:
    ring = rings(writable=writable)
    south = RewritingSouth(ring.memory, 0, COUNT, None, writable=writable)
    if writable:
        ring.north.post_empty(3)
        assert south.write_many(_msgs(3)) == 3
        pool = pool_layout(COUNT, BUF_SIZE)[0]
        for i, msg in enumerate(_msgs(3)):
            assert ring.buf[pool + i * BUF_SIZE : pool + i * BUF_SIZE + len(msg)] == msg
            assert ring.desc(i)[2] == len(msg)  # len written back over the rewrite
    else:
        ring.north.send_many(_msgs(3))
        assert south.read_many(3) == _msgs(3)
        ring.north.send_many(_msgs(2, tag=9))
        bufs = south.pop_many(2)
        assert [b.cookie for b in bufs] == [0, 0]
        assert [b.length for b in bufs] == [len(m) for m in _msgs(2, tag=9)]
    south.close()


def test_results_do_not_change_with_shared_memory(rings: Callable[..., Ring]) -> None:
    ring = rings(writable=False)
    ring.north.send_many(_msgs(2))
    got = ring.south.read_many(1)
    popped = ring.south.pop()
    assert popped is not None
    segments, cookie = popped.segments, popped.cookie
    ring.buf[pool_layout(COUNT, BUF_SIZE)[0] :] = b"\xff" * (
        ring.size - pool_layout(COUNT, BUF_SIZE)[0]
    )
    for i in range(2):
        ring.set_desc(i, ptr=2**64 - 1, len=2**64 - 1, cookie=7)
    assert got == _msgs(1)
    assert popped.segments == segments and popped.cookie == cookie
    ring.south.push(popped)  # still hands back fine: push trusts the snapshot only
    assert ring.inuse == 2


# --- notifications ------------------------------------------------------------------


def test_kick_north_is_mitigated_by_the_norths_flags(rings: Callable[..., Ring]) -> None:
    ring = rings(writable=True)
    south, north, call = ring.south, ring.north, ring.call
    assert south.kick_north() is True
    assert call.drain() == 1
    assert south.kick_north() is False  # still pending
    assert call.drain() == 0
    north.signal.disarm()  # the north polls
    assert south.kick_north() is False
    north.signal.arm()
    assert south.kick_north() is True
    assert call.drain() == 1
    stats = south.stats
    assert (stats.signals_sent, stats.signals_suppressed) == (2, 2)


def test_enable_notify_rechecks_the_ring(rings: Callable[..., Ring]) -> None:
    ring = rings(writable=False)
    south, north, kick = ring.south, ring.north, ring.kick
    south.disable_notify()
    assert not south.signal.armed
    north.send_many(_msgs(2))
    assert north.signal.notify() is False  # the south polls: no kick
    assert kick.drain() == 0
    # Work slipped in while notifications were off: enable says so, no wake-up lost.
    assert south.enable_notify() is True
    assert south.signal.armed
    south.disable_notify()
    assert south.read_many(COUNT) == _msgs(2)
    assert south.enable_notify() is False
    north.send_many(_msgs(1))
    assert north.signal.notify() is True
    assert kick.drain() == 1
    assert ring.buf[SIGNAL_AT + 8 + 4 * SOUTH + 1] == 1  # pending, until the south disarms
    south.disable_notify()
    assert ring.buf[SIGNAL_AT + 8 + 4 * SOUTH : SIGNAL_AT + 8 + 4 * SOUTH + 3] == b"\0\0\0"
    assert ring.buf[SIGNAL_AT + 8 + 4 * NORTH] == 1  # the north's flags are its own


# --- fuzz: garbage in the ring never escapes as anything but Fault/Invalid ---------

F_COUNT, F_BUF = 4, 32
F_DATA = pool_layout(F_COUNT, F_BUF)[0]
F_SIZE = F_DATA + F_COUNT * F_BUF  # exactly ring + pool: nothing to hide an overrun in
F_RING = ring_bytes(F_COUNT)
F_SOUTH_IRQ = range(SIGNAL_AT + 8 + 4 * SOUTH, SIGNAL_AT + 12 + 4 * SOUTH)
F_NORTH_IRQ = range(SIGNAL_AT + 8 + 4 * NORTH, SIGNAL_AT + 12 + 4 * NORTH)
F_INUSE = range(INUSE_AT, INUSE_AT + 4)

u64s = st.one_of(
    st.sampled_from(
        [
            *(0, 1, F_BUF, F_DATA, F_SIZE - F_BUF, F_SIZE - 1, F_SIZE, F_SIZE + 1),
            *(2**32, 2**63, 2**64 - F_BUF, 2**64 - 1),
        ]
    ),
    st.integers(0, 2**64 - 1),
)
patches = st.one_of(
    st.tuples(
        st.just("bytes"), st.integers(0, F_RING - 1), st.just(0), st.binary(min_size=1, max_size=24)
    ),
    st.tuples(st.just("field"), st.integers(0, F_COUNT - 1), st.sampled_from([0, 8, 16]), u64s),
    st.tuples(
        st.just("flag"),
        st.integers(0, F_COUNT - 1),
        st.sampled_from([FLAG_VALID, FLAG_SOWN]),
        st.sampled_from([0, 1, 2, 255]),
    ),
    st.tuples(st.just("valid"), st.integers(-2, F_COUNT + 2), st.just(0), st.just(0)),
)
ops = st.tuples(
    st.sampled_from(["pending", "read", "write", "pop", "push", "kick", "enable", "disable"]),
    st.integers(0, F_COUNT + 1),
)


def _apply(buf: bytearray, patch: tuple[str, int, int, object]) -> None:
    kind, a, b, c = patch
    if kind == "bytes":
        assert isinstance(c, bytes)
        end = min(a + len(c), F_RING)
        buf[a:end] = c[: end - a]
    elif kind == "field":
        struct.pack_into("<Q", buf, HEADER_SIZE + a * DESC_SIZE + b, c)
    elif kind == "flag":
        assert isinstance(c, int)
        buf[HEADER_SIZE + a * DESC_SIZE + b] = c
    else:  # the north index, relative to what the south has handed back
        inuse = struct.unpack_from("<I", buf, INUSE_AT)[0]
        struct.pack_into("<I", buf, VALID_AT, (inuse + a) & M32)


def _desc_fields(raw: bytes, index: int) -> tuple[int, int, int, int, int]:
    return _DESC.unpack_from(raw, HEADER_SIZE + (index % F_COUNT) * DESC_SIZE)


def _changed(before: bytes, after: bytearray) -> set[int]:
    return {i for i, (x, y) in enumerate(zip(before, after, strict=True)) if x != y}


def _fuzz_memory(kind: str, buf: bytearray) -> BufferMemory | GuestMemory:
    if kind == "flat":
        return BufferMemory(buf)
    ring = GuestRegion(0, F_DATA, buf, 0)
    return GuestMemory([ring, GuestRegion(F_DATA, F_SIZE - F_DATA, buf, F_DATA, kind == "rom")])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(["flat", "guest", "rom"]),  # rom: the buffer pool is read-only
    writable=st.booleans(),
    start=st.sampled_from([0, F_COUNT - 1, 0xFFFFFFFE]),
    posted=st.integers(0, F_COUNT),
    before_registration=st.lists(patches, max_size=4),
    steps=st.lists(st.tuples(st.lists(patches, max_size=3), ops), max_size=8),
)
def test_garbage_in_the_ring_only_ever_faults(
    kind: str,
    writable: bool,
    start: int,
    posted: int,
    before_registration: list[tuple[str, int, int, object]],
    steps: list[tuple[list[tuple[str, int, int, object]], tuple[str, int]]],
) -> None:
    buf = bytearray(F_SIZE)
    north = IoqNorth(buf, 0, F_COUNT, F_DATA, F_BUF, None)
    struct.pack_into("<I", buf, VALID_AT, start)
    struct.pack_into("<I", buf, INUSE_AT, start)
    north.valid = north.reaped = start
    if writable:
        north.post_empty(posted)
    else:
        north.send_many([bytes([0x40 + i]) * (i + 1) for i in range(posted)])
    north.close()
    for patch in before_registration:
        _apply(buf, patch)
    memory = _fuzz_memory(kind, buf)
    before = bytes(buf)
    try:
        south = IoqSouth(memory, 0, F_COUNT, None, writable=writable, max_len=F_BUF)
    except (Fault, Invalid):
        assert bytes(buf) == before
        return
    cursor = start  # the south's own position: shared memory may lie about it
    popped: list[Buffer] = []
    try:
        for step_patches, (op, arg) in steps:
            for patch in step_patches:
                _apply(buf, patch)
            before = bytes(buf)
            allowed: set[int] = set()
            try:
                if op == "pending":
                    assert 0 <= south.pending() <= F_COUNT
                elif op == "read" and not popped:
                    got = south.read_many(arg)
                    for i, payload in enumerate(got):
                        _, ptr, length, valid, sown = _desc_fields(before, cursor + i)
                        assert (valid, sown) == (1, 1)
                        assert length <= F_BUF and ptr + length <= F_SIZE
                        assert payload == before[ptr : ptr + length]
                        allowed.add(HEADER_SIZE + ((cursor + i) % F_COUNT) * DESC_SIZE + FLAG_SOWN)
                    cursor += len(got)
                    allowed.update(F_INUSE)
                elif op == "write" and writable and not popped:
                    payloads = [bytes([0xA0 + i]) * (3 * i + arg) for i in range(arg)]
                    n = south.write_many(payloads)
                    assert 0 <= n <= len(payloads)
                    for i in range(n):
                        _, ptr, cap, valid, sown = _desc_fields(before, cursor + i)
                        assert (valid, sown) == (1, 1)
                        assert cap <= F_BUF and ptr + cap <= F_SIZE
                        allowed.update(range(ptr, ptr + min(cap, len(payloads[i]))))
                        at = HEADER_SIZE + ((cursor + i) % F_COUNT) * DESC_SIZE
                        allowed.update(range(at + 16, at + 24))  # len written back
                        allowed.add(at + FLAG_SOWN)
                    cursor += n
                    allowed.update(F_INUSE)
                elif op == "pop":
                    bufs = south.pop_many(arg)
                    for i, b in enumerate(bufs):
                        _, ptr, length, valid, sown = _desc_fields(before, cursor + i)
                        assert b.index == (cursor + i) & M32
                        assert b.segments == ((ptr, length, writable),)
                        assert length <= F_BUF and ptr + length <= F_SIZE
                    cursor += len(bufs)
                    popped.extend(bufs)
                elif op == "push" and popped:
                    items = [(b, min(arg, b.length) if writable else 0) for b in popped]
                    south.push_many(items)
                    for b, _w in items:
                        at = HEADER_SIZE + (b.index % F_COUNT) * DESC_SIZE
                        allowed.update(range(at + 16, at + 24))
                        allowed.add(at + FLAG_SOWN)
                    popped.clear()
                    allowed.update(F_INUSE)
                elif op == "kick":
                    south.kick_north()
                    allowed.update(F_NORTH_IRQ)
                elif op == "enable":
                    south.enable_notify()
                    allowed.update(F_SOUTH_IRQ)
                elif op == "disable":
                    south.disable_notify()
                    allowed.update(F_SOUTH_IRQ)
            except (Fault, Invalid):
                assert len(buf) == F_SIZE
                if op != "enable":  # enable stores its flag, then finds the index bad
                    assert bytes(buf) == before
                return
            assert len(buf) == F_SIZE
            assert _changed(before, buf) <= allowed
            if kind == "rom":
                assert buf[F_DATA:] == before[F_DATA:], "the south wrote into read-only memory"
    finally:
        south.close()
        memory.release()


def test_a_poll_takes_a_bounded_number_of_bytes(rings: Callable[..., Ring]) -> None:
    """Between disable_notify and enable_notify (one poll) the south copies
    out about ``poll_bytes``, at least one message; outside a poll nothing
    is bounded, and every message still arrives once, in order."""
    ring = rings(writable=False, buf_size=8192)
    south = ring.south
    south.poll_bytes = 20_000
    sent = _msgs(COUNT, size=8000)
    assert ring.north.send_many(sent) == COUNT
    got: list[bytes] = []
    polls = 0
    while len(got) < COUNT:
        south.disable_notify()
        taken = 0
        while True:  # a device draining "everything" within one poll
            data, lens = south.read_span(COUNT, gather=True)
            if not lens:
                break
            taken += len(data)
            got += [data[i : i + 8000] for i in range(0, len(data), 8000)]
        assert 0 < taken <= 20_000 + 8000  # the credit, overshot by one message at most
        polls += 1
        south.enable_notify()
    assert got == sent and polls >= COUNT // 3
    south.poll_bytes = 1  # a message bigger than the credit still moves, one per poll
    assert ring.north.send_many(sent[:2]) == 2
    south.disable_notify()
    assert len(south.pop_many(COUNT)) == 1
    assert south.pop_many(COUNT) == []


# --- guest memory: buffers by guest-physical address ----------------------------------

RING_AT = 0x10040  # in the ring's region [0x10000, 0x11000)
LOW, HIGH, FAR, ROM = 0x20000, 0x21000, 0x1_0000_0000, 0x80000  # LOW and HIGH are adjacent


class GuestRing:
    """A ring in guest memory laid out as a VMM's would be: the ring in a region
    of its own and buffers in others, each region backed by a buffer of its
    own at an offset into it.  The test is the north: it writes descriptors
    and payloads by hand, through its own idea of the memory table."""

    def __init__(self, *, writable: bool, count: int = COUNT) -> None:
        self.count = count
        table = [  # base, size, offset into the backing, read-only
            (0x10000, 0x1000, 0x100, False),
            (LOW, 0x1000, 0x30, False),
            (HIGH, 0x1000, 0, False),
            (FAR, 0x1000, 0x8, False),
            (ROM, 0x1000, 0, True),
        ]
        self.regions = [GuestRegion(b, n, bytearray(o + n), o, ro) for b, n, o, ro in table]
        self.memory = GuestMemory(self.regions)
        ring = self.regions[0]
        format_ring(ring.buf, RING_AT - ring.base + ring.offset, count)
        self.south = IoqSouth(self.memory, RING_AT, count, None, writable=writable)
        self.valid = 0

    def _where(self, addr: int) -> tuple[bytearray, int]:
        for region in self.regions:
            if region.base <= addr < region.end:
                assert isinstance(region.buf, bytearray)
                return region.buf, addr - region.base + region.offset
        raise AssertionError(f"{addr:#x} is in no region")

    def poke(self, addr: int, data: bytes) -> None:
        buf, at = self._where(addr)
        buf[at : at + len(data)] = data

    def peek(self, addr: int, length: int) -> bytes:
        buf, at = self._where(addr)
        return bytes(buf[at : at + length])

    def post(self, ranges: list[tuple[int, int]], fill: bool = True) -> list[bytes]:
        """Descriptors for ``ranges`` (payloads written first when ``fill``)."""
        payloads = []
        for i, (addr, length) in enumerate(ranges):
            payload = bytes([(self.valid + i) & 0xFF | 0x80]) * length
            if fill and length:
                self.poke(addr, payload)
            payloads.append(payload)
            slot = (self.valid + i) & (self.count - 1)
            self.poke(RING_AT + HEADER_SIZE + slot * DESC_SIZE, _DESC.pack(i, addr, length, 1, 1))
        self.valid += len(ranges)
        self.poke(RING_AT + VALID_AT, struct.pack("=I", self.valid))
        return payloads

    def backings(self) -> list[bytes]:
        return [bytes(region.buf) for region in self.regions]

    def close(self) -> None:
        self.south.close()
        self.memory.close()


@pytest.fixture
def guest_rings() -> Iterator[Callable[..., GuestRing]]:
    made: list[GuestRing] = []

    def make(**kwargs: bool) -> GuestRing:
        made.append(GuestRing(**kwargs))
        return made[-1]

    yield make
    for ring in made:
        ring.close()


def test_guest_ring_reads_buffers_by_guest_address(guest_rings: Callable[..., GuestRing]) -> None:
    ring = guest_rings(writable=False)
    south = ring.south
    # Contiguous in one region: one translation, one slice.
    sent = ring.post([(LOW + 0x10, 5), (LOW + 0x15, 7), (LOW + 0x1C, 64)])
    assert south.read_span(COUNT) == (b"".join(sent), [5, 7, 64])
    # One region, out of order: translated once, cut from that region's buffer.
    sent = ring.post([(FAR + 0x800, 3), (FAR, 4), (FAR + 0xFFC, 4)])
    assert south.read_many(COUNT) == sent
    # All over the place (and the last byte of LOW, the first of HIGH, the read-only
    # region: the south only reads here): one translation each.
    sent = ring.post([(LOW + 0xFFF, 1), (HIGH, 2), (ROM + 8, 8), (FAR + 16, 0), (LOW, 3)])
    assert south.read_many(COUNT) == sent
    assert ring.peek(RING_AT + INUSE_AT, 4) == struct.pack("=I", 11)
    # The general path hands out guest addresses; Memory reads them.
    sent = ring.post([(HIGH + 0x100, 9), (ROM, 2)])
    bufs = south.pop_many(COUNT)
    assert [b.segments for b in bufs] == [((HIGH + 0x100, 9, False),), ((ROM, 2, False),)]
    assert [ring.memory.read(*b.segments[0][:2]) for b in bufs] == sent
    south.push_many([(b, 0) for b in bufs])
    assert south.stats.messages == 13


GUEST_BREAKAGES = {
    "in the hole between regions": ((0x30000, 1), "outside every region"),
    "from LOW on into HIGH": (
        (HIGH - 2, 4),
        f"crosses the end of the guest memory region [{LOW:#x}",
    ),
    "past the last region": ((FAR + 0xFFF, 2), "crosses the end"),
    "below every region": ((0x100, 1), "outside every region"),
    "the ring's region, past its end": ((0x10FF0, 0x20), "crosses the end"),
}


@pytest.mark.parametrize("breakage", list(GUEST_BREAKAGES))
@pytest.mark.parametrize("path", ["read_span", "read_many", "pop_many", "write_many"])
def test_guest_ring_faults_a_buffer_outside_one_region(
    guest_rings: Callable[..., GuestRing], breakage: str, path: str
) -> None:
    writable = path == "write_many"
    ring = guest_rings(writable=writable)
    bad, message = GUEST_BREAKAGES[breakage]
    ring.post([(LOW, 8), (LOW + 8, 8), bad, (LOW + 16, 8)], fill=False)
    before = ring.backings()
    with pytest.raises(Fault, match=rf"descriptor 2: .*{re.escape(message)}"):
        if path == "write_many":
            ring.south.write_many(_msgs(4))
        elif path == "read_span":
            # gather: the whole batch (without it the span stops where the
            # buffers stop being contiguous, and the next span faults)
            ring.south.read_span(4, gather=True)
        else:
            getattr(ring.south, path)(4)
    assert ring.backings() == before  # nothing handed back, nothing written
    assert ring.south.stats.messages == 0


def test_guest_ring_the_south_fills_buffers_in_their_regions(
    guest_rings: Callable[..., GuestRing],
) -> None:
    ring = guest_rings(writable=True)
    south = ring.south
    # One region: translated once, written through the shifted pointers.
    ring.post([(LOW + 0x40, 16), (LOW, 16), (LOW + 0xFF0, 16)], fill=False)
    payloads = [b"a" * 10, b"b" * 16, b"c" * 20]  # the last one is cut to its buffer
    assert south.write_many(payloads) == 3
    assert ring.peek(LOW + 0x40, 16) == b"a" * 10 + bytes(6)
    assert ring.peek(LOW, 16) == b"b" * 16
    assert ring.peek(LOW + 0xFF0, 16) == b"c" * 16
    lens = [
        _DESC.unpack(ring.peek(RING_AT + HEADER_SIZE + i * DESC_SIZE, DESC_SIZE))[2]
        for i in range(3)
    ]
    assert lens == [10, 16, 16]
    # Several regions: one translation each.
    ring.post([(HIGH, 8), (FAR + 0x10, 8), (LOW + 0x200, 8)], fill=False)
    assert south.write_many([b"x" * 8, b"y" * 8, b"z" * 8]) == 3
    assert [ring.peek(a, 8) for a in (HIGH, FAR + 0x10, LOW + 0x200)] == [
        b"x" * 8,
        b"y" * 8,
        b"z" * 8,
    ]
    assert ring.regions[3].buf[0x18:0x20] == b"y" * 8  # FAR's backing starts 8 bytes in
    assert south.stats.bytes == 10 + 16 + 16 + 24


@pytest.mark.parametrize("path", ["write_many", "pop_many"])
def test_guest_ring_refuses_writable_buffers_in_a_read_only_region(
    guest_rings: Callable[..., GuestRing], path: str
) -> None:
    ring = guest_rings(writable=True)
    ring.post([(LOW, 8), (ROM + 0x10, 8)], fill=False)
    before = ring.backings()
    with pytest.raises(Fault, match=r"descriptor 1: .*read-only guest memory region"):
        if path == "write_many":
            ring.south.write_many([b"x" * 8, b"y" * 8])
        else:
            ring.south.pop_many(2)
    assert ring.backings() == before


def test_guest_ring_must_lie_in_one_writable_region() -> None:
    ring_size = ring_bytes(COUNT)
    low, high = bytearray(0x1000), bytearray(0x1000)
    rom = bytearray(0x1000)
    memory = GuestMemory(
        [
            GuestRegion(LOW, 0x1000, low),
            GuestRegion(HIGH, 0x1000, high),
            GuestRegion(ROM, 0x1000, rom, readonly=True),
        ]
    )
    format_ring(rom, 0, COUNT)
    with pytest.raises(Fault, match=r"does not fit the memory .*read-only"):
        IoqSouth(memory, ROM, COUNT, None, writable=False)
    at = HIGH - 256  # 64-aligned, runs from LOW on into HIGH
    with pytest.raises(Fault, match=r"does not fit the memory .*crosses the end"):
        IoqSouth(memory, at, COUNT, None, writable=False)
    with pytest.raises(Fault, match=r"does not fit the memory .*outside every region"):
        IoqSouth(memory, 0x40000, COUNT, None, writable=False)
    format_ring(high, 0x1000 - ring_size - (0x1000 - ring_size) % 64, COUNT)  # at the very end
    south = IoqSouth(
        memory, HIGH + 0x1000 - ring_size - (0x1000 - ring_size) % 64, COUNT, None, writable=False
    )
    assert south.pending() == 0
    south.close()


def test_one_guest_region_at_zero_takes_the_flat_path() -> None:
    data, total = pool_layout(COUNT, BUF_SIZE)
    buf = bytearray(total)
    north = IoqNorth(buf, 0, COUNT, data, BUF_SIZE, None)
    memory = GuestMemory([GuestRegion(0, total, buf)])
    south = IoqSouth(memory, 0, COUNT, None, writable=False)
    assert south._guest is None  # ptr is an offset into the one buffer, as for BufferMemory
    north.send_many(_msgs(3))
    assert south.read_many(3) == _msgs(3)
    ring = IoqSouth(two_regions(buf, data), 0, COUNT, None, writable=False)
    assert ring._guest is not None
    for end in (south, ring, north):
        end.close()
    memory.close()


def test_a_ring_over_mapped_pages() -> None:
    """Xen-style memory: the ring in one page, buffers in others; a buffer may not
    run on into the next page, even where that page is mapped too."""
    pages = {frame: bytearray(PAGE_SIZE) for frame in (3, 7, 8)}
    memory = PageMemory()
    for frame, page in pages.items():
        memory.map_page(frame, page)
    format_ring(pages[3], 0, COUNT)
    south = IoqSouth(memory, 3 * PAGE_SIZE, COUNT, None, writable=False)
    descs = [(7 * PAGE_SIZE + 100, 5), (8 * PAGE_SIZE, 6), (7 * PAGE_SIZE + 105, 7)]
    for i, (addr, length) in enumerate(descs):
        frame, at = divmod(addr, PAGE_SIZE)
        pages[frame][at : at + length] = bytes([i + 1]) * length
        pages[3][HEADER_SIZE + i * DESC_SIZE : HEADER_SIZE + (i + 1) * DESC_SIZE] = _DESC.pack(
            0, addr, length, 1, 1
        )
    struct.pack_into("=I", pages[3], VALID_AT, 3)
    assert south.read_many(COUNT) == [b"\x01" * 5, b"\x02" * 6, b"\x03" * 7]
    pages[3][HEADER_SIZE + 3 * DESC_SIZE : HEADER_SIZE + 4 * DESC_SIZE] = _DESC.pack(
        0, 8 * PAGE_SIZE - 2, 4, 1, 1
    )
    struct.pack_into("=I", pages[3], VALID_AT, 4)
    with pytest.raises(Fault, match=r"descriptor 3: .*crosses the end of page 7"):
        south.read_many(COUNT)
    south.close()
    memory.release()
