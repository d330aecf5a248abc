"""Frames for venet tests: Ethernet, IPv4/IPv6 and TCP built by hand, and
checksum verification written independently of ``vbus.net.vnet``."""

from __future__ import annotations

import struct

from vbus.net.vnet import GSO_TCPV4, GSO_TCPV6, HDR_NEEDS_CSUM, header

MAC_A = bytes.fromhex("020000000001")
MAC_B = bytes.fromhex("020000000002")
MAC_C = bytes.fromhex("020000000003")
BROADCAST = b"\xff" * 6


def word_sum(data: bytes) -> int:
    """Ones' complement sum, word by word (the slow, obvious way)."""
    if len(data) % 2:
        data += b"\x00"
    total = 0
    for (word,) in struct.iter_unpack(">H", data):
        total += word
        total = (total & 0xFFFF) + (total >> 16)
    return total


def eth(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> bytes:
    return dst + src + struct.pack(">H", ethertype) + payload


def frame(dst: bytes, src: bytes, payload: bytes = b"x" * 46, ethertype: int = 0x88B5) -> bytes:
    """A plain venet frame (zero header) of an experimental ethertype."""
    return header() + eth(dst, src, ethertype, payload)


def tcp_segment(
    payload: bytes, *, seq: int = 1000, flags: int = 0x18, options: bytes = b""
) -> bytes:
    """A TCP header (checksum 0) followed by ``payload``."""
    doff = (20 + len(options)) // 4
    return (
        struct.pack(">HHIIBBHHH", 40000, 5201, seq, 7, doff << 4, flags, 65535, 0, 0)
        + options
        + payload
    )


def ipv4_tcp(payload: bytes, *, ident: int = 100, **tcp: int) -> bytes:
    segment = tcp_segment(payload, **tcp)  # type: ignore[arg-type]
    ip = bytearray(
        struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(segment), ident, 0x4000, 64, 6, 0,
                    bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))
    )  # fmt: skip
    ip[10:12] = struct.pack(">H", ~word_sum(bytes(ip)) & 0xFFFF)
    return bytes(ip) + segment


def ipv6_tcp(payload: bytes, **tcp: int) -> bytes:
    segment = tcp_segment(payload, **tcp)  # type: ignore[arg-type]
    src = bytes.fromhex("fd000000000000000000000000000001")
    dst = bytes.fromhex("fd000000000000000000000000000002")
    return struct.pack(">IHBB16s16s", 0x60000000, len(segment), 6, 64, src, dst) + segment


def partial_pseudo(ip: bytes, v6: bool) -> int:
    """The pseudo-header sum a sender leaves in the TCP checksum field (NEEDS_CSUM)."""
    if v6:
        length = len(ip) - 40
        return word_sum(ip[8:40] + struct.pack(">IxxxB", length, 6))
    length = len(ip) - 20
    return word_sum(ip[12:20] + struct.pack(">BBH", 0, 6, length))


def gso_frame(payload: bytes, mss: int, *, v6: bool = False, flags: int = 0x19) -> bytes:
    """A TCP super-frame as a Linux tap with TSO hands it over: NEEDS_CSUM,
    the pseudo-header sum in the checksum field, gso_size = mss."""
    ip = bytearray(ipv6_tcp(payload, flags=flags) if v6 else ipv4_tcp(payload, flags=flags))
    l3 = 40 if v6 else 20
    ip[l3 + 16 : l3 + 18] = struct.pack(">H", partial_pseudo(bytes(ip), v6))
    vhdr = header(
        HDR_NEEDS_CSUM,
        GSO_TCPV6 if v6 else GSO_TCPV4,
        14 + l3 + 20,
        mss,
        14 + l3,
        16,
    )
    return vhdr + eth(MAC_B, MAC_A, 0x86DD if v6 else 0x0800, bytes(ip))


def tcp_checksum_ok(eth_frame: bytes) -> bool:
    """True when the IPv4/IPv6 TCP frame's checksums verify."""
    ethertype = eth_frame[12:14]
    ip = eth_frame[14:]
    if ethertype == b"\x08\x00":
        ihl = (ip[0] & 15) * 4
        if word_sum(ip[:ihl]) != 0xFFFF:
            return False
        tcp = ip[ihl:]
        pseudo = ip[12:20] + struct.pack(">BBH", 0, 6, len(tcp))
    else:
        tcp = ip[40:]
        pseudo = ip[8:40] + struct.pack(">IxxxB", len(tcp), 6)
    return word_sum(pseudo + tcp) == 0xFFFF
