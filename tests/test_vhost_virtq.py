"""vbus.vhost.virtq: split virtqueues driven by a Python driver over memfd guest RAM."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vbus.errors import Fault, Invalid
from vbus.memory import GuestMemory, GuestRegion, create_memfd
from vbus.signal import EventfdTransport
from vbus.vhost.driver import INDIRECT, NEXT, WRITE, Driver, GuestRam
from vbus.vhost.virtq import VirtQueue

RAM = 1 << 20
BASE = 0x100000  # guest-physical address of the RAM


@pytest.fixture
def ram() -> tuple[GuestRam, GuestMemory]:
    fd, mapping = create_memfd("guest", RAM)
    os.close(fd)
    memory = GuestMemory([GuestRegion(BASE, RAM, mapping)], owned=[mapping])
    return GuestRam(mapping, BASE), memory


def queue(
    drv: Driver,
    memory: GuestMemory,
    *,
    writable: bool,
    call: EventfdTransport | None = None,
    **kw: object,
) -> VirtQueue:
    return VirtQueue(
        memory,
        drv.num,
        drv.desc,
        drv.avail,
        drv.used,
        call,
        writable=writable,
        **kw,  # type: ignore[arg-type]
    )


def test_tx_chains_direct_and_indirect(ram: tuple[GuestRam, GuestMemory]) -> None:
    g, memory = ram
    drv = Driver(g, num=8)
    hdr, payload = g.alloc(12), g.alloc(100)
    g.write(hdr, b"h" * 12)
    g.write(payload, b"p" * 100)
    first = drv.chain([(hdr, 12, False), (payload, 100, False)])
    second = drv.indirect([(hdr, 12, False), (payload, 50, False)], publish=True)
    q = queue(drv, memory, writable=False, indirect=True)
    assert q.pending() == 2
    assert q.read_many(8) == [b"h" * 12 + b"p" * 100, b"h" * 12 + b"p" * 50]
    assert drv.take_used() == [(first, 0), (second, 0)]
    assert (q.stats.messages, q.stats.bytes) == (2, 174)
    assert q.pending() == 0 and q.pop() is None


def test_rx_fills_writable_segments_and_reports_the_length(
    ram: tuple[GuestRam, GuestMemory],
) -> None:
    g, memory = ram
    drv = Driver(g, num=8)
    a, b = g.alloc(8), g.alloc(100)
    head = drv.chain([(a, 8, True), (b, 100, True)])
    q = queue(drv, memory, writable=True)
    assert q.write_many([b"x" * 20]) == 1
    assert drv.take_used() == [(head, 20)]
    assert g.read(a, 8) + g.read(b, 12) == b"x" * 20
    assert q.write_many([b"y"]) == 0 and q.stats.stalls == 1


def test_a_descriptor_crossing_regions_is_two_segments() -> None:
    fd, mapping = create_memfd("two", 2 * 65536)
    os.close(fd)
    low = GuestRegion(0, 65536, mapping, 0)
    high = GuestRegion(65536, 65536, mapping, 65536)  # adjacent in guest-physical space
    memory = GuestMemory([low, high], owned=[mapping])
    g = GuestRam(mapping, 0)
    drv = Driver(g, num=4)
    head = drv.chain([(65536 - 10, 30, False)])
    q = queue(drv, memory, writable=False)
    buf = q.pop()
    assert buf is not None and buf.index == head
    assert buf.segments == ((65536 - 10, 10, False), (65536, 20, False))


def test_event_idx_both_ways(ram: tuple[GuestRam, GuestMemory]) -> None:
    g, memory = ram
    drv = Driver(g, num=16)
    call = EventfdTransport.create()
    q = queue(drv, memory, writable=True, call=call, event_idx=True)
    for _ in range(4):
        drv.buffer(64)
    drv.set_used_event(2)  # interrupt me once the used index passes 2
    assert q.write_many([b"a", b"b"]) == 2
    assert not q.kick_north()  # used 0 -> 2 does not pass 2
    assert q.write_many([b"c"]) == 1
    assert q.kick_north()  # 2 -> 3 does
    assert call.drain() == 1
    assert not q.kick_north()  # nothing new
    assert (q.stats.signals_sent, q.stats.signals_suppressed) == (1, 1)
    # the device asks to be kicked at the next entry it will read
    q.disable_notify()
    assert q.enable_notify()  # one buffer is still posted: poll again
    assert drv.avail_event() == 3
    assert q.write_many([b"d"]) == 1
    assert not q.enable_notify()
    assert drv.avail_event() == 4
    old = drv.avail_idx
    drv.buffer(64)
    assert drv.wants_kick(old)
    call.close()


def test_flags_without_event_idx(ram: tuple[GuestRam, GuestMemory]) -> None:
    g, memory = ram
    drv = Driver(g, num=8)
    call = EventfdTransport.create()
    q = queue(drv, memory, writable=True, call=call)
    q.disable_notify()
    assert drv.used_flags() & 1  # VRING_USED_F_NO_NOTIFY while polling
    assert not q.enable_notify()
    assert not drv.used_flags() & 1
    drv.buffer(64)
    drv.buffer(64)
    drv.set_no_interrupt(True)
    q.write_many([b"a"])
    assert not q.kick_north()
    drv.set_no_interrupt(False)
    q.write_many([b"b"])
    assert q.kick_north() and call.drain() == 1
    call.close()


def test_merged_rx_buffers(ram: tuple[GuestRam, GuestMemory]) -> None:
    g, memory = ram
    drv = Driver(g, num=16)
    heads = [drv.buffer(1024) for _ in range(8)]
    q = queue(drv, memory, writable=True, merge=(4000, 10))
    assert q.pending() == 2  # 8 x 1024 bytes make two buffers of at least 4000
    buf = q.pop()
    assert buf is not None and buf.capacity == 4096 and len(buf.segments) == 4
    frame = bytes(range(256)) * 10  # 2560 bytes: three chains
    q.scatter(buf, frame)
    q.push(buf, len(frame))
    used = drv.take_used()
    assert used == [(heads[0], 1024), (heads[1], 1024), (heads[2], 512)]
    data = g.read(drv_gpa(drv, heads[0]), 1024)
    assert struct.unpack_from("<H", data, 10)[0] == 3  # num_buffers
    assert data[:10] == frame[:10] and data[12:] == frame[12:1024]
    # the fourth chain was not used: it leads the next buffer
    nxt = q.pop()
    assert nxt is not None and nxt.index == heads[3]
    q.push(nxt, 60)
    assert drv.take_used() == [(heads[3], 60)]
    # stopping gives back what was taken and never used (4 chains left in the stash)
    assert q.pending() == 1 and q.stop() == 4


def drv_gpa(drv: Driver, head: int) -> int:
    addr: int = struct.unpack("<Q", drv.ram.read(drv.desc + 16 * head, 8))[0]
    return addr


def test_push_checks_the_buffer(ram: tuple[GuestRam, GuestMemory]) -> None:
    g, memory = ram
    drv = Driver(g, num=4)
    drv.buffer(64)
    q = queue(drv, memory, writable=True)
    buf = q.pop()
    assert buf is not None
    with pytest.raises(Invalid):
        q.push(buf, 65)
    q.push(buf, 64)
    with pytest.raises(Invalid):
        q.push(buf, 0)  # twice
    q.close()
    with pytest.raises(Invalid):
        q.pending()


# --- what a hostile driver can do: each a Fault with its reason ---------------------------


def hostile(ram: tuple[GuestRam, GuestMemory], **kw: object) -> tuple[Driver, VirtQueue, GuestRam]:
    g, memory = ram
    drv = Driver(g, num=4)
    return drv, queue(drv, memory, writable=False, **kw), g


def test_fault_descriptor_loop(ram: tuple[GuestRam, GuestMemory]) -> None:
    drv, q, g = hostile(ram)
    data = g.alloc(16)
    drv.write_desc(0, data, 16, NEXT, 1)
    drv.write_desc(1, data, 16, NEXT, 0)
    drv.make_available(0)
    with pytest.raises(Fault, match="loop"):
        q.pop()


def test_fault_chain_longer_than_the_indirect_table(ram: tuple[GuestRam, GuestMemory]) -> None:
    drv, q, g = hostile(ram, indirect=True)
    data = g.alloc(16)
    table = g.alloc(32, 16)
    g.write(
        table, struct.pack("<QIHH", data, 16, NEXT, 1) + struct.pack("<QIHH", data, 16, NEXT, 2)
    )
    drv.write_desc(0, table, 32, INDIRECT)
    drv.make_available(0)
    with pytest.raises(Fault, match="outside its table"):
        q.pop()


@pytest.mark.parametrize(
    ("setup", "match"),
    [
        (lambda d, g: d.write_desc(0, 0x10, 16, 0), "outside every region"),
        (lambda d, g: d.write_desc(0, g.alloc(16), 16, NEXT, 9), "next 9"),
        (lambda d, g: d.write_desc(0, g.alloc(32), 32, INDIRECT), "INDIRECT_DESC not negotiated"),
        (
            lambda d, g: (
                d.write_desc(0, g.alloc(16), 16, WRITE | NEXT, 1),
                d.write_desc(1, g.alloc(16), 16, 0),
            ),
            "readable descriptor after a writable",
        ),
    ],
)
def test_faults_in_a_chain(ram: tuple[GuestRam, GuestMemory], setup: object, match: str) -> None:
    drv, q, g = hostile(ram)
    setup(drv, g)  # type: ignore[operator]
    drv.make_available(0)
    with pytest.raises(Fault, match=match):
        q.pop()


def test_fault_nested_indirect_and_indirect_with_next(ram: tuple[GuestRam, GuestMemory]) -> None:
    drv, q, g = hostile(ram, indirect=True)
    table = g.alloc(16, 16)
    g.write(table, struct.pack("<QIHH", table, 16, INDIRECT, 0))
    drv.write_desc(0, table, 16, INDIRECT)
    drv.make_available(0)
    with pytest.raises(Fault, match="inside an indirect table"):
        q.pop()
    drv2, q2, _g2 = hostile(ram, indirect=True)
    drv2.write_desc(0, table, 16, INDIRECT | NEXT, 1)
    drv2.make_available(0)
    with pytest.raises(Fault, match="NEXT"):
        q2.pop()


def test_fault_avail_index_jump_and_bad_head(ram: tuple[GuestRam, GuestMemory]) -> None:
    drv, q, g = hostile(ram)
    g.put_u16(drv.avail + 2, 5)  # 5 entries on a ring of 4
    with pytest.raises(Fault, match="moved 5 entries"):
        q.pending()
    g.put_u16(drv.avail + 2, 1)
    g.put_u16(drv.avail + 4, 7)  # head 7
    with pytest.raises(Fault, match="head 7"):
        q.pop()


def test_fault_head_posted_twice(ram: tuple[GuestRam, GuestMemory]) -> None:
    drv, q, g = hostile(ram)
    drv.write_desc(0, g.alloc(16), 16, 0)
    drv.make_available(0)
    drv.make_available(0)
    assert q.pop() is not None
    with pytest.raises(Fault, match="while the device holds it"):
        q.pop()


def test_fault_scribbled_used_ring(ram: tuple[GuestRam, GuestMemory]) -> None:
    drv, q, g = hostile(ram)
    drv.buffer(b"x" * 16)
    buf = q.pop()
    assert buf is not None
    g.put_u16(drv.used + 2, 3)
    with pytest.raises(Fault, match="used ring's index was changed"):
        q.push(buf)


def test_ring_outside_memory_or_misaligned(ram: tuple[GuestRam, GuestMemory]) -> None:
    _g, memory = ram
    with pytest.raises(Fault):
        VirtQueue(memory, 256, BASE + RAM - 64, BASE, BASE + 8192, None, writable=False)
    with pytest.raises(Fault, match="aligned"):
        VirtQueue(memory, 256, BASE + 8, BASE + 8192, BASE + 16384, None, writable=False)


def test_poll_byte_credit(ram: tuple[GuestRam, GuestMemory]) -> None:
    g, memory = ram
    drv = Driver(g, num=8)
    for _ in range(4):
        drv.buffer(b"z" * 1000)
    q = queue(drv, memory, writable=False, poll_bytes=1500)
    q.disable_notify()
    assert len(q.read_many(8)) == 2  # the second buffer spends the credit
    assert q.pending() == 2
    assert q.enable_notify()  # work left: poll again
    assert len(q.read_many(8)) == 2


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(st.binary(min_size=64, max_size=16 * 8 + 6 + 16), st.integers(0, 0xFFFF), st.booleans())
def test_any_ring_content_is_served_or_faulted(
    ram: tuple[GuestRam, GuestMemory], table: bytes, avail_idx: int, writable: bool
) -> None:
    g, memory = ram
    g.top = 0  # the same ring for every example
    drv = Driver(g, num=8)
    drv.poke(drv.desc, table[: 16 * 8])
    drv.poke(drv.avail, table[16 * 8 :])
    g.put_u16(drv.avail + 2, avail_idx)
    q = queue(drv, memory, writable=writable, indirect=True, event_idx=True)
    try:
        for buf in q.pop_many(8):
            assert all(a >= BASE and a + n <= BASE + RAM for a, n, _w in buf.segments)
            q.push(buf, buf.capacity)
        q.kick_north()
        q.enable_notify()
    except Fault:
        pass
    finally:
        q.close()
        drv.poke(drv.desc, bytes(16 * 8 + 6 + 16))
