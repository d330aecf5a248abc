"""The frames on a venet queue, without IO (docs/design.md 3.8).

A frame is ``struct virtio_net_hdr_v1`` (12 bytes, little-endian, virtio 1.x)
followed by one Ethernet frame, on every connector alike: a tap opened with
IFF_VNET_HDR passes the header through untouched, and virtio-net uses it as
it is::

    offset size field
    0      u8   flags        NEEDS_CSUM 1, DATA_VALID 2 (rx only), RSC_INFO 4 (never)
    1      u8   gso_type     NONE 0, TCPV4 1, TCPV6 4 (UDP 3, UDP_L4 5 and the ECN bit 0x80 are not offered)
    2      u16  hdr_len      at most the frame length
    4      u16  gso_size     payload bytes per segment of a super-frame
    6      u16  csum_start   from the start of the Ethernet frame
    8      u16  csum_offset  from csum_start
    10     u16  num_buffers  rx: always 1 (no MRG_RXBUF); tx: unused, ignored

Feature bits are virtio-net's own numbers (``linux/virtio_net.h``).  What a
north sends is checked by ``check_tx`` against what it negotiated; a frame
that fails is dropped and counted under its cause, never raised.  A port
that did not negotiate what a frame carries gets it adapted
(``adapt_for``): its checksum completed, or the super-frame cut into
segments in software (``segment``).
"""

from __future__ import annotations

import struct
from typing import Final

__all__ = [
    "BAD_HEADER",
    "CAUSES",
    "ETH_HLEN",
    "F_CSUM",
    "F_GUEST_CSUM",
    "F_GUEST_TSO4",
    "F_GUEST_TSO6",
    "F_HOST_TSO4",
    "F_HOST_TSO6",
    "F_MAC",
    "F_MTU",
    "F_STATUS",
    "F_VERSION_1",
    "GSO",
    "GSO_NONE",
    "GSO_TCPV4",
    "GSO_TCPV6",
    "HDR_DATA_VALID",
    "HDR_NEEDS_CSUM",
    "HDR_SIZE",
    "MAX_GSO_FRAME",
    "NUM_BUFFERS_1",
    "OFFERED",
    "OK",
    "OVERSIZE",
    "RUNT",
    "RX_CAPS",
    "VLAN_HLEN",
    "adapt_for",
    "bit",
    "check_tx",
    "complete_csum",
    "feature_names",
    "header",
    "max_plain_frame",
    "negotiate",
    "ones_sum",
    "rx_buffer_size",
    "segment",
]


def bit(n: int) -> int:
    return 1 << n


# virtio-net feature bits (virtio 1.x, section 5.1.3; linux/virtio_net.h)
F_CSUM: Final = bit(0)  # the device takes frames with a partial checksum (north -> south)
F_GUEST_CSUM: Final = bit(1)  # the north takes frames with a partial checksum (south -> north)
F_MTU: Final = bit(3)  # the device reports its mtu (CALL_CONFIG)
F_MAC: Final = bit(5)  # the device has a MAC address (CALL_MAC)
F_GUEST_TSO4: Final = bit(7)  # the north takes TCPv4 super-frames
F_GUEST_TSO6: Final = bit(8)  # the north takes TCPv6 super-frames
F_HOST_TSO4: Final = bit(11)  # the device takes TCPv4 super-frames
F_HOST_TSO6: Final = bit(12)  # the device takes TCPv6 super-frames
F_STATUS: Final = bit(16)  # the device reports its link state (CALL_CONFIG)
F_VERSION_1: Final = bit(32)  # virtio 1.x: the 12-byte virtio_net_hdr_v1

OFFERED: Final = (
    F_CSUM
    | F_GUEST_CSUM
    | F_MTU
    | F_MAC
    | F_GUEST_TSO4
    | F_GUEST_TSO6
    | F_HOST_TSO4
    | F_HOST_TSO6
    | F_STATUS
    | F_VERSION_1
)
RX_CAPS: Final = F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6  # what a port can receive as is

_NAMES: Final = {
    F_CSUM: "CSUM",
    F_GUEST_CSUM: "GUEST_CSUM",
    F_MTU: "MTU",
    F_MAC: "MAC",
    F_GUEST_TSO4: "GUEST_TSO4",
    F_GUEST_TSO6: "GUEST_TSO6",
    F_HOST_TSO4: "HOST_TSO4",
    F_HOST_TSO6: "HOST_TSO6",
    F_STATUS: "STATUS",
    F_VERSION_1: "VERSION_1",
}
# Spec 5.1.3.1: an offload needs the checksum offload it stands on.
_NEEDS: Final = {
    F_GUEST_TSO4: F_GUEST_CSUM,
    F_GUEST_TSO6: F_GUEST_CSUM,
    F_HOST_TSO4: F_CSUM,
    F_HOST_TSO6: F_CSUM,
}

HDR_SIZE: Final = 12
ETH_HLEN: Final = 14
VLAN_HLEN: Final = 4
# The largest super-frame: GSO_MAX_SIZE (64 KiB) of IP packet after the Ethernet header.
MAX_GSO_FRAME: Final = ETH_HLEN + 65536

HDR_NEEDS_CSUM: Final = 1
HDR_DATA_VALID: Final = 2
GSO_NONE: Final = 0
GSO_TCPV4: Final = 1
GSO_TCPV6: Final = 4

# check_tx verdicts: OK and GSO pass; the others are drop causes.
OK: Final = 0
GSO: Final = 1  # passes, and is a super-frame
RUNT: Final = 2
OVERSIZE: Final = 3
BAD_HEADER: Final = 4
CAUSES: Final = {RUNT: "runt", OVERSIZE: "oversize", BAD_HEADER: "bad_header"}

_HDR = struct.Struct("<BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
_U16BE = struct.Struct(">H")
_U32BE = struct.Struct(">I")
_ETHERTYPE_IPV4: Final = b"\x08\x00"
_ETHERTYPE_IPV6: Final = b"\x86\xdd"
_ETHERTYPE_VLAN: Final = b"\x81\x00"
_TCP: Final = 6
_TCP_CSUM_OFFSET: Final = 16
_TCP_FIN: Final = 0x01
_TCP_PSH: Final = 0x08
_TCP_CWR: Final = 0x80
_NUM_BUFFERS_1: Final = b"\x01\x00"


def feature_names(features: int) -> str:
    """``CSUM|HOST_TSO4|...`` for logs and errors; unknown bits as numbers."""
    names = [name for flag, name in _NAMES.items() if features & flag]
    rest = features & ~sum(_NAMES)
    names += [f"bit{n}" for n in range(64) if rest >> n & 1]
    return "|".join(names) or "none"


def negotiate(requested: int, offered: int = OFFERED) -> int:
    """The features a north asked for, checked: each offered, each offload
    with the checksum offload it needs, VERSION_1 present (the 12-byte header
    is the only one there is).  Raises ``ValueError`` saying what is wrong."""
    if not 0 <= requested < 1 << 64:
        raise ValueError("features are a 64-bit mask")
    extra = requested & ~offered
    if extra:
        raise ValueError(f"features not offered: {feature_names(extra)}")
    if not requested & F_VERSION_1:
        raise ValueError("VERSION_1 (bit 32) is required: frames carry struct virtio_net_hdr_v1")
    for feature, needed in _NEEDS.items():
        if requested & feature and not requested & needed:
            raise ValueError(f"{_NAMES[feature]} needs {_NAMES[needed]}")
    return requested


def max_plain_frame(mtu: int) -> int:
    """Ethernet bytes of the longest frame that is not a super-frame: the
    header, one 802.1Q tag, and mtu bytes of payload."""
    return ETH_HLEN + VLAN_HLEN + mtu


def rx_buffer_size(features: int, mtu: int) -> int:
    """The rx buffer a north must post so that every frame fits one buffer
    (there is no MRG_RXBUF): header + the longest frame it may receive."""
    longest = max_plain_frame(mtu)
    if features & (F_GUEST_TSO4 | F_GUEST_TSO6):
        longest = max(longest, MAX_GSO_FRAME)
    return HDR_SIZE + longest


def header(
    flags: int = 0,
    gso_type: int = GSO_NONE,
    hdr_len: int = 0,
    gso_size: int = 0,
    csum_start: int = 0,
    csum_offset: int = 0,
    num_buffers: int = 0,
) -> bytes:
    """One ``virtio_net_hdr_v1``."""
    return _HDR.pack(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset) + (
        num_buffers.to_bytes(2, "little")
    )


def check_tx(frame: bytes, features: int, mtu: int) -> int:
    """The verdict on one frame from a north: ``OK``, ``GSO`` (a valid
    super-frame), or the drop cause (``RUNT``, ``OVERSIZE``, ``BAD_HEADER``).

    Every field is checked against the frame length and the negotiated
    features; ``num_buffers`` is unused on transmit and ignored, as are
    ``gso_size`` and ``csum_*`` where the flags give them no meaning."""
    length = len(frame) - HDR_SIZE
    if length < ETH_HLEN:
        return RUNT
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = _HDR.unpack_from(frame)
    if gso_type == GSO_NONE:
        limit = max_plain_frame(mtu)
        if length > limit or (length > limit - VLAN_HLEN and frame[24:26] != _ETHERTYPE_VLAN):
            return OVERSIZE
    elif length > MAX_GSO_FRAME:
        return OVERSIZE
    if hdr_len > length:
        return BAD_HEADER
    if flags:
        # DATA_VALID and RSC_INFO are the device's to set (spec 5.1.6.2).
        if flags != HDR_NEEDS_CSUM or not features & F_CSUM:
            return BAD_HEADER
        if csum_start < ETH_HLEN or csum_start + csum_offset + 2 > length:
            return BAD_HEADER
    if gso_type == GSO_NONE:
        return OK
    if gso_type == GSO_TCPV4:
        if not features & F_HOST_TSO4:
            return BAD_HEADER
    elif gso_type != GSO_TCPV6 or not features & F_HOST_TSO6:
        return BAD_HEADER  # UDP, UDP_L4, the ECN bit and unknown types are never offered
    if not flags or gso_size == 0:
        return BAD_HEADER
    layout = _tcp_layout(frame, gso_type)
    if layout is None:
        return BAD_HEADER
    l4, tcp_len = layout
    if csum_start != l4 or csum_offset != _TCP_CSUM_OFFSET:
        return BAD_HEADER
    if l4 + tcp_len >= length:
        return BAD_HEADER  # no payload to segment
    if l4 - ETH_HLEN + tcp_len + gso_size > mtu:
        return BAD_HEADER  # its segments would not fit the mtu
    return GSO


def _tcp_layout(frame: bytes, gso_type: int) -> tuple[int, int] | None:
    """(offset of the TCP header from the Ethernet header, TCP header
    length) of an untagged IPv4/IPv6 TCP frame whose IP length is the frame's
    and which is not a fragment; None otherwise."""
    length = len(frame) - HDR_SIZE
    ethertype = frame[24:26]
    ip = HDR_SIZE + ETH_HLEN
    if gso_type == GSO_TCPV4:
        if ethertype != _ETHERTYPE_IPV4 or length < ETH_HLEN + 20:
            return None
        version_ihl = frame[ip]
        ihl = (version_ihl & 15) * 4
        if version_ihl >> 4 != 4 or ihl < 20 or frame[ip + 9] != _TCP:
            return None
        if ETH_HLEN + _U16BE.unpack_from(frame, ip + 2)[0] != length:
            return None
        if _U16BE.unpack_from(frame, ip + 6)[0] & 0x3FFF:  # MF or a fragment offset
            return None
        l4 = ETH_HLEN + ihl
    else:
        if ethertype != _ETHERTYPE_IPV6 or length < ETH_HLEN + 40:
            return None
        if frame[ip] >> 4 != 6 or frame[ip + 6] != _TCP:  # no extension headers
            return None
        if ETH_HLEN + 40 + _U16BE.unpack_from(frame, ip + 4)[0] != length:
            return None
        l4 = ETH_HLEN + 40
    if l4 + 20 > length:
        return None
    tcp_len = (frame[HDR_SIZE + l4 + 12] >> 4) * 4
    if tcp_len < 20 or l4 + tcp_len > length:
        return None
    return l4, tcp_len


def ones_sum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """RFC 1071 16-bit ones' complement sum (not complemented), folded into
    ``initial``.  As one big integer the data is congruent to the sum of its
    16-bit words modulo 0xFFFF (2**16 = 1 there), which Python computes in C."""
    if len(data) & 1:
        data = bytes(data) + b"\x00"
    value = int.from_bytes(data, "big") + initial
    if value == 0:
        return 0
    return value % 0xFFFF or 0xFFFF


def _csum_bytes(total: int) -> bytes:
    # A computed 0 is sent as 0xFFFF (its equal in ones' complement), as
    # Linux's skb_checksum_help does: for UDP a 0 would mean "no checksum".
    return ((~total & 0xFFFF) or 0xFFFF).to_bytes(2, "big")


def complete_csum(frame: bytes) -> bytes:
    """A NEEDS_CSUM frame with its checksum filled in and the flags cleared:
    the field already holds the pseudo-header sum, as the offload contract says."""
    _flags, _gso, _hdr_len, _gso_size, csum_start, csum_offset = _HDR.unpack_from(frame)
    start = HDR_SIZE + csum_start
    field = start + csum_offset
    out = bytearray(frame)
    out[0] = 0
    out[field : field + 2] = _csum_bytes(ones_sum(memoryview(frame)[start:]))
    return bytes(out)


def segment(frame: bytes, flags: int = 0) -> list[bytes]:
    """Cut a valid TCP super-frame (``check_tx`` said ``GSO``) into segments
    of ``gso_size`` payload bytes with full IP and TCP checksums, as the
    kernel's GSO would: IPv4 ids count up, sequence numbers advance, FIN and
    PSH only on the last segment, CWR only on the first.  ``flags`` goes
    into each segment's header (``HDR_DATA_VALID`` for a port that takes it)."""
    _f, gso_type, _hdr_len, mss, _start, _offset = _HDR.unpack_from(frame)
    layout = _tcp_layout(frame, gso_type)
    assert layout is not None and mss > 0, "segment() needs a frame check_tx passed"
    l4, tcp_len = layout
    eth = frame[HDR_SIZE : HDR_SIZE + ETH_HLEN]
    ip_header = frame[HDR_SIZE + ETH_HLEN : HDR_SIZE + l4]
    tcp_header = frame[HDR_SIZE + l4 : HDR_SIZE + l4 + tcp_len]
    payload = memoryview(frame)[HDR_SIZE + l4 + tcp_len :]
    vhdr = header(flags)
    seq = _U32BE.unpack_from(tcp_header, 4)[0]
    tcp_flags = tcp_header[13]
    v4 = gso_type == GSO_TCPV4
    if v4:
        ip_id = _U16BE.unpack_from(ip_header, 4)[0]
        addresses = ip_header[12:20]
    else:
        addresses = ip_header[8:40]
    # The pseudo-header's addresses and protocol, summed once.
    base = ones_sum(addresses + (b"\x00\x06" if v4 else b"\x00\x00\x00\x06"))
    total = len(payload)
    out: list[bytes] = []
    for i, offset in enumerate(range(0, total, mss)):
        chunk = payload[offset : offset + mss]
        l4_len = tcp_len + len(chunk)
        ip = bytearray(ip_header)
        if v4:
            ip[2:4] = _U16BE.pack(len(ip_header) + l4_len)
            ip[4:6] = _U16BE.pack((ip_id + i) & 0xFFFF)
            ip[10:12] = b"\x00\x00"
            ip[10:12] = _csum_bytes(ones_sum(ip))
        else:
            ip[4:6] = _U16BE.pack(l4_len)
        tcp = bytearray(tcp_header)
        tcp[4:8] = _U32BE.pack((seq + offset) & 0xFFFFFFFF)
        segment_flags = tcp_flags
        if offset + mss < total:
            segment_flags &= ~(_TCP_FIN | _TCP_PSH)
        if i:
            segment_flags &= ~_TCP_CWR
        tcp[13] = segment_flags
        tcp[16:18] = b"\x00\x00"
        pseudo = base + l4_len  # the length word of the pseudo-header
        tcp[16:18] = _csum_bytes(ones_sum(chunk, ones_sum(tcp, pseudo)))
        out.append(b"".join((vhdr, eth, ip, tcp, chunk)))
    return out


def adapt_for(frame: bytes, caps: int) -> list[bytes]:
    """``frame`` as a port with receive capabilities ``caps`` (``RX_CAPS``
    bits) may take it: a super-frame it cannot take is segmented, a partial
    checksum it cannot take is completed; else the frame itself."""
    gso_type = frame[1]
    if gso_type != GSO_NONE:
        wanted = F_GUEST_TSO4 if gso_type == GSO_TCPV4 else F_GUEST_TSO6
        if caps & wanted:
            return [frame]
        return segment(frame, HDR_DATA_VALID if caps & F_GUEST_CSUM else 0)
    if frame[0] & HDR_NEEDS_CSUM and not caps & F_GUEST_CSUM:
        return [complete_csum(frame)]
    return [frame]


NUM_BUFFERS_1: Final = _NUM_BUFFERS_1  # what an rx frame's num_buffers says (no MRG_RXBUF)
