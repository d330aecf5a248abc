"""The kvm ABI (docs/design.md 4.5), sans-IO, both sides: what a VMM says to
vbusd on ``<run-dir>/kvm.sock``, and what a guest and vbusd say to each other
in the bridge page.

No sockets, no descriptors, no event loop here.  The connector
(``vbus.connectors.kvm``), the guest simulator (``vbus.kvmsim``) and the mini
VMM (``vbus vm``) all build on this module; everything is little-endian.

**Registration** (one SOCK_SEQPACKET datagram per frame, at most
``MAX_FRAME`` bytes and ``MAX_FDS`` descriptors).  Every frame starts with
``u16 type, u16 zero, u32 seq``; replies echo the REGISTER's seq, FAULTED
carries 0::

    1 REGISTER    VMM -> vbusd  u32 version (1), u32 nregions (1..8),
                                u32 ndoorbells (1..64), u32 nirqs (1..64),
                                u64 bridge_gpa, u16 name_len, name (<= 64),
                                zero pad to 8, then nregions x
                                {u64 gpa, u64 size, u64 offset, u32 flags, u32 zero}
                                fds: the regions' memfds, then the doorbell
                                eventfds, then the interrupt eventfds
                                (nregions + ndoorbells + nirqs <= 64)
    2 REGISTERED  vbusd -> VMM  u32 guest_id, u16 bus_len, bus
    3 ERROR       vbusd -> VMM  i32 errno (>= 1), u16 len, message (<= 1024)
    4 FAULTED     vbusd -> VMM  u32 reason, u32 detail, u16 len, message

``decode`` checks the format (ProtocolError; TooBig past ``MAX_FRAME``;
NotSupported for another ABI version); ``check_layout`` checks what a
memory table can get wrong without looking at its files (Invalid):
alignment, overlap, the bridge page inside a writable region.  The files
themselves (sealed shmem memfds, ``offset + size`` inside them) are checked
where the descriptors are, by ``GuestMemory.from_memfds``.

**The bridge page** (``BRIDGE_SIZE`` bytes at ``bridge_gpa``; the guest
formats it with ``format_bridge``, then rings doorbell 0)::

    0x000 u32 magic    0x4b425642       guest, at init
    0x004 u32 version  1                guest, at init
    0x008 u32 fault                     host: 0 or a FaultReason, sticky
    0x00c u32 fault_detail              host: which handle, slot, doorbell
    0x010 u32 call_head                 guest: call slots posted (free-running)
    0x014 u32 call_tail                 host: call slots answered
    0x018 u32 event_head                host: events posted
    0x01c u32 event_tail                guest: events consumed
    0x020 u32 irq_enable                guest: 0 or 1 (raise interrupt 0 on
                                        answers and events)
    0x024 .. 0x040 zero
    0x040 16 call slots x 64 bytes      (``CallSlot``)
    0x440 .. 0x800 unused               (nobody reads or writes it)
    0x800 32 event slots x 16 bytes     (``Event``)
    0xa00 .. 0x1000 unused

Indexes are free-running u32 counters, slot = index % count; each side
stores its own with one aligned 32-bit store after the slot stores it
publishes (x86 keeps stores in order).  ``HostBridge`` is vbusd's end
(private cursors: it never trusts the guest's copy of ``call_tail`` or
``event_head``), ``GuestBridge`` the guest's.  A snapshot of each slot is
decoded once; garbage is a ``GuestFault`` carrying its ``FaultReason``.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import IntEnum
from itertools import pairwise
from typing import ClassVar, TypeAlias

from vbus.errors import Busy, Fault, Invalid, NotSupported, ProtocolError, TooBig
from vbus.memory import SharedBuffer

__all__ = [
    "ABI_VERSION",
    "BRIDGE_MAGIC",
    "BRIDGE_SIZE",
    "BRIDGE_VERSION",
    "CALL_BASE",
    "CALL_SLOTS",
    "CALL_SLOT_SIZE",
    "EVENT_BASE",
    "EVENT_SLOTS",
    "EVENT_SLOT_SIZE",
    "MAX_DATA",
    "MAX_DOORBELLS",
    "MAX_FDS",
    "MAX_FRAME",
    "MAX_IRQS",
    "MAX_NAME",
    "MAX_REGIONS",
    "MAX_REPLY",
    "MAX_TEXT",
    "PAGE_SIZE",
    "REGION_READONLY",
    "SHM_NO_MITIGATION",
    "SHM_WRITABLE",
    "WHOLE_GUEST",
    "CallSlot",
    "DeviceEntry",
    "Error",
    "Event",
    "EventKind",
    "FaultReason",
    "Faulted",
    "FrameType",
    "GuestBridge",
    "GuestFault",
    "HostBridge",
    "Message",
    "Op",
    "Region",
    "Register",
    "Registered",
    "call_slot_offset",
    "check_layout",
    "clip",
    "decode",
    "decode_call",
    "decode_devices",
    "decode_event",
    "decode_reply",
    "decode_request",
    "encode",
    "encode_call",
    "encode_devices",
    "encode_event",
    "event_slot_offset",
    "format_bridge",
    "peek_seq",
    "split_fds",
]

# --- registration: limits and layout ------------------------------------------------

ABI_VERSION = 1
MAX_FRAME = 4096
MAX_FDS = 64  # descriptors of one REGISTER: regions + doorbells + interrupts
MAX_REGIONS = 8
MAX_DOORBELLS = 64
MAX_IRQS = 64
MAX_NAME = 64  # bytes of a guest or bus name
MAX_TEXT = 1024  # bytes of an ERROR or FAULTED message
PAGE_SIZE = 4096
REGION_READONLY = 1  # region flags bit 0: a KVM_MEM_READONLY slot

_U16_MAX = 0xFFFF
_U32_MAX = 0xFFFFFFFF
_U64_MAX = (1 << 64) - 1
_M32 = _U32_MAX

_HEADER = struct.Struct("<HHI")  # type, zero, seq
_REGISTER = struct.Struct("<IIIIQH")  # version, nregions, ndoorbells, nirqs, bridge_gpa, name_len
_REGION = struct.Struct("<QQQII")  # gpa, size, offset, flags, zero
_U16 = struct.Struct("<H")
_REGISTERED = struct.Struct("<I")
_ERROR = struct.Struct("<i")
_FAULTED = struct.Struct("<II")
HEADER_SIZE = _HEADER.size


class FrameType(IntEnum):
    REGISTER = 1
    REGISTERED = 2
    ERROR = 3
    FAULTED = 4


class FaultReason(IntEnum):
    """Why a guest (the ``fault`` register) or one handle (an event FAULT) was faulted."""

    BRIDGE = 1  # bad magic or version, nonzero reserved words, an impossible index
    CALL_RING = 2  # call_head - call_tail > 16, a bad op, a malformed call slot
    ADDRESS = 3  # a range outside guest RAM or across regions (bridge data or a queue)
    RING = 4  # an ioq rule broken (per handle)
    DOORBELL_STORM = 5  # doorbells far beyond the work they announce
    RESOURCES = 6  # over its ledger, or a doorbell/interrupt eventfd made unusable
    DEVICE = 7  # the device failed (a deviceclass bug, per handle): not the guest's doing


# Reasons that fault the whole guest; the others fault one handle.
WHOLE_GUEST = frozenset(
    {
        FaultReason.BRIDGE,
        FaultReason.CALL_RING,
        FaultReason.ADDRESS,
        FaultReason.DOORBELL_STORM,
        FaultReason.RESOURCES,
    }
)


_REASONS = frozenset(int(r) for r in FaultReason)
_TYPES = frozenset(int(t) for t in FrameType)


class GuestFault(Fault):
    """The guest broke the bridge ABI: ``reason`` and ``detail`` go into its
    fault register (EFAULT)."""

    def __init__(self, reason: FaultReason, detail: int, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.detail = detail & _M32


@dataclass(frozen=True, slots=True)
class Region:
    """One memory region of a REGISTER: guest-physical ``[gpa, gpa + size)``
    is ``[offset, offset + size)`` of its memfd."""

    gpa: int
    size: int
    offset: int = 0
    readonly: bool = False

    @property
    def end(self) -> int:
        return self.gpa + self.size


@dataclass(frozen=True, slots=True)
class Register:
    """A VMM registers one guest.  Its descriptors travel beside the frame:
    ``nfds`` of them, in the order ``split_fds`` cuts them."""

    TYPE: ClassVar[FrameType] = FrameType.REGISTER
    name: str
    regions: tuple[Region, ...]
    ndoorbells: int
    nirqs: int
    bridge_gpa: int
    version: int = ABI_VERSION

    @property
    def nfds(self) -> int:
        return len(self.regions) + self.ndoorbells + self.nirqs


@dataclass(frozen=True, slots=True)
class Registered:
    TYPE: ClassVar[FrameType] = FrameType.REGISTERED
    guest_id: int
    bus: str


@dataclass(frozen=True, slots=True)
class Error:
    TYPE: ClassVar[FrameType] = FrameType.ERROR
    errno: int
    message: str


@dataclass(frozen=True, slots=True)
class Faulted:
    """The guest was faulted (the socket stays open until the VMM hangs up)."""

    TYPE: ClassVar[FrameType] = FrameType.FAULTED
    reason: int
    detail: int
    message: str


Message: TypeAlias = Register | Registered | Error | Faulted


def clip(text: str, limit: int = MAX_TEXT) -> str:
    """``text`` cut to at most ``limit`` UTF-8 bytes, on a character boundary."""
    raw = text.encode("utf-8", "replace")
    if len(raw) <= limit:
        return text
    return raw[:limit].decode("utf-8", "ignore")


def split_fds(msg: Register, fds: Sequence[int]) -> tuple[list[int], list[int], list[int]]:
    """(region memfds, doorbell eventfds, interrupt eventfds) of a REGISTER's descriptors."""
    if len(fds) != msg.nfds:
        raise ProtocolError(f"REGISTER announces {msg.nfds} descriptors, {len(fds)} came")
    a = len(msg.regions)
    b = a + msg.ndoorbells
    return list(fds[:a]), list(fds[a:b]), list(fds[b:])


# --- rules shared by encode (Invalid) and decode (ProtocolError) -------------------


def _counts_problem(nregions: int, ndoorbells: int, nirqs: int) -> str | None:
    if not 1 <= nregions <= MAX_REGIONS:
        return f"REGISTER nregions {nregions} is not in 1..{MAX_REGIONS}"
    if not 1 <= ndoorbells <= MAX_DOORBELLS:
        return f"REGISTER ndoorbells {ndoorbells} is not in 1..{MAX_DOORBELLS}"
    if not 1 <= nirqs <= MAX_IRQS:
        return f"REGISTER nirqs {nirqs} is not in 1..{MAX_IRQS}"
    if nregions + ndoorbells + nirqs > MAX_FDS:
        return (
            f"REGISTER needs {nregions + ndoorbells + nirqs} descriptors, "
            f"more than the {MAX_FDS} a frame carries"
        )
    return None


def _name_problem(raw: bytes, what: str, *, word: bool) -> str | None:
    """A name is 1..64 bytes of UTF-8 without NUL; a guest name (``word``) is
    also printable without spaces (it becomes a ``Vm`` name in listings)."""
    if not 1 <= len(raw) <= MAX_NAME:
        return f"{what} of {len(raw)} bytes is not 1..{MAX_NAME} bytes"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return f"{what} is not UTF-8"
    if "\x00" in text:
        return f"{what} contains a NUL character"
    if word and (not text.isprintable() or any(ch.isspace() for ch in text)):
        return f"{what} {text!r} is not printable text without spaces"
    return None


def _int(value: int, lo: int, hi: int, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise Invalid(f"{what} must be an integer in {lo}..{hi}, got {value!r}")
    return value


def _text(value: str, limit: int, what: str) -> bytes:
    if not isinstance(value, str):
        raise Invalid(f"{what} must be a str, got {type(value).__name__}")
    try:
        raw = value.encode("utf-8")
    except UnicodeEncodeError:
        raise Invalid(f"{what} cannot be encoded as UTF-8") from None
    if len(raw) > limit:
        raise Invalid(f"{what} of {len(raw)} bytes exceeds the {limit}-byte limit")
    return _U16.pack(len(raw)) + raw


# --- encoding ------------------------------------------------------------------------


def encode(msg: Message, seq: int = 0) -> bytes:
    """One frame.  ``Invalid`` for a field the format cannot carry (a local
    bug); a well-formed table that ``check_layout`` would refuse encodes."""
    seq = _int(seq, 0, _U32_MAX, "seq")
    if isinstance(msg, Register):
        body = _encode_register(msg)
    elif isinstance(msg, Registered):
        problem = _name_problem(_raw(msg.bus, "REGISTERED bus"), "REGISTERED bus", word=False)
        if problem:
            raise Invalid(problem)
        body = _REGISTERED.pack(_int(msg.guest_id, 0, _U32_MAX, "guest_id")) + _text(
            msg.bus, MAX_NAME, "REGISTERED bus"
        )
    elif isinstance(msg, Error):
        body = _ERROR.pack(_int(msg.errno, 1, 4095, "ERROR errno")) + _text(
            msg.message, MAX_TEXT, "ERROR message"
        )
    elif isinstance(msg, Faulted):
        if msg.reason not in _REASONS:
            raise Invalid(f"FAULTED reason {msg.reason!r} is not a FaultReason")
        body = _FAULTED.pack(msg.reason, _int(msg.detail, 0, _U32_MAX, "detail")) + _text(
            msg.message, MAX_TEXT, "FAULTED message"
        )
    else:
        raise Invalid(f"not a kvm registration message: {type(msg).__name__}")
    frame = _HEADER.pack(msg.TYPE, 0, seq) + body
    if len(frame) > MAX_FRAME:
        raise Invalid(f"{msg.TYPE.name} frame of {len(frame)} bytes exceeds {MAX_FRAME}")
    return frame


def _raw(value: str, what: str) -> bytes:
    if not isinstance(value, str):
        raise Invalid(f"{what} must be a str, got {type(value).__name__}")
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError:
        raise Invalid(f"{what} cannot be encoded as UTF-8") from None


def _encode_register(msg: Register) -> bytes:
    regions = tuple(msg.regions)
    problem = _counts_problem(len(regions), msg.ndoorbells, msg.nirqs)
    name = _raw(msg.name, "guest name")
    problem = problem or _name_problem(name, "guest name", word=True)
    if problem:
        raise Invalid(problem)
    head = _REGISTER.pack(
        _int(msg.version, 0, _U32_MAX, "version"),
        len(regions),
        msg.ndoorbells,
        msg.nirqs,
        _int(msg.bridge_gpa, 0, _U64_MAX, "bridge_gpa"),
        len(name),
    )
    parts = [head, name, bytes(-(HEADER_SIZE + len(head) + len(name)) % 8)]
    for i, region in enumerate(regions):
        if not isinstance(region, Region):
            raise Invalid(f"region {i} is not a Region")
        parts.append(
            _REGION.pack(
                _int(region.gpa, 0, _U64_MAX, f"region {i} gpa"),
                _int(region.size, 0, _U64_MAX, f"region {i} size"),
                _int(region.offset, 0, _U64_MAX, f"region {i} offset"),
                REGION_READONLY if region.readonly else 0,
                0,
            )
        )
    return b"".join(parts)


# --- decoding -----------------------------------------------------------------------


def peek_seq(frame: bytes) -> int:
    """The seq of a frame, or 0 when it is too short to have one."""
    if len(frame) < HEADER_SIZE:
        return 0
    return int(_HEADER.unpack_from(frame)[2])


def decode(frame: bytes, nfds: int = 0) -> tuple[int, Message]:
    """(seq, message) of one frame that came with ``nfds`` descriptors.

    ProtocolError for anything malformed (unknown type, nonzero reserved
    fields or padding, counts out of range or not matching ``nfds``, bad
    names, short or trailing bytes), TooBig past ``MAX_FRAME``,
    NotSupported for a REGISTER of another ABI version."""
    if len(frame) > MAX_FRAME:
        raise TooBig(f"frame of {len(frame)} bytes exceeds the {MAX_FRAME}-byte limit")
    if len(frame) < HEADER_SIZE:
        raise ProtocolError(f"frame of {len(frame)} bytes is shorter than its header")
    mtype, zero, seq = _HEADER.unpack_from(frame)
    if zero:
        raise ProtocolError("nonzero reserved field in the frame header")
    if mtype not in _TYPES:
        raise ProtocolError(f"unknown frame type {mtype}")
    body = memoryview(frame)[HEADER_SIZE:]
    if mtype == FrameType.REGISTER:
        return seq, _decode_register(body, nfds)
    if nfds:
        raise ProtocolError(f"a frame of type {mtype} carries no descriptors, {nfds} came")
    if mtype == FrameType.REGISTERED:
        (guest_id,) = _need(body, 0, _REGISTERED)
        bus, end = _string(body, 4, "REGISTERED bus", MAX_NAME)
        problem = _name_problem(bus.encode(), "REGISTERED bus", word=False)
        if problem:
            raise ProtocolError(problem)
        _end(body, end)
        return seq, Registered(guest_id, bus)
    if mtype == FrameType.ERROR:
        (code,) = _need(body, 0, _ERROR)
        if not 1 <= code <= 4095:
            raise ProtocolError(f"ERROR errno {code} is not in 1..4095")
        message, end = _string(body, 4, "ERROR message", MAX_TEXT)
        _end(body, end)
        return seq, Error(code, message)
    if mtype == FrameType.FAULTED:
        reason, detail = _need(body, 0, _FAULTED)
        if reason not in _REASONS:
            raise ProtocolError(f"FAULTED reason {reason} is unknown")
        message, end = _string(body, 8, "FAULTED message", MAX_TEXT)
        _end(body, end)
        return seq, Faulted(FaultReason(reason), detail, message)
    raise AssertionError(f"frame type {mtype} has no decoder")


def decode_request(frame: bytes, nfds: int) -> tuple[int, Register]:
    """vbusd's side: only a REGISTER is a request."""
    seq, msg = decode(frame, nfds)
    if not isinstance(msg, Register):
        raise ProtocolError(f"{msg.TYPE.name} is not something a VMM sends")
    return seq, msg


def decode_reply(frame: bytes, nfds: int = 0) -> tuple[int, Registered | Error | Faulted]:
    """The VMM's side: REGISTERED, ERROR or FAULTED."""
    seq, msg = decode(frame, nfds)
    if isinstance(msg, Register):
        raise ProtocolError("REGISTER is not something vbusd sends")
    return seq, msg


def _need(body: memoryview, at: int, layout: struct.Struct) -> tuple[int, ...]:
    if len(body) < at + layout.size:
        raise ProtocolError(f"frame body of {len(body)} bytes is too short")
    return layout.unpack_from(body, at)


def _string(body: memoryview, at: int, what: str, limit: int) -> tuple[str, int]:
    (size,) = _need(body, at, _U16)
    if size > limit:
        raise ProtocolError(f"{what} of {size} bytes exceeds the {limit}-byte limit")
    start = at + 2
    if len(body) < start + size:
        raise ProtocolError(f"{what} runs past the end of the frame")
    try:
        return bytes(body[start : start + size]).decode("utf-8"), start + size
    except UnicodeDecodeError:
        raise ProtocolError(f"{what} is not UTF-8") from None


def _end(body: memoryview, end: int) -> None:
    if len(body) != end:
        raise ProtocolError(f"{len(body) - end} trailing bytes after the message")


def _decode_register(body: memoryview, nfds: int) -> Register:
    version, nregions, ndoorbells, nirqs, bridge_gpa, name_len = _need(body, 0, _REGISTER)
    if version != ABI_VERSION:
        raise NotSupported(f"kvm ABI version {version} is not supported (this vbusd speaks 1)")
    problem = _counts_problem(nregions, ndoorbells, nirqs)
    if problem:
        raise ProtocolError(problem)
    if nfds != nregions + ndoorbells + nirqs:
        raise ProtocolError(
            f"REGISTER announces {nregions} regions, {ndoorbells} doorbells and "
            f"{nirqs} interrupts ({nregions + ndoorbells + nirqs} descriptors), {nfds} came"
        )
    start = _REGISTER.size
    if name_len > MAX_NAME or len(body) < start + name_len:
        raise ProtocolError(f"guest name of {name_len} bytes is too long or cut short")
    raw = bytes(body[start : start + name_len])
    problem = _name_problem(raw, "guest name", word=True)
    if problem:
        raise ProtocolError(problem)
    at = start + name_len
    pad = -(HEADER_SIZE + at) % 8
    if len(body) < at + pad or any(body[at : at + pad]):
        raise ProtocolError("nonzero or missing padding after the guest name")
    at += pad
    if len(body) != at + nregions * _REGION.size:
        raise ProtocolError(
            f"REGISTER with {nregions} regions needs {at + nregions * _REGION.size} body "
            f"bytes, {len(body)} came"
        )
    regions = []
    for i in range(nregions):
        gpa, size, offset, flags, zero = _REGION.unpack_from(body, at + i * _REGION.size)
        if flags & ~REGION_READONLY or zero:
            raise ProtocolError(f"region {i}: undefined flags {flags:#x} or nonzero reserved word")
        regions.append(Region(gpa, size, offset, bool(flags & REGION_READONLY)))
    return Register(raw.decode("utf-8"), tuple(regions), ndoorbells, nirqs, bridge_gpa, version)


def check_layout(msg: Register) -> None:
    """What a memory table can get wrong without its files (``Invalid``): each
    region of positive, page-aligned gpa, size and offset, inside 2**64; no
    two regions overlapping in guest-physical space; the bridge page
    page-aligned and inside one writable region."""
    for i, region in enumerate(msg.regions):
        where = f"region {i} [{region.gpa:#x}, +{region.size:#x})"
        if region.size <= 0:
            raise Invalid(f"{where}: empty")
        if (region.gpa | region.size | region.offset) % PAGE_SIZE:
            raise Invalid(
                f"{where}: gpa, size and offset {region.offset:#x} must be {PAGE_SIZE}-byte aligned"
            )
        if region.end > 1 << 64 or region.offset + region.size > 1 << 64:
            raise Invalid(f"{where}: wraps past 2**64")
    order = sorted(range(len(msg.regions)), key=lambda i: msg.regions[i].gpa)
    for prev, cur in pairwise(order):
        a, b = msg.regions[prev], msg.regions[cur]
        if b.gpa < a.end:
            raise Invalid(
                f"regions {prev} [{a.gpa:#x}, +{a.size:#x}) and {cur} "
                f"[{b.gpa:#x}, +{b.size:#x}) overlap"
            )
    bridge = msg.bridge_gpa
    if bridge % PAGE_SIZE:
        raise Invalid(f"bridge page {bridge:#x} is not {PAGE_SIZE}-byte aligned")
    for region in msg.regions:
        if region.gpa <= bridge and bridge + BRIDGE_SIZE <= region.end:
            if region.readonly:
                raise Invalid(f"bridge page {bridge:#x} lies in a read-only region")
            return
    raise Invalid(f"bridge page {bridge:#x} lies outside every region")


# --- the bridge page ---------------------------------------------------------------

BRIDGE_SIZE = 4096
BRIDGE_MAGIC = 0x4B425642
BRIDGE_VERSION = 1
CALL_BASE = 0x040
CALL_SLOTS = 16
CALL_SLOT_SIZE = 64
EVENT_BASE = 0x800
EVENT_SLOTS = 32
EVENT_SLOT_SIZE = 16
MAX_DATA = 4096  # OPEN/CALL data bytes
MAX_REPLY = 65536  # bytes the host may write into a reply buffer
SHM_WRITABLE = 1  # the south fills the queue (rx-like)
SHM_NO_MITIGATION = 2
_SHM_FLAGS = SHM_WRITABLE | SHM_NO_MITIGATION

# u32 word indexes of the header
W_MAGIC, W_VERSION, W_FAULT, W_FAULT_DETAIL = 0, 1, 2, 3
W_CALL_HEAD, W_CALL_TAIL, W_EVENT_HEAD, W_EVENT_TAIL, W_IRQ_ENABLE = 4, 5, 6, 7, 8
_HEADER_WORDS = 16  # 0x000 .. 0x040
_RESERVED = slice(9 * 4, 16 * 4)  # 0x024 .. 0x040: zero

_SLOT = struct.Struct("<IiIIQIIQIIHHIQ")
_EVENT = struct.Struct("<IIII")
_ENTRY = struct.Struct("<IHH")
assert _SLOT.size == CALL_SLOT_SIZE and _EVENT.size == EVENT_SLOT_SIZE


class Op(IntEnum):
    ENUMERATE = 1
    OPEN = 2
    CALL = 3
    SHM = 4
    CLOSE = 5


class EventKind(IntEnum):
    """The userspace protocol's kinds, and LINK (a device was linked to the bus)."""

    FAULT = 1
    DEVICE_REMOVED = 2
    BUS_GONE = 3
    SHUTDOWN = 4
    LINK = 5


_OPS = frozenset(int(op) for op in Op)
_KINDS = frozenset(int(kind) for kind in EventKind)


def call_slot_offset(index: int) -> int:
    """Where call slot ``index % 16`` starts in the bridge page."""
    return CALL_BASE + (index % CALL_SLOTS) * CALL_SLOT_SIZE


def event_slot_offset(index: int) -> int:
    return EVENT_BASE + (index % EVENT_SLOTS) * EVENT_SLOT_SIZE


@dataclass(frozen=True, slots=True)
class CallSlot:
    """One call slot.  The guest fills ``op`` and its arguments; the host
    answers with ``status`` (0 or -errno), ``handle`` (OPEN), ``arg`` (OPEN:
    the device's id on the bus) and ``reply_len``.  Addresses are
    guest-physical; ``tag`` is the guest's own."""

    op: int
    status: int = 0
    handle: int = 0
    arg: int = 0  # OPEN: device id (0: by name); CALL: func; SHM: queue index
    addr: int = 0  # OPEN/CALL data, SHM ring
    len: int = 0  # OPEN/CALL data bytes; SHM descriptor count
    flags: int = 0  # SHM: SHM_WRITABLE, SHM_NO_MITIGATION
    reply: int = 0  # ENUMERATE, CALL reply buffer
    reply_cap: int = 0
    reply_len: int = 0
    doorbell: int = 0  # SHM: the queue's doorbell (1..ndoorbells-1)
    irq: int = 0  # SHM: the queue's interrupt (1..nirqs-1)
    tag: int = 0

    def answer(self, status: int = 0, **fields: int) -> CallSlot:
        """This slot as the host writes it back."""
        return replace(self, status=status, **fields)


def encode_call(slot: CallSlot) -> bytes:
    """The 64 bytes of a slot; ``Invalid`` for a field out of its range."""
    try:
        return _SLOT.pack(
            slot.op,
            slot.status,
            slot.handle,
            slot.arg,
            slot.addr,
            slot.len,
            slot.flags,
            slot.reply,
            slot.reply_cap,
            slot.reply_len,
            slot.doorbell,
            slot.irq,
            slot.tag,
            0,
        )
    except struct.error as exc:
        raise Invalid(f"call slot field out of range: {exc}") from None


def decode_call(raw: bytes | memoryview, index: int = 0) -> CallSlot:
    """The host's reading of a slot snapshot: a known op, the reserved word
    zero, data and reply sizes within the ABI's limits, known SHM flags.
    Anything else is a ``GuestFault`` CALL_RING (detail: the slot's index).
    What the host itself writes (status, reply_len) is not checked."""
    if len(raw) != CALL_SLOT_SIZE:
        raise GuestFault(FaultReason.CALL_RING, index, f"call slot of {len(raw)} bytes")
    f = _SLOT.unpack_from(raw)
    op, length, flags, reply_cap, zero = f[0], f[5], f[6], f[8], f[13]
    where = f"call slot {index & _M32}"
    if op not in _OPS:
        raise GuestFault(FaultReason.CALL_RING, index, f"{where}: unknown op {op}")
    if zero:
        raise GuestFault(FaultReason.CALL_RING, index, f"{where}: nonzero reserved word")
    if op in (Op.OPEN, Op.CALL) and length > MAX_DATA:
        raise GuestFault(
            FaultReason.CALL_RING, index, f"{where}: {length} data bytes exceed {MAX_DATA}"
        )
    if reply_cap > MAX_REPLY:
        raise GuestFault(
            FaultReason.CALL_RING, index, f"{where}: reply_cap {reply_cap} exceeds {MAX_REPLY}"
        )
    if op == Op.SHM and flags & ~_SHM_FLAGS:
        raise GuestFault(FaultReason.CALL_RING, index, f"{where}: undefined SHM flags {flags:#x}")
    return CallSlot(Op(op), *f[1:13])


@dataclass(frozen=True, slots=True)
class Event:
    """An event slot: ``kind``, the handle it is about (0: the whole guest),
    and for FAULT the ``FaultReason``."""

    kind: int
    handle: int = 0
    reason: int = 0


def encode_event(event: Event) -> bytes:
    if event.kind not in _KINDS:
        raise Invalid(f"event kind {event.kind!r} is unknown")
    try:
        return _EVENT.pack(event.kind, event.handle, event.reason, 0)
    except struct.error as exc:
        raise Invalid(f"event field out of range: {exc}") from None


def decode_event(raw: bytes | memoryview) -> Event:
    """The guest's reading of an event slot (ProtocolError on garbage)."""
    if len(raw) != EVENT_SLOT_SIZE:
        raise ProtocolError(f"event slot of {len(raw)} bytes")
    kind, handle, reason, zero = _EVENT.unpack_from(raw)
    if kind not in _KINDS or zero:
        raise ProtocolError(f"event slot of unknown kind {kind} or nonzero reserved word")
    return Event(EventKind(kind), handle, reason)


@dataclass(frozen=True, slots=True)
class DeviceEntry:
    """One device of an ENUMERATE reply: its id on the bus, name and class."""

    id: int
    name: str
    deviceclass: str


def encode_devices(entries: Sequence[DeviceEntry]) -> bytes:
    """ENUMERATE's reply: ``{u32 id, u16 name_len, u16 class_len, name,
    class}`` per device, each padded with zeros to 4 bytes."""
    parts = []
    for entry in entries:
        name = _raw(entry.name, "device name")
        cls = _raw(entry.deviceclass, "device class")
        if len(name) > MAX_NAME or len(cls) > MAX_NAME:
            raise Invalid(f"device {entry.name!r}: name or class over {MAX_NAME} bytes")
        body = _ENTRY.pack(_int(entry.id, 1, _U32_MAX, "device id"), len(name), len(cls))
        body += name + cls
        parts.append(body + bytes(-len(body) % 4))
    return b"".join(parts)


def decode_devices(data: bytes | memoryview) -> tuple[DeviceEntry, ...]:
    """The guest's reading of an ENUMERATE reply (ProtocolError on garbage)."""
    raw = bytes(data)
    out = []
    at = 0
    while at < len(raw):
        if len(raw) < at + _ENTRY.size:
            raise ProtocolError("ENUMERATE entry cut short")
        dev_id, name_len, class_len = _ENTRY.unpack_from(raw, at)
        end = at + _ENTRY.size + name_len + class_len
        padded = end + (-end % 4)
        if dev_id == 0 or name_len > MAX_NAME or class_len > MAX_NAME or padded > len(raw):
            raise ProtocolError("ENUMERATE entry with id 0, an oversized name, or cut short")
        if any(raw[end:padded]):
            raise ProtocolError("nonzero padding in an ENUMERATE entry")
        start = at + _ENTRY.size
        try:
            name = raw[start : start + name_len].decode("utf-8")
            cls = raw[start + name_len : end].decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("ENUMERATE entry is not UTF-8") from None
        out.append(DeviceEntry(dev_id, name, cls))
        at = padded
    return tuple(out)


def format_bridge(buf: SharedBuffer, offset: int = 0) -> None:
    """The guest's first act: a zeroed page with magic and version (no call,
    no event, interrupts off)."""
    if offset < 0 or offset + BRIDGE_SIZE > len(buf):
        raise Invalid(f"a bridge page at {offset:#x} does not fit the memory")
    buf[offset : offset + BRIDGE_SIZE] = bytes(BRIDGE_SIZE)
    struct.pack_into("<II", buf, offset, BRIDGE_MAGIC, BRIDGE_VERSION)


class HostBridge:
    """vbusd's end of one bridge page (``buf[offset : offset + 4096]``).

    The host keeps its own ``call_tail`` and ``event_head`` and rewrites the
    page's copies from them, so a guest scribbling there only confuses
    itself.  Answers are in call-ring order, one slot at a time: ``next()``
    gives the oldest unanswered slot, ``answer()`` completes it.  Every read
    of the guest's words validates them; garbage is a ``GuestFault``.
    """

    def __init__(self, buf: SharedBuffer, offset: int = 0) -> None:
        if offset < 0 or offset + BRIDGE_SIZE > len(buf):
            raise Invalid(f"a bridge page at {offset:#x} does not fit the memory")
        self._buf = buf
        self._at = offset
        self._idx = memoryview(buf)[offset : offset + _HEADER_WORDS * 4].cast("I")
        self.tail = 0  # call slots answered
        self.event_head = 0  # events posted
        self.seen = False  # a valid header was found once (the guest is up)

    def check(self) -> int:
        """Validate the header; how many call slots wait (0..16)."""
        at = self._at
        head = bytes(self._buf[at : at + _HEADER_WORDS * 4])
        magic, version = struct.unpack_from("<II", head)
        if magic != BRIDGE_MAGIC:
            raise GuestFault(FaultReason.BRIDGE, 0, f"bridge page: bad magic {magic:#010x}")
        if version != BRIDGE_VERSION:
            raise GuestFault(FaultReason.BRIDGE, 0, f"bridge page: unsupported version {version}")
        if any(head[_RESERVED]):
            raise GuestFault(FaultReason.BRIDGE, 0, "bridge page: nonzero reserved words")
        call_head, _tail, _ehead, event_tail, irq = struct.unpack_from("<IIIII", head, 0x10)
        if irq > 1:
            raise GuestFault(
                FaultReason.BRIDGE, irq, f"bridge page: irq_enable {irq} is not 0 or 1"
            )
        if (self.event_head - event_tail) & _M32 > EVENT_SLOTS:
            raise GuestFault(
                FaultReason.BRIDGE,
                event_tail,
                f"bridge page: event_tail {event_tail} is not within {EVENT_SLOTS} of "
                f"event_head {self.event_head}",
            )
        waiting = (call_head - self.tail) & _M32
        if waiting > CALL_SLOTS:
            raise GuestFault(
                FaultReason.CALL_RING,
                call_head,
                f"call ring: call_head {call_head} is {waiting} slots ahead of "
                f"call_tail {self.tail} (at most {CALL_SLOTS})",
            )
        self.seen = True
        return int(waiting)

    @property
    def call_head(self) -> int:
        return int(self._idx[W_CALL_HEAD])

    @property
    def irq_enabled(self) -> bool:
        return self._idx[W_IRQ_ENABLE] == 1

    def next(self) -> CallSlot | None:
        """The oldest unanswered slot (a validated snapshot), or None."""
        if not self.check():
            return None
        start = self._at + call_slot_offset(self.tail)
        return decode_call(bytes(self._buf[start : start + CALL_SLOT_SIZE]), self.tail)

    def answer(self, slot: CallSlot) -> None:
        """Write ``slot`` (``next()``'s, answered) back and publish ``call_tail``."""
        start = self._at + call_slot_offset(self.tail)
        self._buf[start : start + CALL_SLOT_SIZE] = encode_call(slot)
        self.tail = (self.tail + 1) & _M32
        self._idx[W_CALL_TAIL] = self.tail  # after the slot stores (x86 TSO)

    def post_event(self, event: Event) -> bool:
        """Post an event; False when the guest has left all 32 slots unread."""
        event_tail = self._idx[W_EVENT_TAIL]
        used = (self.event_head - event_tail) & _M32
        if used > EVENT_SLOTS:
            raise GuestFault(
                FaultReason.BRIDGE, event_tail, f"bridge page: event_tail {event_tail} is garbage"
            )
        if used == EVENT_SLOTS:
            return False
        start = self._at + event_slot_offset(self.event_head)
        self._buf[start : start + EVENT_SLOT_SIZE] = encode_event(event)
        self.event_head = (self.event_head + 1) & _M32
        self._idx[W_EVENT_HEAD] = self.event_head
        return True

    def set_fault(self, reason: FaultReason, detail: int) -> None:
        """The fault register: the detail first, then the (sticky) reason."""
        self._idx[W_FAULT_DETAIL] = detail & _M32
        self._idx[W_FAULT] = int(reason)

    def close(self) -> None:
        """Release the view of the page (the mapping can then be unmapped)."""
        self._idx.release()


class GuestBridge:
    """The guest's end of a bridge page: posts call slots, reaps answers in
    order, consumes events, reads the fault register.  Formats the page
    unless ``format=False``."""

    def __init__(self, buf: SharedBuffer, offset: int = 0, *, format: bool = True) -> None:
        if format:
            format_bridge(buf, offset)
        elif offset < 0 or offset + BRIDGE_SIZE > len(buf):
            raise Invalid(f"a bridge page at {offset:#x} does not fit the memory")
        self._buf = buf
        self._at = offset
        self._idx = memoryview(buf)[offset : offset + _HEADER_WORDS * 4].cast("I")
        self.head = self._idx[W_CALL_HEAD]
        self.reaped = self.head
        self.event_tail = self._idx[W_EVENT_TAIL]

    def post(self, slot: CallSlot) -> int:
        """Write ``slot`` into the next free call slot and publish ``call_head``;
        its index.  ``Busy`` with 16 unreaped.  (Then ring doorbell 0.)"""
        if (self.head - self.reaped) & _M32 >= CALL_SLOTS:
            raise Busy("all 16 call slots are in flight")
        start = self._at + call_slot_offset(self.head)
        self._buf[start : start + CALL_SLOT_SIZE] = encode_call(slot)
        index = self.head
        self.head = (self.head + 1) & _M32
        self._idx[W_CALL_HEAD] = self.head
        return index

    def answered(self) -> int:
        """Slots the host answered that are not reaped yet."""
        return (self._idx[W_CALL_TAIL] - self.reaped) & _M32

    def reap(self) -> CallSlot | None:
        """The oldest answered slot, as the host wrote it back, or None."""
        if not self.answered():
            return None
        start = self._at + call_slot_offset(self.reaped)
        f = _SLOT.unpack_from(bytes(self._buf[start : start + CALL_SLOT_SIZE]))
        self.reaped = (self.reaped + 1) & _M32
        return CallSlot(*f[:13])

    def events(self) -> list[Event]:
        """Events posted since the last call, consumed (``event_tail`` published)."""
        head = self._idx[W_EVENT_HEAD]
        out: list[Event] = []
        while self.event_tail != head and len(out) < EVENT_SLOTS:
            start = self._at + event_slot_offset(self.event_tail)
            out.append(decode_event(bytes(self._buf[start : start + EVENT_SLOT_SIZE])))
            self.event_tail = (self.event_tail + 1) & _M32
        self._idx[W_EVENT_TAIL] = self.event_tail
        return out

    @property
    def fault(self) -> tuple[int, int]:
        """(reason, detail) of the fault register; reason 0: not faulted."""
        return int(self._idx[W_FAULT]), int(self._idx[W_FAULT_DETAIL])

    @property
    def irq_enable(self) -> bool:
        return bool(self._idx[W_IRQ_ENABLE])

    @irq_enable.setter
    def irq_enable(self, on: bool) -> None:
        self._idx[W_IRQ_ENABLE] = 1 if on else 0

    def close(self) -> None:
        self._idx.release()
