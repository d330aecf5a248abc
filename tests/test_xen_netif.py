"""The netif rings as a vif backend sees them: netif.h's layouts, the frontend
breaches netback treats as fatal, the notification hold-off, and the
translation between netfront packets and venet's virtio_net_hdr_v1 frames."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.netframes import MAC_A, MAC_B, eth, gso_frame, ipv4_tcp, ipv6_tcp
from vbus.errors import Fault
from vbus.net import vnet
from vbus.soak.fuzz import TARGETS
from vbus.xen import netif
from vbus.xen.netif import (
    EXTRA_FLAG_MORE,
    EXTRA_GSO,
    EXTRA_MCAST_ADD,
    NETRXF_CSUM_BLANK,
    NETRXF_DATA_VALIDATED,
    NETRXF_EXTRA_INFO,
    NETRXF_MORE_DATA,
    NETTXF_CSUM_BLANK,
    NETTXF_EXTRA_INFO,
    NETTXF_MORE_DATA,
    PAGE_SIZE,
    RSP_NULL,
    RSP_OKAY,
    ExtraInfo,
    RxBackRing,
    TxBackRing,
    TxPacket,
    TxRequest,
)


def tcp4(payload: bytes = b"x" * 20) -> bytes:
    return eth(MAC_B, MAC_A, 0x0800, ipv4_tcp(payload))


def tcp6(payload: bytes = b"x" * 20) -> bytes:
    return eth(MAC_B, MAC_A, 0x86DD, ipv6_tcp(payload))


def udp4(payload: bytes) -> bytes:
    udp = struct.pack(">HHHH", 53, 53, 8 + len(payload), 0) + payload
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0x4000, 64, 17, 0,
                     bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))  # fmt: skip
    return eth(MAC_B, MAC_A, 0x0800, ip + udp)


class Front:
    """The frontend's side of one ring page: slots written, req_prod published."""

    def __init__(self, slot: int) -> None:
        self.page = bytearray(PAGE_SIZE)
        self.slot = slot
        self.prod = 0

    def put(self, raw: bytes) -> None:
        off = netif.RING_HEADER + (self.prod % 256) * self.slot
        self.page[off : off + len(raw)] = raw
        self.prod += 1

    def publish(self) -> None:
        struct.pack_into("<I", self.page, 0, self.prod & 0xFFFFFFFF)

    def u32(self, off: int) -> int:
        return int(struct.unpack_from("<I", self.page, off)[0])

    def response(self, idx: int, fmt: str) -> tuple[int, ...]:
        return struct.unpack_from(fmt, self.page, netif.RING_HEADER + (idx % 256) * self.slot)


def tx(front: Front, *reqs: TxRequest | ExtraInfo) -> None:
    for r in reqs:
        front.put(netif.pack_tx_request(r) if isinstance(r, TxRequest) else netif.pack_extra(r))
    front.publish()


def test_layout_matches_netif_h() -> None:
    # __CONST_RING_SIZE of a 4 KiB page: (4096 - 64) / 12 = 336 -> 256; 4032 / 8 = 504 -> 256
    assert (netif.TX_RING_SIZE, netif.RX_RING_SIZE) == (256, 256)
    assert netif.ring_size(PAGE_SIZE, 12) == 256 and netif.ring_size(1024, 12) == 64
    assert netif.pack_tx_request(TxRequest(0x11223344, 5, 6, 7, 8)) == bytes.fromhex(
        "443322110500060007000800"
    )
    assert netif.pack_extra(ExtraInfo.gso(1448, netif.GSO_TCPV4)) == bytes.fromhex(
        "0100a80501000000"
    )
    assert netif.pack_rx_request(3, 0xAABBCCDD) == bytes.fromhex("03000000ddccbbaa")


def test_a_single_slot_packet_round_trip_and_notify() -> None:
    front = Front(netif.TX_SLOT)
    ring = TxBackRing(memoryview(front.page))
    assert ring.next_packet() is None
    tx(front, TxRequest(9, 100, 0, 42, 60))
    packet = ring.next_packet()
    assert packet is not None and packet.fragments == [(9, 100, 60)]
    assert ring.next_packet() is None
    ring.respond(packet, RSP_OKAY)
    # rsp_event 0: the frontend asked for nothing past 0 ... it sets 1 to hear of the first
    struct.pack_into("<I", front.page, 12, 1)
    assert ring.push() is True
    assert front.u32(8) == 1 and front.response(0, "<Hh") == (42, RSP_OKAY)
    # a second push with rsp_event still at 1: no notification
    tx(front, TxRequest(9, 0, 0, 43, 60))
    packet = ring.next_packet()
    assert packet is not None
    ring.respond(packet, RSP_OKAY)
    assert ring.push() is False
    assert front.u32(8) == 2


def test_final_check_arms_req_event() -> None:
    front = Front(netif.TX_SLOT)
    ring = TxBackRing(memoryview(front.page))
    assert ring.final_check() is False
    assert front.u32(4) == 1  # notify me at the next request
    tx(front, TxRequest(1, 0, 0, 1, 60))
    assert ring.final_check() is True


def test_a_multi_slot_packet_with_extras() -> None:
    front = Front(netif.TX_SLOT)
    ring = TxBackRing(memoryview(front.page))
    flags = NETTXF_MORE_DATA | NETTXF_EXTRA_INFO | NETTXF_CSUM_BLANK
    tx(
        front,
        TxRequest(1, 0, flags, 10, 5000),
        ExtraInfo(EXTRA_MCAST_ADD, EXTRA_FLAG_MORE, bytes(6)),
        ExtraInfo.gso(1448, netif.GSO_TCPV4),
        TxRequest(2, 0, NETTXF_MORE_DATA, 11, 3000),
        TxRequest(3, 0, 0, 12, 1000),
    )
    packet = ring.next_packet()
    assert packet is not None
    assert packet.fragments == [(1, 0, 1000), (2, 0, 3000), (3, 0, 1000)]
    assert packet.slots == 5 and packet.gso is not None and packet.gso.gso_size == 1448
    ring.respond(packet, RSP_OKAY)
    ring.push()
    got = [front.response(i, "<Hh") for i in range(5)]
    assert got == [(10, 0), (0, RSP_NULL), (0, RSP_NULL), (11, 0), (12, 0)]


def _fault(front: Front, match: str) -> None:
    ring = TxBackRing(memoryview(front.page))
    with pytest.raises(Fault, match=match):
        ring.next_packet()


def test_req_prod_a_ring_ahead_is_a_fault() -> None:
    front = Front(netif.TX_SLOT)
    struct.pack_into("<I", front.page, 0, 257)
    _fault(front, "req_prod 257")
    struct.pack_into("<I", front.page, 0, 256)  # a full ring is fine
    assert TxBackRing(memoryview(front.page)).unconsumed() == 256


def test_a_slot_crossing_its_page_is_a_fault() -> None:
    front = Front(netif.TX_SLOT)
    tx(front, TxRequest(1, 4000, 0, 1, 97))
    _fault(front, "first slot crosses")
    front = Front(netif.TX_SLOT)
    tx(front, TxRequest(1, 0, NETTXF_MORE_DATA, 1, 200), TxRequest(2, 4000, 0, 2, 100))
    _fault(front, "crosses its page")
    # the first request's size is the packet's: it may exceed a page
    front = Front(netif.TX_SLOT)
    tx(front, TxRequest(1, 96, NETTXF_MORE_DATA, 1, 5000), TxRequest(2, 0, 0, 2, 1000))
    assert TxBackRing(memoryview(front.page)).next_packet() is not None


def test_a_first_size_smaller_than_the_rest_is_a_fault() -> None:
    front = Front(netif.TX_SLOT)
    tx(
        front,
        TxRequest(1, 0, NETTXF_MORE_DATA, 1, 1500),
        TxRequest(2, 0, NETTXF_MORE_DATA, 2, 1000),
        TxRequest(3, 0, 0, 3, 1000),
    )
    _fault(front, "1000 bytes when 500 remain")


def test_too_many_slots_is_a_fault() -> None:
    # netback counts the slots after the first: 18 of them is the most it takes whole
    front = Front(netif.TX_SLOT)
    reqs = [TxRequest(i, 0, NETTXF_MORE_DATA, i, 20 if i == 0 else 1) for i in range(20)]
    tx(front, *reqs[:-1], TxRequest(19, 0, 0, 19, 1))
    _fault(front, "more than 18 slots after its first")
    front = Front(netif.TX_SLOT)
    tx(front, *reqs[:18], TxRequest(18, 0, 0, 18, 1))
    packet = TxBackRing(memoryview(front.page)).next_packet()
    assert packet is not None and len(packet.requests) == 19


@pytest.mark.parametrize(
    "extra, match",
    [
        (ExtraInfo(0, 0), "unknown extra info type 0"),
        (ExtraInfo(5, 0), "unknown extra info type 5"),
        (ExtraInfo.gso(0, netif.GSO_TCPV4), "GSO extra with size 0"),
        (ExtraInfo.gso(1448, 3), "unknown GSO type 3"),
    ],
)
def test_bad_extras_are_faults(extra: ExtraInfo, match: str) -> None:
    front = Front(netif.TX_SLOT)
    tx(front, TxRequest(1, 0, NETTXF_EXTRA_INFO, 1, 60), extra)
    _fault(front, match)


def test_a_packet_cut_short_by_req_prod_is_a_fault() -> None:
    front = Front(netif.TX_SLOT)
    tx(front, TxRequest(1, 0, NETTXF_MORE_DATA, 1, 120))
    _fault(front, "continues past req_prod")
    front = Front(netif.TX_SLOT)
    tx(front, TxRequest(1, 0, NETTXF_EXTRA_INFO, 1, 120))
    _fault(front, "extra info is missing")


def _packet(flags: int, size: int, *extras: ExtraInfo) -> TxPacket:
    return TxPacket((TxRequest(1, 0, flags, 1, size),), extras)


def test_tx_translation() -> None:
    frame = tcp4(payload=b"x" * 100)
    plain = netif.tx_to_venet(_packet(0, len(frame)), frame)
    assert plain == vnet.header() + frame
    blank = netif.tx_to_venet(_packet(NETTXF_CSUM_BLANK, len(frame)), frame)
    assert blank is not None
    assert blank[:12] == vnet.header(vnet.HDR_NEEDS_CSUM, csum_start=34, csum_offset=16)
    assert vnet.check_tx(blank, vnet.OFFERED, 1500) == vnet.OK
    udp = udp4(payload=b"y" * 30)
    out = netif.tx_to_venet(_packet(NETTXF_CSUM_BLANK, len(udp)), udp)
    assert out is not None and out[:12] == vnet.header(1, csum_start=34, csum_offset=6)
    # a super-frame: GSO extra -> gso_type/gso_size/hdr_len, and NEEDS_CSUM
    big = tcp4(payload=b"z" * 4000)
    gso = ExtraInfo.gso(1448, netif.GSO_TCPV4)
    sup = netif.tx_to_venet(_packet(NETTXF_CSUM_BLANK | NETTXF_EXTRA_INFO, len(big), gso), big)
    assert sup is not None
    assert sup[:12] == vnet.header(1, vnet.GSO_TCPV4, 54, 1448, 34, 16)
    assert vnet.check_tx(sup, vnet.OFFERED, 1500) == vnet.GSO
    big6 = tcp6(payload=b"z" * 4000)
    gso6 = ExtraInfo.gso(1428, netif.GSO_TCPV6)
    sup6 = netif.tx_to_venet(_packet(NETTXF_EXTRA_INFO, len(big6), gso6), big6)
    assert sup6 is not None and vnet.check_tx(sup6, vnet.OFFERED, 1500) == vnet.GSO
    # what venet cannot take: a runt, a size that disagrees, a GSO type that does not match
    assert netif.tx_to_venet(_packet(0, 10), bytes(10)) is None
    assert netif.tx_to_venet(_packet(0, len(frame) + 1), frame) is None
    assert netif.tx_to_venet(_packet(NETTXF_EXTRA_INFO, len(big6), gso), big6) is None
    assert netif.tx_to_venet(_packet(NETTXF_CSUM_BLANK, 60), bytes(60)) is None


def test_rx_translation_and_placement() -> None:
    frame = tcp4(payload=b"q" * 6000)
    hdr = vnet.header(1, vnet.GSO_TCPV4, 54, 1448, 34, 16, num_buffers=1)
    meta = netif.venet_to_rx(hdr + frame)
    assert meta is not None and meta.frame == frame
    assert meta.flags == NETRXF_CSUM_BLANK | NETRXF_DATA_VALIDATED
    assert meta.gso == ExtraInfo.gso(1448, netif.GSO_TCPV4)
    front = Front(netif.RX_SLOT)
    ring = RxBackRing(memoryview(front.page))
    for i in range(2):
        front.put(netif.pack_rx_request(100 + i, 500 + i))
    front.publish()
    assert RxBackRing.slots_for(meta) == 3  # two pages of frame, one extra
    assert ring.place(meta) is None  # a slot short: nothing consumed
    assert ring.req_cons == 0
    front.put(netif.pack_rx_request(102, 502))
    front.publish()
    copies = ring.place(meta)
    assert copies == [netif.RxCopy(500, 0, 4096), netif.RxCopy(502, 4096, len(frame) - 4096)]
    struct.pack_into("<I", front.page, 12, 1)
    assert ring.push() is True
    first = NETRXF_CSUM_BLANK | NETRXF_DATA_VALIDATED | NETRXF_MORE_DATA | NETRXF_EXTRA_INFO
    assert front.response(0, "<HHHh") == (100, 0, first, 4096)
    assert front.response(1, "<BBHBBH") == (EXTRA_GSO, 0, 1448, netif.GSO_TCPV4, 0, 0)
    assert front.response(2, "<HHHh") == (102, 0, 0, len(frame) - 4096)
    # DATA_VALID alone, and what netif cannot carry
    small = netif.venet_to_rx(vnet.header(vnet.HDR_DATA_VALID) + tcp4())
    assert small is not None and small.flags == NETRXF_DATA_VALIDATED and small.gso is None
    assert netif.venet_to_rx(vnet.header(0, vnet.GSO_TCPV4, 54, 1448) + frame) is None
    assert netif.venet_to_rx(vnet.header(1, 3, 54, 1448) + frame) is None
    assert netif.venet_to_rx(bytes(20)) is None


@given(
    payload=st.binary(min_size=1, max_size=6000),
    mss=st.integers(536, 1460),
    v6=st.booleans(),
    super_frame=st.booleans(),
)
def test_venet_to_netif_and_back_keeps_the_header(
    payload: bytes, mss: int, v6: bool, super_frame: bool
) -> None:
    # A frame as venet delivers it to the vif, then as netfront would send it
    # back with the flags and extra it was given: the same virtio_net_hdr_v1.
    original = gso_frame(payload, mss, v6=v6)
    if not super_frame:
        original = original[:1] + bytes(5) + original[6:]  # NEEDS_CSUM only
    meta = netif.venet_to_rx(original)
    assert meta is not None
    assert meta.flags & NETRXF_CSUM_BLANK
    flags = NETTXF_CSUM_BLANK | (NETTXF_EXTRA_INFO if meta.gso else 0)
    extras = (meta.gso,) if meta.gso is not None else ()
    assert (meta.gso is not None) == super_frame
    back = netif.tx_to_venet(_packet(flags, len(meta.frame), *extras), meta.frame)
    assert back == original


@given(
    frame_len=st.integers(14, 3 * PAGE_SIZE),
    gso=st.booleans(),
    posted=st.integers(0, 256),
)
def test_rx_placement_covers_the_frame(frame_len: int, gso: bool, posted: int) -> None:
    front = Front(netif.RX_SLOT)
    for i in range(posted):
        front.put(netif.pack_rx_request(i, 1000 + i))
    front.publish()
    ring = RxBackRing(memoryview(front.page))
    meta = netif.RxMeta(0, ExtraInfo.gso(1448, 1) if gso else None, bytes(frame_len))
    copies = ring.place(meta)
    if posted < RxBackRing.slots_for(meta):
        assert copies is None and ring.req_cons == 0
        return
    assert copies is not None
    assert sum(c.length for c in copies) == frame_len
    assert [c.start for c in copies] == [i * PAGE_SIZE for i in range(len(copies))]
    assert ring.req_cons == ring.rsp_prod_pvt == RxBackRing.slots_for(meta)


_SLOT = st.one_of(
    st.builds(
        TxRequest,
        st.integers(0, 0xFFFFFFFF),
        st.sampled_from([0, 1, 96, 4000, 4095]) | st.integers(0, 0xFFFF),
        st.integers(0, 15) | st.integers(0, 0xFFFF),
        st.integers(0, 0xFFFF),
        st.sampled_from([0, 14, 60, 1514, 4096, 4097, 0xFFFF]) | st.integers(0, 0xFFFF),
    ).map(netif.pack_tx_request),
    st.builds(ExtraInfo, st.integers(0, 6), st.integers(0, 3), st.binary(min_size=6, max_size=6))
    .map(netif.pack_extra)
    .map(lambda b: b.ljust(12, b"\0")),
    st.binary(min_size=12, max_size=12),
)


@settings(max_examples=300, deadline=None)
@given(
    slots=st.lists(_SLOT, max_size=60),
    start=st.sampled_from([0, 200, 0xFFFFFFF0]),
    extra_prod=st.sampled_from([0, 0, 1, 257, 0x80000000]),
)
def test_random_rings_raise_nothing_but_fault(
    slots: list[bytes], start: int, extra_prod: int
) -> None:
    page = bytearray(PAGE_SIZE)
    ring = TxBackRing(memoryview(page))
    ring.req_cons = ring.rsp_prod_pvt = start
    for i, raw in enumerate(slots):
        off = ring.entry(start + i)
        page[off : off + 12] = raw
    struct.pack_into("<I", page, 0, (start + len(slots) + extra_prod) & 0xFFFFFFFF)
    taken = 0
    try:
        while (packet := ring.next_packet()) is not None:
            taken += packet.slots
            assert 1 <= len(packet.requests) <= 1 + netif.LEGACY_SLOTS_MAX
            assert all(n >= 0 and o + n <= PAGE_SIZE for _, o, n in packet.fragments)
            assert sum(n for _, _, n in packet.fragments) == packet.size
            ring.respond(packet, RSP_OKAY)
            ring.push()
            netif.tx_to_venet(packet, bytes(packet.size))
    except Fault:
        pass
    assert taken <= len(slots) + (extra_prod if extra_prod <= 1 else 0)
    assert len(page) == PAGE_SIZE


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2000))
def test_the_netif_fuzz_target(data: bytes) -> None:
    TARGETS["netif"](data)


def test_the_netif_fuzz_target_reaches_packets_and_rx(monkeypatch: pytest.MonkeyPatch) -> None:
    # The target's own framing gets past the parser: start 250 (the ring wraps),
    # three single-slot packets taken and answered; the rx part places a frame.
    taken: list[TxPacket] = []
    placed: list[object] = []
    next_packet, place = TxBackRing.next_packet, RxBackRing.place

    def spy_next(ring: TxBackRing) -> TxPacket | None:
        packet = next_packet(ring)
        if packet is not None:
            taken.append(packet)
        return packet

    def spy_place(ring: RxBackRing, meta: netif.RxMeta) -> list[netif.RxCopy] | None:
        copies = place(ring, meta)
        placed.append(copies)
        return copies

    monkeypatch.setattr(TxBackRing, "next_packet", spy_next)
    monkeypatch.setattr(RxBackRing, "place", spy_place)
    frame = vnet.header(vnet.HDR_NEEDS_CSUM, csum_start=34, csum_offset=16) + tcp4()
    TARGETS["netif"](bytes([1, 3]) + bytes([0, 3, 0]) * 3 + bytes([5, 0, 0, 0, 1, 3]) + frame)
    assert [p.requests[0].id for p in taken] == [0, 1, 2]
    assert [p.size for p in taken] == [60] * 3
    assert placed == [[netif.RxCopy(100, 0, len(frame) - 12)]]
