"""The venet frame format without IO: header checks, negotiation, checksums, segmentation."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.netframes import (
    MAC_A,
    MAC_B,
    eth,
    frame,
    gso_frame,
    ipv4_tcp,
    partial_pseudo,
    tcp_checksum_ok,
    word_sum,
)
from vbus.net import vnet
from vbus.net.vnet import (
    BAD_HEADER,
    F_CSUM,
    F_GUEST_CSUM,
    F_GUEST_TSO4,
    F_GUEST_TSO6,
    F_HOST_TSO4,
    F_HOST_TSO6,
    F_VERSION_1,
    GSO,
    HDR_DATA_VALID,
    HDR_NEEDS_CSUM,
    OK,
    OVERSIZE,
    RUNT,
    check_tx,
    header,
)

ALL = vnet.OFFERED
PLAIN = F_VERSION_1


def test_feature_bits_are_virtio_nets() -> None:
    # virtio 1.x 5.1.3 (linux/virtio_net.h): the numbers a virtio-net driver uses.
    assert [F_CSUM, F_GUEST_CSUM, F_GUEST_TSO4, F_GUEST_TSO6, F_HOST_TSO4, F_HOST_TSO6] == [
        1 << 0,
        1 << 1,
        1 << 7,
        1 << 8,
        1 << 11,
        1 << 12,
    ]
    assert F_VERSION_1 == 1 << 32
    assert vnet.OFFERED & (1 << 15) == 0  # no MRG_RXBUF: one frame, one buffer


def test_negotiate_checks_offers_and_dependencies() -> None:
    assert vnet.negotiate(ALL) == ALL
    assert vnet.negotiate(PLAIN) == PLAIN
    with pytest.raises(ValueError, match="VERSION_1"):
        vnet.negotiate(F_CSUM)
    with pytest.raises(ValueError, match="not offered: bit15"):
        vnet.negotiate(PLAIN | 1 << 15)
    with pytest.raises(ValueError, match="HOST_TSO4 needs CSUM"):
        vnet.negotiate(PLAIN | F_HOST_TSO4)
    with pytest.raises(ValueError, match="GUEST_TSO6 needs GUEST_CSUM"):
        vnet.negotiate(PLAIN | F_GUEST_TSO6)
    with pytest.raises(ValueError, match="64-bit"):
        vnet.negotiate(1 << 64)


def test_rx_buffer_size_holds_the_longest_frame() -> None:
    assert vnet.rx_buffer_size(PLAIN, 1500) == 12 + 14 + 4 + 1500
    assert vnet.rx_buffer_size(PLAIN | F_GUEST_CSUM | F_GUEST_TSO4, 1500) == 12 + 14 + 65536
    assert vnet.rx_buffer_size(PLAIN, 9000) == 12 + 18 + 9000


def test_plain_frames_pass_and_sizes_are_bounded() -> None:
    assert check_tx(frame(MAC_B, MAC_A), PLAIN, 1500) == OK
    assert check_tx(header() + b"\x00" * 13, PLAIN, 1500) == RUNT
    assert check_tx(b"\x00" * 11, PLAIN, 1500) == RUNT
    assert check_tx(frame(MAC_B, MAC_A, b"x" * 1500), PLAIN, 1500) == OK
    assert check_tx(frame(MAC_B, MAC_A, b"x" * 1501), PLAIN, 1500) == OVERSIZE
    # One 802.1Q tag may come on top of the mtu.
    tagged = frame(MAC_B, MAC_A, b"\x00\x05\x88\xb5" + b"x" * 1500, ethertype=0x8100)
    assert check_tx(tagged, PLAIN, 1500) == OK
    assert check_tx(frame(MAC_B, MAC_A, b"x" * 8999), PLAIN, 9000) == OK


def test_header_fields_that_lie_are_bad() -> None:
    body = eth(MAC_B, MAC_A, 0x0800, ipv4_tcp(b"y" * 100))
    n = len(body)
    assert check_tx(header(hdr_len=n) + body, PLAIN, 1500) == OK
    assert check_tx(header(hdr_len=n + 1) + body, PLAIN, 1500) == BAD_HEADER
    csum = header(HDR_NEEDS_CSUM, csum_start=34, csum_offset=16)
    assert check_tx(csum + body, PLAIN | F_CSUM, 1500) == OK
    assert check_tx(csum + body, PLAIN, 1500) == BAD_HEADER  # CSUM not negotiated
    for start, offset in ((n - 1, 0), (34, n), (4, 16)):
        bad = header(HDR_NEEDS_CSUM, csum_start=start, csum_offset=offset) + body
        assert check_tx(bad, PLAIN | F_CSUM, 1500) == BAD_HEADER, (start, offset)
    for flags in (HDR_DATA_VALID, 4, 8, HDR_NEEDS_CSUM | HDR_DATA_VALID):
        bad = header(flags, csum_start=34, csum_offset=16) + body
        assert check_tx(bad, ALL, 1500) == BAD_HEADER, flags
    # Fields without meaning for the frame are ignored: gso_size, num_buffers.
    assert check_tx(header(gso_size=9, num_buffers=7) + body, PLAIN, 1500) == OK


def test_super_frames_need_what_they_claim() -> None:
    big = gso_frame(b"z" * 30000, 1448)
    assert check_tx(big, ALL, 1500) == GSO
    assert check_tx(big, PLAIN | F_CSUM, 1500) == BAD_HEADER  # no HOST_TSO4
    assert check_tx(big, PLAIN | F_CSUM | F_HOST_TSO6, 1500) == BAD_HEADER
    assert check_tx(gso_frame(b"z" * 30000, 1440, v6=True), ALL, 1500) == GSO
    assert check_tx(gso_frame(b"z" * 30000, 1440, v6=True), PLAIN | F_CSUM | F_HOST_TSO4, 1500) == (
        BAD_HEADER
    )
    assert check_tx(gso_frame(b"z" * 65400, 1448), ALL, 1500) == GSO  # 64 KiB
    assert check_tx(gso_frame(b"z" * 65480, 1428, v6=True), ALL, 1500) == OVERSIZE

    def patched(at: int, fmt: str, value: int, base: bytes = big) -> bytes:
        out = bytearray(base)
        struct.pack_into(fmt, out, at, value)
        return bytes(out)

    # gso_size that lies: zero, or segments past the mtu
    assert check_tx(patched(4, "<H", 0), ALL, 1500) == BAD_HEADER
    assert check_tx(patched(4, "<H", 1461), ALL, 1500) == BAD_HEADER
    assert check_tx(patched(4, "<H", 1460), ALL, 1500) == GSO
    assert check_tx(big, ALL, 1400) == BAD_HEADER
    # gso types never offered: UDP, UDP_L4, the ECN bit, unknown
    for gso_type in (3, 5, 0x81, 2, 0x40):
        assert check_tx(patched(1, "<B", gso_type), ALL, 1500) == BAD_HEADER, gso_type
    # without NEEDS_CSUM, csum_start not at TCP, csum_offset not TCP's
    assert check_tx(patched(0, "<B", 0), ALL, 1500) == BAD_HEADER
    assert check_tx(patched(6, "<H", 30), ALL, 1500) == BAD_HEADER
    assert check_tx(patched(8, "<H", 6), ALL, 1500) == BAD_HEADER
    # an IP header that lies about the length, a fragment, not TCP, not IPv4
    assert check_tx(patched(12 + 16, ">H", 1000), ALL, 1500) == BAD_HEADER
    assert check_tx(patched(12 + 20, ">H", 0x2000), ALL, 1500) == BAD_HEADER
    assert check_tx(patched(12 + 23, ">B", 17), ALL, 1500) == BAD_HEADER
    assert check_tx(patched(12 + 12, ">H", 0x86DD), ALL, 1500) == BAD_HEADER
    assert check_tx(patched(12 + 14, ">B", 0x44), ALL, 1500) == BAD_HEADER  # ihl 4
    # a TCP header longer than the frame, or no payload to cut
    short = gso_frame(b"z" * 10, 1448)
    assert check_tx(short, ALL, 1500) == GSO
    assert check_tx(patched(12 + 34 + 12, ">B", 0xF0, short), ALL, 1500) == BAD_HEADER
    no_payload = gso_frame(b"", 1448)
    assert check_tx(no_payload, ALL, 1500) == BAD_HEADER


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=200), st.integers(0, (1 << 64) - 1))
def test_check_tx_never_raises(data: bytes, features: int) -> None:
    assert check_tx(data, features, 1500) in (OK, GSO, RUNT, OVERSIZE, BAD_HEADER)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 0xFFFF), st.integers(0, 0xFF), st.integers(0, 0xFFFF), st.binary(max_size=64))
def test_check_tx_never_raises_on_super_frame_mutations(
    at: int, value: int, mss: int, tail: bytes
) -> None:
    base = bytearray(gso_frame(b"q" * 3000, 1448))
    base[at % len(base)] = value
    struct.pack_into("<H", base, 4, mss)
    assert check_tx(bytes(base) + tail, ALL, 1500) in (OK, GSO, RUNT, OVERSIZE, BAD_HEADER)


@given(st.binary(max_size=3000))
def test_ones_sum_matches_the_word_by_word_sum(data: bytes) -> None:
    assert vnet.ones_sum(data) == word_sum(data)


def test_complete_csum_fills_what_a_partial_checksum_left() -> None:
    ip = bytearray(ipv4_tcp(os.urandom(1001)))
    ip[36:38] = struct.pack(">H", partial_pseudo(bytes(ip), False))
    partial = header(HDR_NEEDS_CSUM, csum_start=34, csum_offset=16) + eth(
        MAC_B, MAC_A, 0x0800, bytes(ip)
    )
    assert not tcp_checksum_ok(partial[12:])
    done = vnet.complete_csum(partial)
    assert done[0] == 0 and len(done) == len(partial)
    assert tcp_checksum_ok(done[12:])


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("size", [1, 1447, 1448, 1449, 30000, 65400])
def test_segment_cuts_a_super_frame_like_gso(v6: bool, size: int) -> None:
    payload = os.urandom(size)
    mss = 1448 if not v6 else 1428
    big = gso_frame(payload, mss, v6=v6, flags=0x19 | 0x80)  # FIN PSH ACK CWR
    assert check_tx(big, ALL, 1500) == GSO
    segments = vnet.segment(big, HDR_DATA_VALID)
    l3 = 40 if v6 else 20
    assert len(segments) == -(-size // mss)
    got = b""
    for i, seg in enumerate(segments):
        assert seg[:12] == header(HDR_DATA_VALID)
        body = seg[12:]
        assert body[:14] == big[12:26]
        assert tcp_checksum_ok(body), i
        tcp = body[14 + l3 :]
        seq = struct.unpack_from(">I", tcp, 4)[0]
        assert seq == 1000 + i * mss
        flags = tcp[13]
        last = i == len(segments) - 1
        assert bool(flags & 0x01) == last and bool(flags & 0x08) == last  # FIN, PSH
        assert bool(flags & 0x80) == (i == 0)  # CWR
        assert flags & 0x10  # ACK on all
        if not v6:
            assert struct.unpack_from(">H", body, 18)[0] == (100 + i) & 0xFFFF  # IPv4 id
            assert struct.unpack_from(">H", body, 16)[0] == len(body) - 14
        else:
            assert struct.unpack_from(">H", body, 18)[0] == len(body) - 54
        assert len(body) - 14 <= 1500
        # each segment is a valid plain frame for a port without GSO
        assert check_tx(header() + body, PLAIN, 1500) == OK
        got += tcp[20:]
    assert got == payload


def test_adapt_for_gives_each_port_what_it_negotiated() -> None:
    big = gso_frame(b"a" * 5000, 1448)
    assert vnet.adapt_for(big, F_GUEST_CSUM | F_GUEST_TSO4) == [big]
    cut = vnet.adapt_for(big, F_GUEST_CSUM | F_GUEST_TSO6)
    assert len(cut) == 4 and all(s[0] == HDR_DATA_VALID for s in cut)
    cut = vnet.adapt_for(big, 0)
    assert len(cut) == 4 and all(s[0] == 0 and tcp_checksum_ok(s[12:]) for s in cut)
    ip = bytearray(ipv4_tcp(b"b" * 99))
    ip[36:38] = struct.pack(">H", partial_pseudo(bytes(ip), False))
    partial = header(HDR_NEEDS_CSUM, csum_start=34, csum_offset=16) + eth(
        MAC_B, MAC_A, 0x800, bytes(ip)
    )
    assert vnet.adapt_for(partial, F_GUEST_CSUM) == [partial]
    (done,) = vnet.adapt_for(partial, 0)
    assert done[0] == 0 and tcp_checksum_ok(done[12:])
    plain = frame(MAC_B, MAC_A)
    assert vnet.adapt_for(plain, 0) == [plain]


def test_feature_names() -> None:
    assert vnet.feature_names(F_CSUM | F_HOST_TSO4 | 1 << 40) == "CSUM|HOST_TSO4|bit40"
    assert vnet.feature_names(0) == "none"


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=6),
    st.integers(1, 3000),
    st.integers(1, 1460),
    st.booleans(),
)
def test_whatever_check_tx_passes_segments_cleanly(
    edits: list[tuple[int, int]], size: int, mss: int, v6: bool
) -> None:
    """A header that passes the checks never makes segmentation or checksum
    completion fail, and the segments carry exactly the payload."""
    raw = bytearray(gso_frame(bytes(range(256)) * (size // 256 + 1), mss, v6=v6))
    for at, value in edits:
        raw[at % len(raw)] = value
    data = bytes(raw)
    verdict = check_tx(data, ALL, 1500)
    if verdict == GSO:
        segments = vnet.segment(data)
        assert all(check_tx(s, PLAIN, 1500) == OK for s in segments)
        assert all(tcp_checksum_ok(s[12:]) for s in segments)
    elif verdict == OK and data[0] & HDR_NEEDS_CSUM:
        assert len(vnet.complete_csum(data)) == len(data)
