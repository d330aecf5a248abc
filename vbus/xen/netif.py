"""Xen's netif rings as a vif backend sees them, sans-IO (docs/design.md 4.8).

The layouts are those of Xen's public ``io/ring.h`` and ``io/netif.h``
(single queue).  A ring page, little-endian::

    0x00 u32 req_prod    frontend: requests published (free-running)
    0x04 u32 req_event   backend: notify me when req_prod passes this
    0x08 u32 rsp_prod    backend: responses published
    0x0c u32 rsp_event   frontend: notify me when rsp_prod passes this
    0x10 u8[4] pvt, u8[44] pad
    0x40 ring[n]         n = the largest power of two that fits (256 for both)

    netif_tx_request  (12-byte tx slot)  u32 gref, u16 offset, u16 flags, u16 id, u16 size
    netif_extra_info  (in a tx/rx slot)  u8 type, u8 flags, GSO: u16 size, u8 type, u8 pad, u16 features
    netif_tx_response                    u16 id, i16 status
    netif_rx_request  (8-byte rx slot)   u16 id, u16 pad, u32 gref
    netif_rx_response                    u16 id, u16 offset, u16 flags, i16 status

A transmitted packet is its first request (``size`` is the whole packet),
the extra infos it announces with NETTXF_extra_info (each may announce
another with XEN_NETIF_EXTRA_FLAG_MORE), then one request per further
fragment while NETTXF_more_data is set; the first fragment's own length is
what the later ones leave of the total.  The frontend publishes whole
packets, so a packet cut short by ``req_prod`` is the frontend's fault, as
in Linux's netback; so are the other breaches ``TxBackRing.next_packet``
checks, each a ``Fault`` with its reason.  Two of them netback only drops
the packet for (more than 18 slots after the first, below its fatal 20; a
fragment larger than what the earlier ones leave of the total, which buggy
frontends of 64 KiB frames produce); Linux's netfront does neither, so
here both are faults too: the rings of a frontend that lies about sizes are
not worth reading on.  A frame it can take but the
switch cannot (too short, a checksum offload on a header it cannot read)
is not a fault: ``tx_to_venet`` returns None and the packet is answered
NETIF_RSP_ERROR.

On receive a response sits in the slot of the request it consumed (Linux's
netfront ignores the response id) and an extra info takes a slot, and so a
request, of its own.  ``RxBackRing.place`` stages a frame's responses and
says which bytes to copy into which granted page; ``push`` publishes them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from vbus.errors import Fault
from vbus.net import vnet

__all__ = [
    "EXTRA_FLAG_MORE",
    "EXTRA_GSO",
    "EXTRA_HASH",
    "EXTRA_MCAST_ADD",
    "EXTRA_MCAST_DEL",
    "GSO_TCPV4",
    "GSO_TCPV6",
    "LEGACY_SLOTS_MAX",
    "MAX_TX_SIZE",
    "NETRXF_CSUM_BLANK",
    "NETRXF_DATA_VALIDATED",
    "NETRXF_EXTRA_INFO",
    "NETRXF_MORE_DATA",
    "NETTXF_CSUM_BLANK",
    "NETTXF_DATA_VALIDATED",
    "NETTXF_EXTRA_INFO",
    "NETTXF_MORE_DATA",
    "PAGE_SIZE",
    "RING_HEADER",
    "RSP_DROPPED",
    "RSP_ERROR",
    "RSP_NULL",
    "RSP_OKAY",
    "RX_RING_SIZE",
    "RX_SLOT",
    "TX_RING_SIZE",
    "TX_SLOT",
    "BackRing",
    "ExtraInfo",
    "RxBackRing",
    "RxCopy",
    "RxMeta",
    "TxBackRing",
    "TxPacket",
    "TxRequest",
    "pack_extra",
    "pack_rx_request",
    "pack_tx_request",
    "ring_size",
    "tx_to_venet",
    "venet_to_rx",
]

PAGE_SIZE: Final = 4096
RING_HEADER: Final = 64  # req_prod, req_event, rsp_prod, rsp_event, pvt[4], pad[44]
TX_SLOT: Final = 12  # union { netif_tx_request (12); netif_tx_response (4) }
RX_SLOT: Final = 8  # union { netif_rx_request (8); netif_rx_response (8) }


def ring_size(page: int, slot: int) -> int:
    """``__CONST_RING_SIZE``: the entries that fit, rounded down to a power of two."""
    n = (page - RING_HEADER) // slot
    return 1 << (n.bit_length() - 1) if n > 0 else 0


TX_RING_SIZE: Final = ring_size(PAGE_SIZE, TX_SLOT)  # 256
RX_RING_SIZE: Final = ring_size(PAGE_SIZE, RX_SLOT)  # 256

NETTXF_CSUM_BLANK: Final = 1 << 0
NETTXF_DATA_VALIDATED: Final = 1 << 1
NETTXF_MORE_DATA: Final = 1 << 2
NETTXF_EXTRA_INFO: Final = 1 << 3

NETRXF_DATA_VALIDATED: Final = 1 << 0
NETRXF_CSUM_BLANK: Final = 1 << 1
NETRXF_MORE_DATA: Final = 1 << 2
NETRXF_EXTRA_INFO: Final = 1 << 3

EXTRA_GSO: Final = 1
EXTRA_MCAST_ADD: Final = 2
EXTRA_MCAST_DEL: Final = 3
EXTRA_HASH: Final = 4
_EXTRA_TYPE_MAX: Final = 5  # 0 (NONE) is never valid either
EXTRA_FLAG_MORE: Final = 1 << 0

GSO_TCPV4: Final = 1
GSO_TCPV6: Final = 2

RSP_DROPPED: Final = -2
RSP_ERROR: Final = -1
RSP_OKAY: Final = 0
RSP_NULL: Final = 1  # the response in an extra info's slot

MAX_TX_SIZE: Final = 0xFFFF
# XEN_NETBK_LEGACY_SLOTS_MAX (XEN_NETIF_NR_SLOTS_MIN, what every backend must
# take): the data slots after the first, as netback counts them; netfront sends
# at most 18 data slots in all.
LEGACY_SLOTS_MAX: Final = 18

_IDX: Final = struct.Struct("<I")
_TX_REQ: Final = struct.Struct("<IHHHH")
_TX_RSP: Final = struct.Struct("<Hh")
_RX_REQ: Final = struct.Struct("<HHI")
_RX_RSP: Final = struct.Struct("<HHHh")
_EXTRA: Final = struct.Struct("<BBHBBH")
_REQ_PROD, _REQ_EVENT, _RSP_PROD, _RSP_EVENT = 0, 4, 8, 12
_M32: Final = 0xFFFFFFFF
_ARM_TRIES: Final = 4


@dataclass(frozen=True, slots=True)
class TxRequest:
    gref: int
    offset: int
    flags: int
    id: int
    size: int


@dataclass(frozen=True, slots=True)
class ExtraInfo:
    """One netif_extra_info; ``data`` is its six type-specific bytes (for
    GSO: u16 size, u8 type, u8 pad, u16 features)."""

    type: int
    flags: int
    data: bytes = bytes(6)

    @property
    def gso_size(self) -> int:
        return int.from_bytes(self.data[0:2], "little")

    @property
    def gso_type(self) -> int:
        return self.data[2]

    @staticmethod
    def gso(size: int, gso_type: int, features: int = 0, flags: int = 0) -> ExtraInfo:
        return ExtraInfo(EXTRA_GSO, flags, struct.pack("<HBBH", size, gso_type, 0, features))


@dataclass(frozen=True, slots=True)
class TxPacket:
    """One transmitted packet: its data requests, first to last, and its extras."""

    requests: tuple[TxRequest, ...]
    extras: tuple[ExtraInfo, ...]

    @property
    def size(self) -> int:
        return self.requests[0].size

    @property
    def slots(self) -> int:
        return len(self.requests) + len(self.extras)

    @property
    def fragments(self) -> list[tuple[int, int, int]]:
        """(gref, offset, length) of each fragment: the first one's length is
        what the others leave of ``size``."""
        rest = sum(r.size for r in self.requests[1:])
        first = self.requests[0]
        frags = [(first.gref, first.offset, first.size - rest)]
        frags += [(r.gref, r.offset, r.size) for r in self.requests[1:]]
        return frags

    @property
    def gso(self) -> ExtraInfo | None:
        found = None
        for extra in self.extras:
            if extra.type == EXTRA_GSO:
                found = extra  # a later one overrides, as in netback
        return found


def pack_tx_request(req: TxRequest) -> bytes:
    return _TX_REQ.pack(req.gref, req.offset, req.flags, req.id, req.size)


def pack_extra(extra: ExtraInfo) -> bytes:
    return bytes((extra.type, extra.flags)) + extra.data[:6].ljust(6, b"\0")


def pack_rx_request(id: int, gref: int) -> bytes:
    return _RX_REQ.pack(id, 0, gref)


class BackRing:
    """The backend half of one ring (``BACK_RING_INIT`` and the macros a
    backend uses).  The frontend owns req_prod and rsp_event, the backend
    req_event and rsp_prod; each is read once per use, as a local copy."""

    def __init__(self, page: memoryview, slot: int) -> None:
        if len(page) < RING_HEADER + slot:
            raise Fault("the ring page is too small")
        self.page = page
        self.slot = slot
        self.size = ring_size(len(page), slot)
        self.req_cons = 0
        self.rsp_prod_pvt = 0

    def _u32(self, off: int) -> int:
        return int(_IDX.unpack_from(self.page, off)[0])

    def entry(self, idx: int) -> int:
        """The byte offset of ring entry ``idx`` (free-running)."""
        return RING_HEADER + (idx & (self.size - 1)) * self.slot

    def unconsumed(self) -> int:
        """``RING_HAS_UNCONSUMED_REQUESTS``, after ``RING_REQUEST_PROD_OVERFLOW``:
        a req_prod more than a ring ahead of the responses is a fault."""
        req_prod = self._u32(_REQ_PROD)
        if (req_prod - self.rsp_prod_pvt) & _M32 > self.size:
            raise Fault(
                f"req_prod {req_prod} is more than {self.size} ahead of rsp_prod {self.rsp_prod_pvt}"
            )
        req = (req_prod - self.req_cons) & _M32
        rsp = self.size - ((self.req_cons - self.rsp_prod_pvt) & _M32)
        return min(req, rsp)

    def push(self) -> bool:
        """``RING_PUSH_RESPONSES_AND_CHECK_NOTIFY``: publish the staged
        responses; True if the frontend asked to hear of them."""
        old = self._u32(_RSP_PROD)
        new = self.rsp_prod_pvt
        # Python stores are program-ordered and the page is shared memory: the
        # responses were written before this index (xen_wmb), and rsp_event is
        # read after it (xen_mb).
        _IDX.pack_into(self.page, _RSP_PROD, new)
        event = self._u32(_RSP_EVENT)
        return ((new - event) & _M32) < ((new - old) & _M32)

    def final_check(self) -> bool:
        """``RING_FINAL_CHECK_FOR_REQUESTS``: True if there is work; else asks
        for a notification on the next request and looks once more."""
        if self.unconsumed():
            return True
        _IDX.pack_into(self.page, _REQ_EVENT, (self.req_cons + 1) & _M32)
        return bool(self.unconsumed())

    def slots_available(self, needed: int) -> bool:
        """netback's ``xenvif_rx_ring_slots_available``: True if ``needed``
        requests are unconsumed; else asks for a notification at the
        frontend's next request (``req_event = req_prod + 1``: some may be
        there already, only too few, and ``final_check`` would not arm) and
        looks again while req_prod moved under the store.  A frontend that
        moves it every time is posting: after a few tries the count stands."""
        for _ in range(_ARM_TRIES):
            prod = self._u32(_REQ_PROD)
            if self.unconsumed() >= needed:
                return True
            _IDX.pack_into(self.page, _REQ_EVENT, (prod + 1) & _M32)
            if self._u32(_REQ_PROD) == prod:
                return False
        return self.unconsumed() >= needed


class TxBackRing(BackRing):
    """The transmit ring: the frontend's packets in, one response per slot out."""

    def __init__(self, page: memoryview) -> None:
        super().__init__(page, TX_SLOT)

    def _request(self, idx: int) -> TxRequest:
        return TxRequest(*_TX_REQ.unpack_from(self.page, self.entry(idx)))

    def next_packet(self) -> TxPacket | None:
        """The next whole packet, consumed, or None if there is none; a
        packet that breaks netif.h's rules raises Fault (the frontend is then
        to be disconnected: nothing after a bad packet can be trusted)."""
        work = self.unconsumed()
        if work == 0:
            return None
        idx = self.req_cons
        first = self._request(idx)
        used = 1
        extras: list[ExtraInfo] = []
        more_extra = bool(first.flags & NETTXF_EXTRA_INFO)
        while more_extra:
            if used >= work:
                raise Fault("an extra info is missing")
            raw = bytes(self.page[self.entry(idx + used) : self.entry(idx + used) + 8])
            extra = ExtraInfo(raw[0], raw[1], raw[2:8])
            used += 1
            if not 0 < extra.type < _EXTRA_TYPE_MAX:
                raise Fault(f"unknown extra info type {extra.type}")
            if extra.type == EXTRA_GSO:
                if extra.gso_size == 0:
                    raise Fault("a GSO extra with size 0")
                if extra.gso_type not in (GSO_TCPV4, GSO_TCPV6):
                    raise Fault(f"unknown GSO type {extra.gso_type}")
            extras.append(extra)
            more_extra = bool(extra.flags & EXTRA_FLAG_MORE)
        requests = [first]
        remaining = first.size
        flags = first.flags
        while flags & NETTXF_MORE_DATA:
            if len(requests) > LEGACY_SLOTS_MAX:
                raise Fault(f"a packet of more than {LEGACY_SLOTS_MAX} slots after its first")
            if used >= work:
                raise Fault("a packet continues past req_prod")
            req = self._request(idx + used)
            used += 1
            if req.size > remaining:
                raise Fault(f"a slot of {req.size} bytes when {remaining} remain of the packet")
            remaining -= req.size
            requests.append(req)
            flags = req.flags
        for req in requests[1:]:
            if req.offset + req.size > PAGE_SIZE:
                raise Fault(f"a slot crosses its page (offset {req.offset}, size {req.size})")
        if first.offset + remaining > PAGE_SIZE:
            raise Fault("the first slot crosses its page")
        self.req_cons = (idx + used) & _M32
        return TxPacket(tuple(requests), tuple(extras))

    def respond(self, packet: TxPacket, status: int) -> None:
        """Stage the packet's responses, in its slots' order: its status for
        each request, NETIF_RSP_NULL for each extra (whose slot follows the
        first request)."""
        ids = [(packet.requests[0].id, status)]
        ids += [(0, RSP_NULL)] * len(packet.extras)
        ids += [(r.id, status) for r in packet.requests[1:]]
        for rid, st in ids:
            off = self.entry(self.rsp_prod_pvt)
            _TX_RSP.pack_into(self.page, off, rid, st)
            self.rsp_prod_pvt = (self.rsp_prod_pvt + 1) & _M32


@dataclass(frozen=True, slots=True)
class RxMeta:
    """What a venet frame becomes on the rx ring: the first response's flags,
    its GSO extra if a super-frame, and the Ethernet frame itself."""

    flags: int
    gso: ExtraInfo | None
    frame: bytes | memoryview


@dataclass(frozen=True, slots=True)
class RxCopy:
    """Copy ``frame[start:start + length]`` to offset 0 of the page ``gref``."""

    gref: int
    start: int
    length: int


class RxBackRing(BackRing):
    """The receive ring: the frontend's empty pages in, filled slots out."""

    def __init__(self, page: memoryview) -> None:
        super().__init__(page, RX_SLOT)

    @staticmethod
    def slots_for(meta: RxMeta) -> int:
        frags = max(1, -(-len(meta.frame) // PAGE_SIZE))
        return frags + (1 if meta.gso is not None else 0)

    def place(self, meta: RxMeta) -> list[RxCopy] | None:
        """Consume the requests the frame needs and stage their responses;
        None (nothing consumed) if the frontend has not posted enough."""
        need = self.slots_for(meta)
        if self.unconsumed() < need:
            return None
        frame_len = len(meta.frame)
        copies: list[RxCopy] = []
        start = 0
        first = True
        while first or start < frame_len:
            length = min(PAGE_SIZE, frame_len - start)
            flags = meta.flags if first else 0
            if start + length < frame_len:
                flags |= NETRXF_MORE_DATA
            if first and meta.gso is not None:
                flags |= NETRXF_EXTRA_INFO
            rid, gref = self._take()
            self._respond(_RX_RSP.pack(rid, 0, flags, length))
            copies.append(RxCopy(gref, start, length))
            if first and meta.gso is not None:
                self._take()  # the extra's slot answers a request of its own
                self._respond(pack_extra(meta.gso))
            first = False
            start += length
        return copies

    def _take(self) -> tuple[int, int]:
        rid, _pad, gref = _RX_REQ.unpack_from(self.page, self.entry(self.req_cons))
        self.req_cons = (self.req_cons + 1) & _M32
        return int(rid), int(gref)

    def _respond(self, raw: bytes) -> None:
        off = self.entry(self.rsp_prod_pvt)
        self.page[off : off + RX_SLOT] = raw
        self.rsp_prod_pvt = (self.rsp_prod_pvt + 1) & _M32


# --- the header translation -------------------------------------------------------------

_IPV4: Final = b"\x08\x00"
_IPV6: Final = b"\x86\xdd"
_TCP: Final = 6
_UDP: Final = 17
_CSUM_OFFSET: Final = {_TCP: 16, _UDP: 6}


def _l4(frame: bytes | memoryview) -> tuple[int, int, int] | None:
    """(offset of the L4 header, its protocol, its header length) of an
    untagged IPv4/IPv6 TCP or UDP frame that is not a fragment, else None."""
    eth = vnet.ETH_HLEN
    ethertype = bytes(frame[12:14])
    if ethertype == _IPV4 and len(frame) >= eth + 20:
        ihl = (frame[eth] & 15) * 4
        if frame[eth] >> 4 != 4 or ihl < 20:
            return None
        if int.from_bytes(frame[eth + 6 : eth + 8], "big") & 0x3FFF:
            return None
        l4, proto = eth + ihl, frame[eth + 9]
    elif ethertype == _IPV6 and len(frame) >= eth + 40:
        if frame[eth] >> 4 != 6:
            return None
        l4, proto = eth + 40, frame[eth + 6]  # extension headers are not read
    else:
        return None
    if proto == _TCP:
        if l4 + 20 > len(frame):
            return None
        hlen = (frame[l4 + 12] >> 4) * 4
        if hlen < 20:
            return None
    elif proto == _UDP:
        hlen = 8
    else:
        return None
    if l4 + hlen > len(frame):
        return None
    return l4, proto, hlen


def tx_to_venet(packet: TxPacket, data: bytes) -> bytes | None:
    """A transmitted packet (``data``: its fragments' bytes, gathered) as a
    venet frame, ``virtio_net_hdr_v1`` + Ethernet; None if venet cannot
    take it (answer NETIF_RSP_ERROR).

    NETTXF_csum_blank becomes NEEDS_CSUM at the TCP/UDP checksum, found by
    reading the headers, as netback does (netfront says only that the
    checksum is blank); a GSO extra becomes gso_type/gso_size/hdr_len, and
    always NEEDS_CSUM, which virtio requires of a super-frame.
    NETTXF_data_validated has no transmit meaning in virtio and is dropped."""
    if len(data) != packet.size or len(data) < vnet.ETH_HLEN:
        return None
    gso = packet.gso
    if not packet.requests[0].flags & NETTXF_CSUM_BLANK and gso is None:
        return vnet.header() + data
    layout = _l4(data)
    if layout is None:
        return None
    l4, proto, hlen = layout
    if gso is None:
        return (
            vnet.header(vnet.HDR_NEEDS_CSUM, csum_start=l4, csum_offset=_CSUM_OFFSET[proto]) + data
        )
    if proto != _TCP:
        return None
    ipv4 = bytes(data[12:14]) == _IPV4
    if ipv4 != (gso.gso_type == GSO_TCPV4):
        return None
    return (
        vnet.header(
            vnet.HDR_NEEDS_CSUM,
            vnet.GSO_TCPV4 if ipv4 else vnet.GSO_TCPV6,
            hdr_len=l4 + hlen,
            gso_size=gso.gso_size,
            csum_start=l4,
            csum_offset=_CSUM_OFFSET[_TCP],
        )
        + data
    )


def venet_to_rx(frame: bytes | memoryview) -> RxMeta | None:
    """A venet frame as the rx ring carries it; None if its header asks for
    what netif cannot say (a GSO type other than TCPv4/v6, a GSO frame
    without NEEDS_CSUM, a frame shorter than its headers).

    NEEDS_CSUM becomes csum_blank + data_validated (the frontend completes
    nothing it is not told is blank; netback sets both), DATA_VALID becomes
    data_validated, a super-frame a GSO extra with its gso_size."""
    if len(frame) < vnet.HDR_SIZE + vnet.ETH_HLEN:
        return None
    flags, gso_type, _hdr_len, gso_size = struct.unpack_from("<BBHH", frame)
    body = frame[vnet.HDR_SIZE :]
    rx = 0
    if flags & vnet.HDR_NEEDS_CSUM:
        rx |= NETRXF_CSUM_BLANK | NETRXF_DATA_VALIDATED
    elif flags & vnet.HDR_DATA_VALID:
        rx |= NETRXF_DATA_VALIDATED
    if gso_type == vnet.GSO_NONE:
        return RxMeta(rx, None, body)
    if not flags & vnet.HDR_NEEDS_CSUM or gso_size == 0:
        return None
    if gso_type == vnet.GSO_TCPV4:
        return RxMeta(rx, ExtraInfo.gso(gso_size, GSO_TCPV4), body)
    if gso_type == vnet.GSO_TCPV6:
        return RxMeta(rx, ExtraInfo.gso(gso_size, GSO_TCPV6), body)
    return None
