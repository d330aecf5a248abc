"""The Xen connector's ABI, sans-IO: attach messages, the call page, the xenstore layout.

**Attach** (``<run-dir>/xen.sock``, SOCK_SEQPACKET, mode 0600: claiming a
domid is the toolstack's privilege).  A frame is ``u16 type, u16 zero, u32
seq`` and a body; at most ``MAX_FRAME`` bytes and 4 descriptors.  What a
hypervisor would do for a domain is asked here; everything else goes
through xenstore, grants and event channels, as for a real domU.

== ======================= ======== =================================================== ====
#  type                    dir      body                                                fds
== ======================= ======== =================================================== ====
1  ATTACH                  d>vbusd  u32 version (1), u32 domid, u64 memory bytes,       2: memory memfd,
                                    u32 grant entries, u16 len, name                    grant table memfd
2  ATTACHED                vbusd>d  u32 domid, u16 len, bus                             1: its xenstore socket
3  ERROR                   vbusd>d  i32 errno, u16 len, message                         0
4  EVTCHN_ALLOC_UNBOUND    d>vbusd  u32 remote domid                                    0
5  EVTCHN_BIND_INTERDOMAIN d>vbusd  u32 remote domid, u32 remote port                   0
6  EVTCHN_PORT             vbusd>d  u32 port                                            2: inbox, outbox
7  EVTCHN_CLOSE            d>vbusd  u32 port                                            0
8  OK                      vbusd>d  (empty)                                             0
== ======================= ======== =================================================== ====

A send on a port is a write of the outbox eventfd; an event is the inbox
eventfd becoming readable.  The memory memfd is sealed (``validate_memfd``);
page frame *n* is bytes ``[n * 4096, (n + 1) * 4096)`` of it.  Hanging up
(or dying) is the domain's destruction.

**The call page** (one writable grant per device, ``call-ref``), little-endian::

    0x00 u32 req      frontend: calls posted (free-running)
    0x04 u32 rsp      backend: calls answered
    0x08 u32 func     frontend
    0x0c u32 len      frontend: request bytes at 0x40
    0x10 i32 status   backend: 0 or -errno
    0x14 u32 rsp_len  backend: reply bytes at 0x40
    0x40 ...          data, at most CALL_DATA_MAX bytes each way

One call at a time: the frontend writes func, len and data, then ``req + 1``,
and sends on ``call-event-channel``; the backend answers, stores ``rsp =
req`` last and sends back.  ``req`` more than one ahead is a fault.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from vbus.errors import ProtocolError

__all__ = [
    "CALL_DATA",
    "CALL_DATA_MAX",
    "MAX_FRAME",
    "VERSION",
    "Attach",
    "Attached",
    "MsgType",
    "XenbusState",
    "backend_path",
    "decode",
    "encode",
    "frontend_path",
]

VERSION = 1
MAX_FRAME = 4096
MAX_FDS = 4
CALL_DATA = 0x40
CALL_DATA_MAX = 4096 - CALL_DATA
_HEAD = struct.Struct("<HHI")


class MsgType(IntEnum):
    ATTACH = 1
    ATTACHED = 2
    ERROR = 3
    EVTCHN_ALLOC_UNBOUND = 4
    EVTCHN_BIND_INTERDOMAIN = 5
    EVTCHN_PORT = 6
    EVTCHN_CLOSE = 7
    OK = 8


class XenbusState(IntEnum):
    """Xen's public io/xenbus.h."""

    UNKNOWN = 0
    INITIALISING = 1
    INIT_WAIT = 2
    INITIALISED = 3
    CONNECTED = 4
    CLOSING = 5
    CLOSED = 6
    RECONFIGURING = 7
    RECONFIGURED = 8


def frontend_path(domid: int, devid: int) -> str:
    return f"/local/domain/{domid}/device/vbus/{devid}"


def backend_path(domid: int, devid: int) -> str:
    return f"/local/domain/0/backend/vbus/{domid}/{devid}"


@dataclass(frozen=True, slots=True)
class Attach:
    version: int
    domid: int
    memory: int
    grant_entries: int
    name: str


@dataclass(frozen=True, slots=True)
class Attached:
    domid: int
    bus: str


_ATTACH = struct.Struct("<IIQIH")
_ERROR = struct.Struct("<iH")


def _text(raw: bytes, what: str) -> str:
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise ProtocolError(f"{what} is not UTF-8") from None
    if "\0" in text or len(raw) > 255:
        raise ProtocolError(f"bad {what}")
    return text


def encode(mtype: MsgType, seq: int, *fields: object) -> bytes:
    """A frame: ``fields`` as the type's body lists them (texts as str)."""
    head = _HEAD.pack(mtype, 0, seq & 0xFFFFFFFF)
    if mtype == MsgType.ATTACH:
        version, domid, memory, entries, name = fields
        raw = str(name).encode()
        body = _ATTACH.pack(version, domid, memory, entries, len(raw)) + raw
    elif mtype == MsgType.ATTACHED:
        domid, bus = fields
        raw = str(bus).encode()
        body = struct.pack("<IH", domid, len(raw)) + raw
    elif mtype == MsgType.ERROR:
        code, message = fields
        raw = str(message).encode()[:1024]
        body = _ERROR.pack(code, len(raw)) + raw
    elif mtype == MsgType.EVTCHN_BIND_INTERDOMAIN:
        body = struct.pack("<II", *fields)
    elif mtype in (MsgType.EVTCHN_ALLOC_UNBOUND, MsgType.EVTCHN_PORT, MsgType.EVTCHN_CLOSE):
        body = struct.pack("<I", *fields)
    else:
        body = b""
    return head + body


def decode(frame: bytes) -> tuple[MsgType, int, tuple[object, ...]]:
    """(type, seq, fields) of a frame; ``ProtocolError`` for anything malformed."""
    if len(frame) < _HEAD.size or len(frame) > MAX_FRAME:
        raise ProtocolError(f"a frame of {len(frame)} bytes")
    raw_type, zero, seq = _HEAD.unpack_from(frame)
    try:
        mtype = MsgType(raw_type)
    except ValueError:
        raise ProtocolError(f"unknown message type {raw_type}") from None
    if zero:
        raise ProtocolError("reserved header field is not zero")
    body = frame[_HEAD.size :]
    try:
        if mtype == MsgType.ATTACH:
            version, domid, memory, entries, n = _ATTACH.unpack_from(body)
            if len(body) != _ATTACH.size + n:
                raise ProtocolError("ATTACH length mismatch")
            name = _text(body[_ATTACH.size :], "domain name")
            return mtype, seq, (Attach(version, domid, memory, entries, name),)
        if mtype == MsgType.ATTACHED:
            domid, n = struct.unpack_from("<IH", body)
            if len(body) != 6 + n:
                raise ProtocolError("ATTACHED length mismatch")
            return mtype, seq, (Attached(domid, _text(body[6:], "bus name")),)
        if mtype == MsgType.ERROR:
            code, n = _ERROR.unpack_from(body)
            if len(body) != _ERROR.size + n:
                raise ProtocolError("ERROR length mismatch")
            return mtype, seq, (code, body[_ERROR.size :].decode(errors="replace"))
        if mtype == MsgType.EVTCHN_BIND_INTERDOMAIN:
            if len(body) != 8:
                raise ProtocolError("EVTCHN_BIND_INTERDOMAIN length")
            return mtype, seq, struct.unpack("<II", body)
        if mtype in (MsgType.EVTCHN_ALLOC_UNBOUND, MsgType.EVTCHN_PORT, MsgType.EVTCHN_CLOSE):
            if len(body) != 4:
                raise ProtocolError(f"{mtype.name} length")
            return mtype, seq, struct.unpack("<I", body)
    except struct.error:
        raise ProtocolError(f"{mtype.name} is truncated") from None
    if body:
        raise ProtocolError(f"{mtype.name} has a body")
    return mtype, seq, ()


FD_COUNT = {
    MsgType.ATTACH: 2,
    MsgType.ATTACHED: 1,
    MsgType.EVTCHN_PORT: 2,
}
