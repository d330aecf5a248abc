"""The vif's two queues (``vbus.xen.netback``) over netif rings laid out as
netfront writes them: the test plays the domU (its granted pages, its tx
requests and posted rx buffers) and a fake grant copier stands for the
hypervisor's copy, refusing a reference the domU never granted."""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.netframes import MAC_A, MAC_B, eth, gso_frame, ipv4_tcp
from vbus.errors import Fault, Invalid
from vbus.net import vnet
from vbus.queue import Buffer
from vbus.xen import netif
from vbus.xen.dom0 import EventChannels, GrantCopier
from vbus.xen.netback import TX_BATCH_BYTES, NetifRx, NetifTx, PortKick, rx_slots
from vbus.xen.netif import (
    EXTRA_FLAG_MORE,
    EXTRA_GSO,
    MAX_TX_SIZE,
    NETRXF_CSUM_BLANK,
    NETRXF_DATA_VALIDATED,
    NETRXF_EXTRA_INFO,
    NETRXF_MORE_DATA,
    NETTXF_CSUM_BLANK,
    NETTXF_EXTRA_INFO,
    NETTXF_MORE_DATA,
    PAGE_SIZE,
    RING_HEADER,
    RSP_ERROR,
    RSP_NULL,
    RSP_OKAY,
    RX_RING_SIZE,
    ExtraInfo,
    RxBackRing,
    TxBackRing,
    TxRequest,
)

GNTST_BAD_GREF = -3
PLAIN = vnet.HDR_SIZE + 1514  # the rx capacity of a port without GSO
SUPER = 65562  # with GSO: 12 + 65550, 18 rx requests (17 pages and the extra)
_REQ_PROD, _REQ_EVENT, _RSP_PROD, _RSP_EVENT = 0, 4, 8, 12
_M32 = 0xFFFFFFFF


def plain(payload: bytes = b"x" * 46) -> bytes:
    return eth(MAC_B, MAC_A, 0x88B5, payload)


def tcp4(payload: bytes = b"x" * 20) -> bytes:
    return eth(MAC_B, MAC_A, 0x0800, ipv4_tcp(payload))


class FakeCopier:
    """``GrantCopier``'s interface over the domU's granted pages (gref -> page).
    It asserts what the real driver refuses (a side leaving its page or the
    local buffer, too many segments) and fails a reference it does not know
    with GNTST_bad_gntref, as Xen does."""

    def __init__(self, pages: dict[int, bytearray], size: int) -> None:
        self.pages = pages
        self.size = size
        self.array = bytearray(size)
        self.buffer = memoryview(self.array)
        self.queued: list[tuple[bool, int, int, int, int]] = []
        self.batches = 0

    def _check(self, offset: int, length: int, at: int) -> None:
        assert len(self.queued) < 512, "more segments than one batch takes"
        assert offset >= 0 and length > 0 and offset + length <= PAGE_SIZE, (offset, length)
        assert at >= 0 and at + length <= self.size, (at, length)

    def from_grant(self, ref: int, offset: int, length: int, at: int) -> None:
        self._check(offset, length, at)
        self.queued.append((False, ref, offset, length, at))

    def to_grant(self, ref: int, offset: int, at: int, length: int) -> None:
        self._check(offset, length, at)
        self.queued.append((True, ref, offset, length, at))

    def run(self) -> list[int]:
        statuses = []
        for into_grant, ref, offset, length, at in self.queued:
            page = self.pages.get(ref)
            if page is None:
                statuses.append(GNTST_BAD_GREF)
            elif into_grant:
                page[offset : offset + length] = self.array[at : at + length]
                statuses.append(0)
            else:
                self.array[at : at + length] = page[offset : offset + length]
                statuses.append(0)
        if self.queued:
            self.batches += 1
        self.queued.clear()
        return statuses


class FakeKick:
    """``PortKick`` without an event channel: counts the notifications."""

    def __init__(self) -> None:
        self.fd = 99
        self.kicks = 0

    def kick(self) -> None:
        self.kicks += 1

    def drain(self) -> int:
        return 0

    def close(self) -> None:
        self.fd = -1


class Front:
    """The frontend's side of one ring page: slots written, req_prod published,
    rsp_event set when it wants to hear of responses."""

    def __init__(self, slot: int) -> None:
        self.page = bytearray(PAGE_SIZE)
        self.slot = slot
        self.prod = 0

    def entry(self, idx: int) -> int:
        return RING_HEADER + (idx % 256) * self.slot

    def put(self, raw: bytes) -> None:
        self.page[self.entry(self.prod) : self.entry(self.prod) + len(raw)] = raw
        self.prod += 1

    def publish(self) -> bool:
        """Publish req_prod; whether netfront notifies the backend now
        (``RING_PUSH_REQUESTS_AND_CHECK_NOTIFY``)."""
        old = self.u32(_REQ_PROD)
        new = self.prod & _M32
        struct.pack_into("<I", self.page, _REQ_PROD, new)
        return ((new - self.u32(_REQ_EVENT)) & _M32) < ((new - old) & _M32)

    def ask(self) -> None:
        """Ask to be notified of the next response (netfront's final check)."""
        struct.pack_into("<I", self.page, _RSP_EVENT, (self.u32(_RSP_PROD) + 1) & _M32)

    def u32(self, off: int) -> int:
        return int(struct.unpack_from("<I", self.page, off)[0])

    def response(self, idx: int, fmt: str) -> tuple[int, ...]:
        return struct.unpack_from(fmt, self.page, self.entry(idx))


@dataclass(frozen=True)
class Received:
    """One frame as netfront reassembles it from its rx responses."""

    flags: int  # the first response's
    gso: ExtraInfo | None
    frame: bytes
    ids: list[int]  # the request ids its data responses answered


class Vif:
    """A domU's vif, its side (granted pages, the two ring pages) and dom0's
    two queues over it, as the connector builds them."""

    def __init__(self, capacity: int = PLAIN, gso: bool = False) -> None:
        self.pages: dict[int, bytearray] = {}
        self.txf = Front(netif.TX_SLOT)
        self.rxf = Front(netif.RX_SLOT)
        self.kick = FakeKick()
        self.tx_copier = FakeCopier(self.pages, TX_BATCH_BYTES + MAX_TX_SIZE)
        slots = max(1, RX_RING_SIZE // rx_slots(capacity, gso))
        self.rx_copier = FakeCopier(self.pages, slots * capacity)
        kick = cast(PortKick, self.kick)
        self.tx = NetifTx(
            TxBackRing(memoryview(self.txf.page)), cast(GrantCopier, self.tx_copier), kick
        )
        self.rx = NetifRx(
            RxBackRing(memoryview(self.rxf.page)),
            cast(GrantCopier, self.rx_copier),
            kick,
            capacity,
            gso,
        )
        self._gref = 1
        self._tx_id = 0
        self.rx_posted: dict[int, int] = {}  # rx ring index -> gref posted there
        self.rx_cons = 0

    def grant(self, data: bytes = b"", offset: int = 0) -> int:
        gref = self._gref
        self._gref += 1
        page = bytearray(PAGE_SIZE)
        page[offset : offset + len(data)] = data
        self.pages[gref] = page
        return gref

    # --- tx: what xennet_start_xmit writes ---------------------------------------
    def send(
        self,
        frame: bytes,
        sizes: Sequence[int] = (),
        flags: int = 0,
        extras: Sequence[ExtraInfo] = (),
        offset: int = 0,
    ) -> list[int]:
        """The frame in granted pages, cut into fragments of ``sizes`` (one
        slot by default, at ``offset`` of its page); its requests and extras
        on the ring, published.  The request ids, in slot order of the data."""
        sizes = list(sizes) or [len(frame)]
        assert sum(sizes) == len(frame)
        at = 0
        reqs: list[TxRequest] = []
        for i, size in enumerate(sizes):
            off = offset if i == 0 else 0
            gref = self.grant(frame[at : at + size], off)
            more = NETTXF_MORE_DATA if i + 1 < len(sizes) else 0
            first = (flags | (NETTXF_EXTRA_INFO if extras else 0)) if i == 0 else 0
            reqs.append(
                TxRequest(gref, off, first | more, self._tx_id, len(frame) if i == 0 else size)
            )
            self._tx_id += 1
            at += size
        self.txf.put(netif.pack_tx_request(reqs[0]))
        for i, extra in enumerate(extras):
            more = EXTRA_FLAG_MORE if i + 1 < len(extras) else 0
            self.txf.put(netif.pack_extra(ExtraInfo(extra.type, more, extra.data)))
        for req in reqs[1:]:
            self.txf.put(netif.pack_tx_request(req))
        self.txf.publish()
        return [r.id for r in reqs]

    def tx_responses(self) -> list[tuple[int, ...]]:
        return [self.txf.response(i, "<Hh") for i in range(self.txf.u32(_RSP_PROD))]

    # --- rx: what xennet_alloc_rx_buffers and xennet_get_responses do ----------------
    def post(self, n: int, gref: int | None = None) -> bool:
        """Post ``n`` empty pages (or ``gref`` for each); whether netfront notifies."""
        for _ in range(n):
            idx = self.rxf.prod
            ref = self.grant() if gref is None else gref
            self.rx_posted[idx] = ref
            self.rxf.put(netif.pack_rx_request(idx & 0xFFFF, ref))
        return self.rxf.publish()

    def received(self) -> list[Received]:
        out = []
        prod = self.rxf.u32(_RSP_PROD)
        while self.rx_cons != prod:
            first = self.rx_cons
            flags = self.rxf.response(first, "<HHHh")[2]
            gso = None
            data = bytearray()
            ids = []
            idx = first
            while True:
                rid, offset, rflags, status = self.rxf.response(idx, "<HHHh")
                assert rid == idx & 0xFFFF and offset == 0 and status > 0
                data += self.pages[self.rx_posted[idx]][:status]
                ids.append(rid)
                idx += 1
                if idx - 1 == first and rflags & NETRXF_EXTRA_INFO:
                    raw = self.rxf.page[self.rxf.entry(idx) : self.rxf.entry(idx) + 8]
                    gso = ExtraInfo(raw[0], raw[1], bytes(raw[2:8]))
                    idx += 1
                if not rflags & NETRXF_MORE_DATA:
                    break
            self.rx_cons = idx
            out.append(Received(flags, gso, bytes(data), ids))
        return out

    def deliver(self, venet_frame: bytes) -> Buffer:
        """The device's side of one rx frame: pop, write it, push."""
        buf = self.rx.pop()
        assert buf is not None
        self.rx.memory.write(buf.segments[0][0], venet_frame)
        self.rx.push(buf, len(venet_frame))
        return buf


# --- tx ----------------------------------------------------------------------------------


def test_a_one_slot_packet_arrives_as_a_venet_frame_and_is_answered() -> None:
    vif = Vif()
    frame = plain()
    (rid,) = vif.send(frame, offset=300)
    assert vif.tx.pending()
    assert vif.tx.read_many(64) == [vnet.header() + frame]
    assert vif.tx.pending() == 0 and vif.tx.read_many(64) == []
    assert vif.tx_responses() == []  # staged, not published
    vif.txf.ask()
    assert vif.tx.kick_north() is True
    assert vif.tx_responses() == [(rid, RSP_OKAY)]
    assert vif.kick.kicks == 1
    assert (vif.tx.stats.messages, vif.tx.stats.bytes) == (1, vnet.HDR_SIZE + len(frame))


def test_a_packet_of_several_slots_is_gathered_whole() -> None:
    vif = Vif()
    frame = plain(bytes(range(256)) * 20)[:5000]
    ids = vif.send(frame, sizes=[1000, 3000, 1000], offset=96)
    assert vif.tx.read_many(64) == [vnet.header() + frame]
    vif.tx.kick_north()
    assert vif.tx_responses() == [(i, RSP_OKAY) for i in ids]


def test_csum_blank_becomes_needs_csum() -> None:
    vif = Vif()
    frame = tcp4(b"y" * 100)
    vif.send(frame, flags=NETTXF_CSUM_BLANK)
    (out,) = vif.tx.read_many(64)
    assert out == vnet.header(vnet.HDR_NEEDS_CSUM, csum_start=34, csum_offset=16) + frame


def test_a_gso_extra_becomes_a_gso_header_and_its_slot_is_answered_null() -> None:
    vif = Vif()
    frame = tcp4(b"z" * 9000)  # 9054 bytes in three pages
    gso = ExtraInfo.gso(1448, netif.GSO_TCPV4)
    ids = vif.send(frame, sizes=[2054, 4096, 2904], flags=NETTXF_CSUM_BLANK, extras=[gso])
    (out,) = vif.tx.read_many(64)
    assert out == vnet.header(1, vnet.GSO_TCPV4, 54, 1448, 34, 16) + frame
    assert vnet.check_tx(out, vnet.OFFERED, 1500) == vnet.GSO
    vif.tx.kick_north()
    assert vif.tx_responses() == [
        (ids[0], RSP_OKAY),
        (0, RSP_NULL),
        (ids[1], RSP_OKAY),
        (ids[2], RSP_OKAY),
    ]


def test_a_runt_is_answered_error_and_not_delivered() -> None:
    vif = Vif()
    a, b = plain(b"a" * 46), plain(b"b" * 46)
    (ida,) = vif.send(a)
    (runt,) = vif.send(bytes(10))
    (idb,) = vif.send(b)
    assert vif.tx.read_many(64) == [vnet.header() + a, vnet.header() + b]
    assert vif.tx.refused == 1
    vif.tx.kick_north()
    assert vif.tx_responses() == [(ida, RSP_OKAY), (runt, RSP_ERROR), (idb, RSP_OKAY)]
    # the core form skips it the same way
    (runt,) = vif.send(bytes(10))
    assert vif.tx.pop() is None and vif.tx.refused == 2
    vif.tx.kick_north()
    assert vif.tx_responses()[-1] == (runt, RSP_ERROR)


def test_pop_and_push_give_the_same_frame_and_answer_on_push() -> None:
    vif = Vif()
    frame = plain(b"p" * 200)
    ids = vif.send(frame, sizes=[100, 114])
    buf = vif.tx.pop()
    assert buf is not None and not vif.tx.writable
    assert [seg[1:] for seg in buf.segments] == [(vnet.HDR_SIZE + len(frame), False)]
    assert vif.tx.gather(buf) == vnet.header() + frame
    assert vif.tx.kick_north() is False and vif.tx_responses() == []  # not answered yet
    with pytest.raises(Invalid):
        vif.tx.push(buf, 5)  # a tx buffer has no room
    vif.tx.push(buf)
    vif.tx.kick_north()
    assert vif.tx_responses() == [(i, RSP_OKAY) for i in ids]
    with pytest.raises(Invalid):
        vif.tx.push(buf)  # pushed already
    with pytest.raises(Invalid):
        vif.tx.push(Buffer(7, 0, ((0, 60, False),)))  # never popped


def test_pop_holds_at_most_its_staging_slots() -> None:
    vif = Vif()
    frames = [plain(bytes([i]) * 46) for i in range(20)]
    for frame in frames:
        vif.send(frame)
    bufs = vif.tx.pop_many(64)
    assert len(bufs) == 16 and vif.tx.pending() == 4
    assert vif.tx.pop() is None  # every staging slot is out
    assert [vif.tx.gather(b)[vnet.HDR_SIZE :] for b in bufs] == frames[:16]
    vif.tx.push(bufs[3])  # out of order
    buf = vif.tx.pop()
    assert buf is not None and vif.tx.gather(buf)[vnet.HDR_SIZE :] == frames[16]
    assert vif.tx.gather(bufs[4])[vnet.HDR_SIZE :] == frames[4]  # the others untouched


def test_read_span_joins_the_frames() -> None:
    vif = Vif()
    a, b = plain(b"a" * 46), tcp4()
    vif.send(a)
    vif.send(b)
    span, lengths = vif.tx.read_span(64)
    assert span == vnet.header() + a + vnet.header() + b
    assert lengths == [vnet.HDR_SIZE + len(a), vnet.HDR_SIZE + len(b)]


# --- tx faults ----------------------------------------------------------------------------


def test_a_copy_that_fails_is_a_fault() -> None:
    vif = Vif()
    vif.txf.put(netif.pack_tx_request(TxRequest(999, 0, 0, 1, 60)))  # never granted
    vif.txf.publish()
    with pytest.raises(Fault, match="bad grant reference"):
        vif.tx.read_many(64)
    vif = Vif()
    vif.send(plain())
    del vif.pages[1]  # the domU revoked it
    with pytest.raises(Fault, match="bad grant reference"):
        vif.tx.pop()


def test_req_prod_a_ring_ahead_is_a_fault() -> None:
    vif = Vif()
    struct.pack_into("<I", vif.txf.page, _REQ_PROD, 257)
    with pytest.raises(Fault, match="req_prod 257"):
        vif.tx.pending()
    with pytest.raises(Fault):
        vif.tx.read_many(64)


_GREF = st.sampled_from([1, 2, 3]) | st.integers(0, 0xFFFFFFFF)
_TX_SLOT = st.one_of(
    st.builds(
        TxRequest,
        _GREF,
        st.sampled_from([0, 96, 4000, 4095]) | st.integers(0, 0xFFFF),
        st.sampled_from([0, NETTXF_MORE_DATA, NETTXF_CSUM_BLANK, NETTXF_EXTRA_INFO])
        | st.integers(0, 0xFFFF),
        st.integers(0, 0xFFFF),
        st.sampled_from([0, 10, 14, 60, 1514, 4096, 4097, 0xFFFF]) | st.integers(0, 0xFFFF),
    ).map(netif.pack_tx_request),
    st.builds(
        ExtraInfo,
        st.integers(0, 5),
        st.integers(0, 1),
        st.sampled_from([ExtraInfo.gso(1448, 1).data]) | st.binary(min_size=6, max_size=6),
    )
    .map(netif.pack_extra)
    .map(lambda b: b.ljust(12, b"\0")),
    st.binary(min_size=12, max_size=12),
)


@st.composite
def _tx_packet(draw: st.DrawFn) -> list[bytes]:
    """A packet as netfront sends one, on the granted pages 1-3, so that
    random rings also carry packets that get through."""
    sizes = draw(st.lists(st.integers(0, PAGE_SIZE), min_size=1, max_size=4))
    offset = draw(st.integers(0, PAGE_SIZE - sizes[0]))
    flags = draw(st.sampled_from([0, 0, NETTXF_CSUM_BLANK]))
    extras = draw(st.lists(st.just(ExtraInfo.gso(1448, netif.GSO_TCPV4)), max_size=1))
    refs = [draw(st.sampled_from([1, 2, 3])) for _ in sizes]
    total = sum(sizes)
    slots = []
    for i, (ref, size) in enumerate(zip(refs, sizes, strict=True)):
        more = NETTXF_MORE_DATA if i + 1 < len(sizes) else 0
        if i == 0:
            first = flags | more | (NETTXF_EXTRA_INFO if extras else 0)
            slots.append(netif.pack_tx_request(TxRequest(ref, offset, first, i, total)))
            slots += [netif.pack_extra(e).ljust(12, b"\0") for e in extras]
        else:
            slots.append(netif.pack_tx_request(TxRequest(ref, 0, more, i, size)))
    return slots


@settings(max_examples=200, deadline=None)
@given(
    packets=st.lists(_tx_packet(), max_size=30),
    noise=st.lists(st.tuples(st.integers(0, 30), _TX_SLOT), max_size=20),
    start=st.sampled_from([0, 200, 0xFFFFFFF0]),
    extra_prod=st.sampled_from([0, 0, 1, 257, 0x80000000]),
    core=st.booleans(),
)
def test_random_tx_rings_raise_nothing_but_fault(
    packets: list[list[bytes]],
    noise: list[tuple[int, bytes]],
    start: int,
    extra_prod: int,
    core: bool,
) -> None:
    packets = list(packets)
    for at, slot in noise:  # random slots between the packets
        packets.insert(at, [slot])
    slots = [slot for packet in packets for slot in packet][:256]
    vif = Vif()
    for gref in (1, 2, 3):
        vif.pages[gref] = bytearray(bytes([gref]) * PAGE_SIZE)
    ring = vif.tx.ring
    ring.req_cons = ring.rsp_prod_pvt = start
    for i, raw in enumerate(slots):
        off = ring.entry(start + i)
        vif.txf.page[off : off + 12] = raw
    struct.pack_into("<I", vif.txf.page, 0, (start + len(slots) + extra_prod) & _M32)
    try:
        for _ in range(8):
            if not vif.tx.pending():
                break
            if core:
                bufs = vif.tx.pop_many(64)
                for buf in bufs:
                    assert len(vif.tx.gather(buf)) >= vnet.HDR_SIZE + vnet.ETH_HLEN
                    vif.tx.push(buf)
            else:
                for frame in vif.tx.read_many(64):
                    assert len(frame) >= vnet.HDR_SIZE + vnet.ETH_HLEN
            vif.tx.kick_north()
            # every slot taken is answered, and published
            assert ring.rsp_prod_pvt == ring.req_cons == vif.txf.u32(_RSP_PROD)
    except Fault:
        pass


# --- notifications -----------------------------------------------------------------------


def test_kick_north_follows_rsp_event() -> None:
    vif = Vif()
    vif.txf.ask()  # rsp_event = 1: netfront wants the first response
    vif.send(plain())
    vif.tx.read_many(64)
    assert vif.tx.kick_north() is True
    assert (vif.kick.kicks, vif.tx.stats.signals_sent) == (1, 1)
    # netfront is polling: rsp_event stays at 1, behind what comes next
    vif.send(plain())
    vif.tx.read_many(64)
    assert vif.tx.kick_north() is False
    assert vif.txf.u32(_RSP_PROD) == 2  # published all the same
    assert (vif.kick.kicks, vif.tx.stats.signals_suppressed) == (1, 1)
    # nothing new: no kick, nothing counted
    assert vif.tx.kick_north() is False
    assert (vif.tx.stats.signals_sent, vif.tx.stats.signals_suppressed) == (1, 1)
    vif.txf.ask()
    vif.send(plain())
    vif.tx.read_many(64)
    assert vif.tx.kick_north() is True and vif.kick.kicks == 2


def test_tx_enable_notify_arms_req_event() -> None:
    vif = Vif()
    assert vif.tx.enable_notify() is False
    assert vif.txf.u32(_REQ_EVENT) == 1
    vif.send(plain(), sizes=[30, 30])
    vif.tx.disable_notify()
    assert vif.tx.enable_notify() is True  # work is there already
    vif.tx.read_many(64)
    assert vif.tx.enable_notify() is False
    assert vif.txf.u32(_REQ_EVENT) == vif.tx.ring.req_cons + 1 == 3
    # netfront's next request passes req_event: it notifies
    vif.txf.put(netif.pack_tx_request(TxRequest(vif.grant(plain()), 0, 0, 9, 60)))
    assert vif.txf.publish() is True
    assert vif.tx.enable_notify() is True


# --- rx ----------------------------------------------------------------------------------


def test_rx_slots() -> None:
    assert rx_slots(SUPER, True) == 18
    assert rx_slots(SUPER, False) == 17
    assert rx_slots(PLAIN, False) == 1
    assert rx_slots(vnet.HDR_SIZE + PAGE_SIZE, False) == 1
    assert rx_slots(vnet.HDR_SIZE + PAGE_SIZE + 1, False) == 2


def test_rx_pending_counts_frames_of_the_largest_size() -> None:
    vif = Vif(SUPER, gso=True)
    assert vif.rx.writable and vif.rx.per_frame == 18
    assert vif.rx.pending() == 0
    vif.post(17)
    assert vif.rx.pending() == 0 and vif.rx.pop() is None
    vif.post(1)
    assert vif.rx.pending() == 1
    vif.post(18)
    assert vif.rx.pending() == 2
    buf = vif.rx.pop()
    assert buf is not None and buf.capacity == SUPER
    assert [seg[1:] for seg in buf.segments] == [(SUPER, True)]
    assert vif.rx.pending() == 1  # its 18 requests are held for it


def test_a_gso_frame_lands_in_the_posted_pages() -> None:
    vif = Vif(SUPER, gso=True)
    vif.post(18)
    venet = gso_frame(bytes(range(256)) * 40, 1448)  # 10294 bytes of Ethernet: three pages
    ethernet = venet[vnet.HDR_SIZE :]
    vif.deliver(venet)
    assert vif.received() == []  # staged, not published
    vif.rxf.ask()
    assert vif.rx.kick_north() is True and vif.kick.kicks == 1
    (got,) = vif.received()
    assert got.frame == ethernet
    assert got.flags == NETRXF_CSUM_BLANK | NETRXF_DATA_VALIDATED | NETRXF_MORE_DATA | (
        NETRXF_EXTRA_INFO
    )
    assert got.gso == ExtraInfo.gso(1448, netif.GSO_TCPV4)
    assert got.ids == [0, 2, 3]  # the extra took request 1's slot
    assert [vif.rxf.response(i, "<HHHh")[3] for i in (0, 2, 3)] == [4096, 4096, 10294 - 8192]
    assert vif.rxf.response(1, "<BBHBBH") == (EXTRA_GSO, 0, 1448, netif.GSO_TCPV4, 0, 0)
    # four requests used, fourteen left: not room for another largest frame
    assert vif.rx.pending() == 0
    vif.post(4)
    assert vif.rx.pending() == 1
    assert (vif.rx.stats.messages, vif.rx.stats.bytes) == (1, len(ethernet))


def test_small_frames_take_one_page_each() -> None:
    vif = Vif()
    vif.post(2)
    a = vnet.header(vnet.HDR_DATA_VALID) + tcp4()
    b = vnet.header(vnet.HDR_NEEDS_CSUM, csum_start=34, csum_offset=16) + tcp4(b"q" * 300)
    assert vif.rx.write_many([a, b, a]) == 2  # two posted: the third waits
    assert vif.rx.stats.stalls == 1
    vif.rx.kick_north()
    got = vif.received()
    assert [(r.flags, r.gso, r.frame) for r in got] == [
        (NETRXF_DATA_VALIDATED, None, a[vnet.HDR_SIZE :]),
        (NETRXF_CSUM_BLANK | NETRXF_DATA_VALIDATED, None, b[vnet.HDR_SIZE :]),
    ]


def test_push_of_nothing_gives_the_requests_back() -> None:
    vif = Vif(SUPER, gso=True)
    vif.post(18)
    buf = vif.rx.pop()
    assert buf is not None and vif.rx.pending() == 0
    vif.rx.push(buf, 0)
    assert vif.rx.pending() == 1
    assert vif.rx.ring.req_cons == vif.rx.ring.rsp_prod_pvt == 0
    assert vif.rx.kick_north() is False and vif.received() == []


def test_a_frame_netif_cannot_carry_is_dropped() -> None:
    vif = Vif()
    vif.post(1)
    vif.deliver(vnet.header(vnet.HDR_NEEDS_CSUM, 3, 54, 1448) + tcp4())  # an unknown GSO type
    vif.deliver(bytes(20))  # shorter than its headers
    assert vif.rx.refused == 2 and vif.rx.pending() == 1
    assert vif.rx.kick_north() is False and vif.received() == []
    assert vif.rx.stats.messages == 0


def test_an_rx_copy_that_fails_is_a_fault() -> None:
    vif = Vif()
    vif.post(1, gref=999)  # a page it never granted
    with pytest.raises(Fault, match="bad grant reference"):
        vif.deliver(vnet.header() + plain())


def test_rx_push_refuses_what_the_contract_forbids() -> None:
    vif = Vif()
    vif.post(3)
    buf = vif.rx.pop()
    assert buf is not None
    with pytest.raises(Invalid):
        vif.rx.push(buf, PLAIN + 1)
    with pytest.raises(Invalid):
        vif.rx.push(Buffer(buf.index + 1, 0, buf.segments))  # never popped
    vif.rx.push(buf, 0)
    with pytest.raises(Invalid):
        vif.rx.push(buf, 0)  # pushed already
    other = vif.rx.pop()
    assert other is not None
    with pytest.raises(Invalid):
        vif.rx.push_many([(other, 0), (other, 0)])  # the same buffer twice in one batch
    assert vif.rx.pending() == 2  # and nothing was given back twice
    vif.rx.push(other, 0)
    assert len(vif.rx.pop_many(64)) == 3


def test_rx_enable_notify_arms_req_event() -> None:
    vif = Vif(SUPER, gso=True)
    vif.rx.disable_notify()
    assert vif.rx.enable_notify() is False
    assert vif.rxf.u32(_REQ_EVENT) == vif.rx.ring.req_cons + 1 == 1
    assert vif.post(18) is True  # netfront notifies
    assert vif.rx.enable_notify() is True


def test_rx_enable_notify_with_too_few_requests_asks_for_the_next_one() -> None:
    # Seventeen posted, a largest frame needs eighteen: the frontend's next
    # request must notify, or a frame waiting for room waits for a tx kick.
    vif = Vif(SUPER, gso=True)
    vif.post(17)
    assert vif.rx.enable_notify() is False
    assert vif.rxf.u32(_REQ_EVENT) == 18
    assert vif.post(1) is True
    assert vif.rx.enable_notify() is True


class RacingRing(RxBackRing):
    """An rx ring whose frontend posts while the backend arms req_event:
    ``race`` runs between the backend's count and its store."""

    def __init__(self, page: memoryview) -> None:
        super().__init__(page)
        self.reads = 0
        self.race: Callable[[], object] = lambda: None

    def _u32(self, off: int) -> int:
        value = super()._u32(off)
        if off == _REQ_PROD:
            self.reads += 1
            if self.reads == 2:
                self.race()
        return value


def test_rx_enable_notify_arms_again_when_req_prod_moves_under_it() -> None:
    vif = Vif(SUPER, gso=True)
    ring = RacingRing(memoryview(vif.rxf.page))
    vif.rx = NetifRx(ring, cast(GrantCopier, vif.rx_copier), cast(PortKick, vif.kick), SUPER, True)
    vif.post(16)
    notified: list[bool] = []
    ring.race = lambda: notified.append(vif.post(1))
    assert vif.rx.enable_notify() is False
    assert notified == [False]  # it posted before req_event was stored
    assert vif.rxf.u32(_REQ_EVENT) == 18  # armed at the request after it
    assert vif.post(1) is True


_RX_FRAME = st.one_of(
    st.builds(
        lambda hdr, body: hdr + body,
        st.sampled_from(
            [
                vnet.header(),
                vnet.header(vnet.HDR_DATA_VALID),
                vnet.header(vnet.HDR_NEEDS_CSUM, vnet.GSO_TCPV4, 54, 1448, 34, 16),
                vnet.header(vnet.HDR_NEEDS_CSUM, vnet.GSO_TCPV6, 74, 1428, 54, 16),
            ]
        )
        | st.binary(min_size=12, max_size=12),
        st.binary(max_size=64).map(tcp4) | st.integers(0, 3 * PAGE_SIZE).map(bytes),
    ),
    st.binary(max_size=40),
)


@settings(max_examples=150, deadline=None)
@given(
    grefs=st.lists(st.sampled_from([1, 2, 3]) | _GREF, max_size=60),
    start=st.sampled_from([0, 250, 0xFFFFFFF8]),
    extra_prod=st.sampled_from([0, 0, 1, 257, 0x80000000]),
    frames=st.lists(st.tuples(_RX_FRAME, st.booleans()), max_size=8),
    gso=st.booleans(),
)
def test_random_rx_rings_raise_nothing_but_fault(
    grefs: list[int],
    start: int,
    extra_prod: int,
    frames: list[tuple[bytes, bool]],
    gso: bool,
) -> None:
    capacity = vnet.HDR_SIZE + 3 * PAGE_SIZE
    vif = Vif(capacity, gso)
    for gref in (1, 2, 3):
        vif.pages[gref] = bytearray(PAGE_SIZE)
    ring = vif.rx.ring
    ring.req_cons = ring.rsp_prod_pvt = start
    for i, gref in enumerate(grefs):
        off = ring.entry(start + i)
        vif.rxf.page[off : off + 8] = netif.pack_rx_request(i, gref)
    struct.pack_into("<I", vif.rxf.page, 0, (start + len(grefs) + extra_prod) & _M32)
    try:
        for frame, now in frames:
            buf = vif.rx.pop()
            if buf is None:
                break
            frame = frame[:capacity]
            vif.rx.memory.write(buf.segments[0][0], frame)
            vif.rx.push(buf, len(frame) if now else 0)
            vif.rx.kick_north()
            # each request taken is answered, and none past those posted
            assert ring.rsp_prod_pvt == ring.req_cons
            assert (ring.req_cons - start) & _M32 <= len(grefs)
        vif.rx.enable_notify()
    except Fault:
        pass


# --- the event channel and close ---------------------------------------------------------


class FakeChannels:
    def __init__(self, fired: list[int]) -> None:
        self.fired = fired
        self.notified: list[int] = []
        self.unmasked: list[int] = []

    def fileno(self) -> int:
        return 42

    def notify(self, port: int) -> None:
        self.notified.append(port)

    def pending(self) -> list[int]:
        fired, self.fired = self.fired, []
        return fired

    def unmask(self, port: int) -> None:
        self.unmasked.append(port)


def test_port_kick_notifies_and_unmasks_what_fired() -> None:
    chans = FakeChannels([7, 7])
    kick = PortKick(cast(EventChannels, chans), 7)
    assert kick.fd == 42
    kick.kick()
    assert chans.notified == [7] and kick.kicks == 1
    assert kick.drain() == 2 and chans.unmasked == [7]  # once, however often it fired
    assert kick.drain() == 0
    kick.close()
    assert kick.fd == -1


def test_every_call_after_close_is_invalid() -> None:
    vif = Vif()
    vif.send(plain())
    vif.post(1)
    rx_buf = vif.rx.pop()
    assert rx_buf is not None
    tx_buf = vif.tx.pop()
    assert tx_buf is not None
    vif.tx.close()
    vif.rx.close()
    calls = [
        vif.tx.pending,
        vif.tx.pop,
        lambda: vif.tx.push(tx_buf),
        lambda: vif.tx.read_many(64),
        lambda: vif.tx.read_span(64),
        vif.tx.kick_north,
        vif.tx.disable_notify,
        vif.tx.enable_notify,
        vif.rx.pending,
        vif.rx.pop,
        lambda: vif.rx.push(rx_buf, 0),
        lambda: vif.rx.push_many([]),
        lambda: vif.rx.write_many([plain()]),
        vif.rx.kick_north,
        vif.rx.disable_notify,
        vif.rx.enable_notify,
    ]
    for call in calls:
        with pytest.raises(Invalid):
            call()


def test_the_queues_refuse_copiers_too_small() -> None:
    pages: dict[int, bytearray] = {}
    ring = memoryview(bytearray(PAGE_SIZE))
    kick = cast(PortKick, FakeKick())
    with pytest.raises(Invalid):
        NetifTx(TxBackRing(ring), cast(GrantCopier, FakeCopier(pages, TX_BATCH_BYTES)), kick)
    with pytest.raises(Invalid):
        NetifRx(RxBackRing(ring), cast(GrantCopier, FakeCopier(pages, 1000)), kick, PLAIN, False)
