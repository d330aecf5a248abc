"""The vhost-user wire protocol, back-end side, without IO (docs/design.md 4.7).

The front-end (a VMM such as QEMU) sends requests on a Unix stream socket:
a 12-byte header (u32 request, u32 flags, u32 size, machine byte order) and
``size`` bytes of payload, file descriptors in the ancillary data of the
header's first byte.  ``Parser`` cuts the byte stream into ``Message``s;
``Backend`` holds the session's negotiated state and turns each message into
``Effect``s for the connector to carry out (map this memory table, take this
kick eventfd, start or stop this ring) and the replies to send.  Sockets,
mappings and eventfds live in the connector; everything here is a plain
unit test and a fuzz target (``vbus.soak.fuzz``: ``vhost_wire``).

Theory of operation.  Every message is validated before anything changes:
its size is exactly its type's (a memory table: exactly its regions), its
descriptor count is exactly what the type carries, indexes name an existing
ring, a ring size is a power of two of at most 32768, a memory table has
1..``MAX_REGIONS`` non-overlapping regions that do not wrap (in guest and
in user addresses), and ring addresses lie, aligned, inside one region of
the table.  What fails is refused: a ``Refused`` effect carries the reason,
and with REPLY_ACK and need_reply the front-end gets a non-zero ack (the
session state is unchanged); a refused message the front-end expects no
answer to cannot be reported on the wire, so the session closes
(``ProtocolError``).  A malformed stream (a bad version, a reply flag, an
oversized payload) is a ``ProtocolError``: the connector hangs up.
Requests the back-end does not implement are refused the same way; a
``GET_*`` request whose reply it cannot give closes the session rather than
leaving the front-end waiting for an answer that never comes.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Final

from vbus.errors import ProtocolError

__all__ = [
    "F_PROTOCOL_FEATURES",
    "HEADER",
    "MAX_PAYLOAD",
    "MAX_REGIONS",
    "MAX_RING",
    "PROTOCOL_FEATURES",
    "Ack",
    "Backend",
    "Effect",
    "Enable",
    "Features",
    "MemTable",
    "Message",
    "P",
    "Parser",
    "Refused",
    "Region",
    "Reply",
    "Request",
    "Reset",
    "Ring",
    "SetCall",
    "SetErr",
    "SetKick",
    "StartRing",
    "Status",
    "StopRing",
    "config_request",
    "encode",
    "mem_table",
    "parse_reply",
    "request",
    "u64",
    "vring_addr",
    "vring_state",
]

HEADER: Final = struct.Struct("=III")
VERSION: Final = 0x1
FLAG_VERSION_MASK: Final = 0x3
FLAG_REPLY: Final = 0x4
FLAG_NEED_REPLY: Final = 0x8
MAX_PAYLOAD: Final = 4096  # the largest request taken is a 264-byte memory table
MAX_FDS: Final = 8  # VHOST_MEMORY_BASELINE_NREGIONS: no request carries more
MAX_REGIONS: Final = 8
MAX_RING: Final = 32768  # the largest split virtqueue (virtio 1.x: Queue Size <= 32768)
MAX_CONFIG: Final = 256  # QEMU's VHOST_USER_MAX_CONFIG_SIZE
F_PROTOCOL_FEATURES: Final = 1 << 30  # VHOST_USER_F_PROTOCOL_FEATURES
F_LOG_ALL: Final = 1 << 26  # VHOST_F_LOG_ALL: migration dirty logging, not offered
VRING_NOFD: Final = 0x100  # SET_VRING_KICK/CALL/ERR: no descriptor, poll instead
VRING_INDEX: Final = 0xFF
STATUS_NEEDS_RESET: Final = 0x40  # virtio device status: DEVICE_NEEDS_RESET


class Request(IntEnum):
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


class P:
    """Protocol feature bits (VHOST_USER_PROTOCOL_F_*) this back-end knows."""

    MQ: Final = 1 << 0
    REPLY_ACK: Final = 1 << 3
    CONFIG: Final = 1 << 9
    RESET_DEVICE: Final = 1 << 13
    STATUS: Final = 1 << 16


PROTOCOL_FEATURES: Final = P.MQ | P.REPLY_ACK | P.CONFIG | P.RESET_DEVICE | P.STATUS

_U64: Final = struct.Struct("=Q")
_STATE: Final = struct.Struct("=II")
_ADDR: Final = struct.Struct("=IIQQQQ")
_MEM_HEAD: Final = struct.Struct("=II")
_REGION: Final = struct.Struct("=QQQQ")
_CONFIG_HEAD: Final = struct.Struct("=III")

# Requests whose reply is their own payload: without it the front-end waits forever.
_GETTERS: Final = frozenset(
    {
        Request.GET_FEATURES,
        Request.GET_PROTOCOL_FEATURES,
        Request.GET_VRING_BASE,
        Request.GET_QUEUE_NUM,
        Request.GET_CONFIG,
        Request.GET_STATUS,
        Request.GET_INFLIGHT_FD,
        Request.GET_MAX_MEM_SLOTS,
        Request.POSTCOPY_ADVISE,
        Request.POSTCOPY_END,
        Request.CREATE_CRYPTO_SESSION,
        Request.IOTLB_MSG,
    }
)


@dataclass(frozen=True, slots=True)
class Message:
    """One request as it came: ``request`` may be a number no table knows."""

    request: int
    flags: int
    payload: bytes
    fds: tuple[int, ...] = ()

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)


def encode(request: int, payload: bytes = b"", flags: int = VERSION) -> bytes:
    """A message as it goes on the wire (a reply: ``flags=VERSION | FLAG_REPLY``)."""
    return HEADER.pack(request, flags, len(payload)) + payload


def _reply(request: int, payload: bytes) -> Reply:
    return Reply(HEADER.pack(request, VERSION | FLAG_REPLY, len(payload)) + payload)


class Parser:
    """Cuts the stream into messages.  Descriptors received with a chunk
    belong to the message in progress.  A reader keeps that true by never
    reading past a message: ``wanted()`` says how many bytes complete the
    current header or payload (the kernel stops a stream read after the
    part of a sendmsg that carried descriptors, and a front-end sends each
    message with one sendmsg, its descriptors with it)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._fds: list[int] = []
        self.closed = False

    def feed(self, data: bytes, fds: Sequence[int] = ()) -> list[Message]:
        """Take a chunk; the messages it completes.  ``ProtocolError`` for a
        broken stream: every descriptor held is then in ``take_fds()``."""
        self._fds.extend(fds)  # held from here on: closed or not, take_fds() has them
        if self.closed:
            raise ProtocolError("the vhost-user stream is closed")
        self._buf += data
        out: list[Message] = []
        buf = self._buf
        while len(buf) >= HEADER.size:
            request, flags, size = HEADER.unpack_from(buf)
            if flags & FLAG_VERSION_MASK != VERSION:
                self.closed = True
                raise ProtocolError(f"vhost-user version {flags & FLAG_VERSION_MASK} (only 1)")
            if flags & FLAG_REPLY:
                self.closed = True
                raise ProtocolError("a reply sent to the back-end")
            if flags & ~(FLAG_VERSION_MASK | FLAG_NEED_REPLY):
                self.closed = True
                raise ProtocolError(f"unknown header flags {flags:#x}")
            if size > MAX_PAYLOAD:
                self.closed = True
                raise ProtocolError(f"payload of {size} bytes (at most {MAX_PAYLOAD})")
            if len(self._fds) > MAX_FDS:
                self.closed = True
                raise ProtocolError(f"{len(self._fds)} descriptors with one message")
            end = HEADER.size + size
            if len(buf) < end:
                break
            out.append(Message(request, flags, bytes(buf[HEADER.size : end]), tuple(self._fds)))
            self._fds = []
            del buf[:end]
        if len(self._fds) > MAX_FDS:
            self.closed = True
            raise ProtocolError(f"{len(self._fds)} descriptors with one message")
        return out

    def wanted(self) -> int:
        """Bytes that complete the header, or the payload, of the message in progress."""
        have = len(self._buf)
        if have < HEADER.size:
            return HEADER.size - have
        size: int = HEADER.unpack_from(self._buf)[2]
        return max(1, HEADER.size + min(size, MAX_PAYLOAD) - have)

    def take_fds(self) -> list[int]:
        """Descriptors received for a message not complete yet (to close)."""
        fds, self._fds = self._fds, []
        return fds


# --- what the connector is asked to do -----------------------------------------------


@dataclass(frozen=True, slots=True)
class Region:
    """One region of a memory table: guest-physical base, size, the
    front-end's user address of it, and where it starts in its file."""

    guest: int
    size: int
    user: int
    offset: int

    def user_to_guest(self, addr: int, length: int) -> int | None:
        if self.user <= addr and addr + length <= self.user + self.size:
            return addr - self.user + self.guest
        return None


@dataclass(frozen=True, slots=True)
class Ring:
    """A ring as the front-end set it up, its addresses guest-physical."""

    index: int
    num: int
    desc: int
    avail: int
    used: int
    base: int  # next avail index to consume (SET_VRING_BASE)


@dataclass(frozen=True, slots=True)
class Reply:
    data: bytes


@dataclass(frozen=True, slots=True)
class Ack:
    """REPLY_ACK: after the effects before it, answer 0 if they all
    succeeded, else non-zero (``Backend.ack``)."""

    request: int


@dataclass(frozen=True, slots=True)
class Refused:
    request: int
    reason: str


@dataclass(frozen=True, slots=True)
class Features:
    features: int


@dataclass(frozen=True, slots=True)
class MemTable:
    regions: tuple[Region, ...]
    fds: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class SetKick:
    index: int
    fd: int | None


@dataclass(frozen=True, slots=True)
class SetCall:
    index: int
    fd: int | None


@dataclass(frozen=True, slots=True)
class SetErr:
    index: int
    fd: int | None


@dataclass(frozen=True, slots=True)
class StartRing:
    ring: Ring


@dataclass(frozen=True, slots=True)
class StopRing:
    """Stop the ring; the connector answers with ``Backend.stopped(index, next_avail)``
    when ``reply`` (GET_VRING_BASE), else just stops it."""

    index: int
    reply: bool


@dataclass(frozen=True, slots=True)
class Enable:
    index: int
    enabled: bool


@dataclass(frozen=True, slots=True)
class Status:
    status: int


@dataclass(frozen=True, slots=True)
class Reset:
    """Stop every ring and forget the device state (RESET_OWNER, RESET_DEVICE)."""


Effect = (
    Reply
    | Ack
    | Refused
    | Features
    | MemTable
    | SetKick
    | SetCall
    | SetErr
    | StartRing
    | StopRing
    | Enable
    | Status
    | Reset
)


class _Refuse(Exception):
    """A request refused: the reason, turned into an effect at one place."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(slots=True)
class _RingState:
    num: int = 0
    addr: tuple[int, int, int] | None = None  # desc, avail, used: user addresses
    base: int = 0
    kick: bool = False  # a kick descriptor (or polling) was given
    started: bool = False
    enabled: bool = False


@dataclass(slots=True)
class Backend:
    """The back-end's side of one vhost-user session.

    ``features`` are the virtio feature bits offered (device and ring bits;
    ``F_PROTOCOL_FEATURES`` is added), ``config`` the device's config space,
    ``queues`` the number of virtqueues.  ``handle`` takes one message and
    returns its effects in order; ``ProtocolError`` means hang up."""

    features: int
    config: bytes = b""
    queues: int = 2
    protocol_features: int = PROTOCOL_FEATURES
    acked_features: int = 0
    acked_protocol: int = 0
    features_set: bool = False
    protocol_set: bool = False  # SET_PROTOCOL_FEATURES came
    owner: bool = False
    status: int = 0
    regions: tuple[Region, ...] = ()
    rings: list[_RingState] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.features |= F_PROTOCOL_FEATURES
        if not self.config:
            self.protocol_features &= ~P.CONFIG
        self.rings = [_RingState() for _ in range(self.queues)]

    # --- the public face ----------------------------------------------------------
    def handle(self, msg: Message) -> list[Effect]:
        """Validate ``msg`` and say what to do.  Descriptors of ``msg`` not
        named by an effect are the caller's to close."""
        effects: list[Effect] = []
        try:
            self._dispatch(msg, effects)
        except _Refuse as refusal:
            request = msg.request
            if request in _GETTERS:
                raise ProtocolError(f"request {_name(request)}: {refusal.reason}") from None
            if not (msg.need_reply and self.acked_protocol & P.REPLY_ACK):
                raise ProtocolError(f"request {_name(request)}: {refusal.reason}") from None
            return [Refused(request, refusal.reason), _reply(request, _U64.pack(1))]
        if (
            msg.need_reply
            and self.acked_protocol & P.REPLY_ACK
            and not any(isinstance(e, Reply) for e in effects)
            and not any(isinstance(e, StopRing) and e.reply for e in effects)
        ):
            effects.append(Ack(msg.request))
        return effects

    def ack(self, request: int, ok: bool) -> bytes:
        """The REPLY_ACK answer to ``request``: 0 if its effects succeeded."""
        return _reply(request, _U64.pack(0 if ok else 1)).data

    def stopped(self, index: int, next_avail: int) -> bytes:
        """The GET_VRING_BASE reply once the connector stopped ring ``index``."""
        ring = self.rings[index]
        ring.base = next_avail & 0xFFFF
        return _reply(Request.GET_VRING_BASE, _STATE.pack(index, next_avail & 0xFFFF)).data

    def memory_failed(self) -> None:
        """The connector could not map the last table: there is none."""
        self.regions = ()

    def needs_reset(self) -> None:
        """A ring was faulted: DEVICE_NEEDS_RESET in GET_STATUS from now on."""
        self.status |= STATUS_NEEDS_RESET

    @property
    def protocol_negotiated(self) -> bool:
        """VHOST_USER_F_PROTOCOL_FEATURES is in force: acked in SET_FEATURES,
        or the front-end already used it (QEMU enables rings with
        SET_VRING_ENABLE after SET_PROTOCOL_FEATURES, before SET_FEATURES)."""
        return self.protocol_set or bool(self.acked_features & F_PROTOCOL_FEATURES)

    @property
    def reports_status(self) -> bool:
        return bool(self.acked_protocol & P.STATUS)

    # --- dispatch -------------------------------------------------------------------
    def _dispatch(self, msg: Message, effects: list[Effect]) -> None:
        request = msg.request
        handler = _HANDLERS.get(request)
        if handler is None:
            raise _Refuse("not supported by this back-end")
        nfds = _FD_COUNT.get(request, 0)
        if request in (Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR):
            self._size(msg, _U64.size)
            nfds = 0 if _U64.unpack(msg.payload)[0] & VRING_NOFD else 1
        elif request == Request.SET_MEM_TABLE and len(msg.payload) >= _MEM_HEAD.size:
            nfds = _MEM_HEAD.unpack_from(msg.payload)[0]
        if len(msg.fds) != nfds:
            raise _Refuse(f"{len(msg.fds)} file descriptors, expected {nfds}")
        handler(self, msg, effects)

    @staticmethod
    def _size(msg: Message, size: int) -> None:
        if len(msg.payload) != size:
            raise _Refuse(f"payload of {len(msg.payload)} bytes, expected {size}")

    def _ring(self, index: int) -> _RingState:
        if not 0 <= index < self.queues:
            raise _Refuse(f"no virtqueue {index} (the device has {self.queues})")
        return self.rings[index]

    def _u64(self, msg: Message) -> int:
        self._size(msg, _U64.size)
        value: int = _U64.unpack(msg.payload)[0]
        return value

    def _state(self, msg: Message) -> tuple[int, int]:
        self._size(msg, _STATE.size)
        index, num = _STATE.unpack(msg.payload)
        return index, num

    # --- handlers ---------------------------------------------------------------------
    def _get_features(self, msg: Message, effects: list[Effect]) -> None:
        self._size(msg, 0)
        effects.append(_reply(msg.request, _U64.pack(self.features)))

    def _set_features(self, msg: Message, effects: list[Effect]) -> None:
        features = self._u64(msg)
        extra = features & ~self.features
        if extra:
            raise _Refuse(f"feature bits {extra:#x} were not offered")
        if any(r.started for r in self.rings) and features != self.acked_features:
            raise _Refuse("features change only while every ring is stopped")
        self.acked_features = features
        self.features_set = True
        effects.append(Features(features))

    def _get_protocol_features(self, msg: Message, effects: list[Effect]) -> None:
        self._size(msg, 0)
        effects.append(_reply(msg.request, _U64.pack(self.protocol_features)))

    def _set_protocol_features(self, msg: Message, effects: list[Effect]) -> None:
        features = self._u64(msg)
        extra = features & ~self.protocol_features
        if extra:
            raise _Refuse(f"protocol feature bits {extra:#x} were not offered")
        self.acked_protocol = features
        self.protocol_set = True

    def _set_owner(self, msg: Message, effects: list[Effect]) -> None:
        self._size(msg, 0)
        self.owner = True

    def _reset(self, msg: Message, effects: list[Effect]) -> None:
        self._size(msg, 0)
        if msg.request == Request.RESET_DEVICE and not self.acked_protocol & P.RESET_DEVICE:
            raise _Refuse("RESET_DEVICE without its protocol feature")
        for ring in self.rings:
            ring.started = False
            ring.kick = False
            ring.enabled = not self.protocol_negotiated
        self.status = 0
        effects.append(Reset())

    def _get_queue_num(self, msg: Message, effects: list[Effect]) -> None:
        self._size(msg, 0)
        if not self.acked_protocol & P.MQ:
            raise _Refuse("GET_QUEUE_NUM without the MQ protocol feature")
        effects.append(_reply(msg.request, _U64.pack(self.queues)))

    def _set_mem_table(self, msg: Message, effects: list[Effect]) -> None:
        payload = msg.payload
        if len(payload) < _MEM_HEAD.size:
            raise _Refuse("memory table shorter than its header")
        count, _padding = _MEM_HEAD.unpack_from(payload)
        if not 1 <= count <= MAX_REGIONS:
            raise _Refuse(f"{count} memory regions (1..{MAX_REGIONS})")
        # QEMU sends the table's full 8 slots; a table of exactly its regions is the same table.
        sizes = (_MEM_HEAD.size + count * _REGION.size, _MEM_HEAD.size + MAX_REGIONS * _REGION.size)
        if len(payload) not in sizes:
            raise _Refuse(f"memory table of {len(payload)} bytes for {count} regions")
        regions = tuple(
            Region(*_REGION.unpack_from(payload, _MEM_HEAD.size + i * _REGION.size))
            for i in range(count)
        )
        check_regions(regions)
        for index, ring in enumerate(self.rings):
            if ring.started and ring.addr is not None:
                self._translate(regions, index, ring.num, ring.addr)
        self.regions = regions
        effects.append(MemTable(regions, msg.fds))

    def _set_vring_num(self, msg: Message, effects: list[Effect]) -> None:
        index, num = self._state(msg)
        ring = self._ring(index)
        if ring.started:
            raise _Refuse(f"ring {index} is started: its size is fixed")
        if not 0 < num <= MAX_RING or num & (num - 1):
            raise _Refuse(f"ring size {num}: a power of two of at most {MAX_RING}")
        ring.num = num

    def _set_vring_addr(self, msg: Message, effects: list[Effect]) -> None:
        self._size(msg, _ADDR.size)
        index, flags, desc, used, avail, _log = _ADDR.unpack(msg.payload)
        ring = self._ring(index)
        if flags & ~1:
            raise _Refuse(f"ring {index}: unknown address flags {flags:#x}")
        if flags & 1:
            raise _Refuse("dirty logging (VHOST_VRING_F_LOG) is not supported")
        if ring.started:
            raise _Refuse(f"ring {index} is started: its addresses are fixed")
        if not ring.num:
            raise _Refuse(f"ring {index}: addresses before the ring size")
        self._translate(self.regions, index, ring.num, (desc, avail, used))
        ring.addr = (desc, avail, used)

    def _set_vring_base(self, msg: Message, effects: list[Effect]) -> None:
        index, base = self._state(msg)
        ring = self._ring(index)
        if ring.started:
            raise _Refuse(f"ring {index} is started: its base is fixed")
        if base > 0xFFFF:
            raise _Refuse(f"ring {index}: base {base} is not a 16-bit index")
        ring.base = base

    def _get_vring_base(self, msg: Message, effects: list[Effect]) -> None:
        index, _num = self._state(msg)
        ring = self._ring(index)
        was = ring.started
        ring.started = False
        ring.kick = False
        if was:
            effects.append(StopRing(index, reply=True))
        else:
            effects.append(_reply(msg.request, _STATE.pack(index, ring.base)))

    def _set_vring_fd(self, msg: Message, effects: list[Effect]) -> None:
        value = _U64.unpack(msg.payload)[0]
        if value & ~(VRING_INDEX | VRING_NOFD):
            raise _Refuse(f"unknown bits in {value:#x}")
        index = value & VRING_INDEX
        ring = self._ring(index)
        fd = None if value & VRING_NOFD else msg.fds[0]
        if msg.request == Request.SET_VRING_CALL:
            effects.append(SetCall(index, fd))
            return
        if msg.request == Request.SET_VRING_ERR:
            effects.append(SetErr(index, fd))
            return
        if fd is None:
            raise _Refuse("polled rings (no kick descriptor) are not supported")
        if ring.started:
            effects.append(SetKick(index, fd))
            return
        if ring.addr is None or not ring.num:
            raise _Refuse(f"ring {index}: a kick before its size and addresses")
        desc, avail, used = self._translate(self.regions, index, ring.num, ring.addr)
        ring.kick = True
        ring.started = True
        if not self.protocol_negotiated:
            ring.enabled = True
        effects.append(SetKick(index, fd))
        effects.append(StartRing(Ring(index, ring.num, desc, avail, used, ring.base)))

    def _set_vring_enable(self, msg: Message, effects: list[Effect]) -> None:
        index, num = self._state(msg)
        ring = self._ring(index)
        if not self.protocol_negotiated:
            raise _Refuse("SET_VRING_ENABLE without VHOST_USER_F_PROTOCOL_FEATURES")
        if num > 1:
            raise _Refuse(f"ring {index}: enable {num} is neither 0 nor 1")
        ring.enabled = bool(num)
        effects.append(Enable(index, ring.enabled))

    def _get_config(self, msg: Message, effects: list[Effect]) -> None:
        payload = msg.payload
        if not self.acked_protocol & P.CONFIG:
            raise _Refuse("GET_CONFIG without the CONFIG protocol feature")
        if len(payload) < _CONFIG_HEAD.size:
            raise _Refuse("config request shorter than its header")
        offset, size, flags = _CONFIG_HEAD.unpack_from(payload)
        if len(payload) != _CONFIG_HEAD.size + size:
            raise _Refuse(f"config request of {len(payload)} bytes for {size} bytes of config")
        if offset + size > MAX_CONFIG or size == 0:
            # Zero bytes of payload is how the spec says "no".
            effects.append(_reply(msg.request, _CONFIG_HEAD.pack(offset, 0, flags)))
            return
        space = self.config.ljust(MAX_CONFIG, b"\0")
        effects.append(
            _reply(
                msg.request, _CONFIG_HEAD.pack(offset, size, flags) + space[offset : offset + size]
            )
        )

    def _set_config(self, msg: Message, effects: list[Effect]) -> None:
        raise _Refuse("the config space is read-only")

    def _set_status(self, msg: Message, effects: list[Effect]) -> None:
        status = self._u64(msg)
        if not self.acked_protocol & P.STATUS:
            raise _Refuse("SET_STATUS without the STATUS protocol feature")
        if status > 0xFF:
            raise _Refuse(f"device status {status:#x} is not 8 bits")
        # NEEDS_RESET is the device's to set; writing 0 resets it.
        self.status = (status & ~STATUS_NEEDS_RESET) | (
            self.status & STATUS_NEEDS_RESET if status else 0
        )
        effects.append(Status(self.status))

    def _get_status(self, msg: Message, effects: list[Effect]) -> None:
        self._size(msg, 0)
        if not self.acked_protocol & P.STATUS:
            raise _Refuse("GET_STATUS without the STATUS protocol feature")
        effects.append(_reply(msg.request, _U64.pack(self.status)))

    def _ignored(self, msg: Message, effects: list[Effect]) -> None:
        """Requests this back-end may take and do nothing about."""

    # --- ring addresses ---------------------------------------------------------
    @staticmethod
    def _translate(
        regions: Sequence[Region], index: int, num: int, addr: tuple[int, int, int]
    ) -> tuple[int, int, int]:
        """The ring's user addresses as guest-physical ones, each part
        aligned and inside one region (``_Refuse`` otherwise)."""
        if not regions:
            raise _Refuse(f"ring {index}: addresses before a memory table")
        desc, avail, used = addr
        parts = (
            ("descriptor table", desc, 16 * num, 16),
            ("available ring", avail, 6 + 2 * num, 2),
            ("used ring", used, 6 + 8 * num, 4),
        )
        out = []
        for name, user, length, align in parts:
            if user % align:
                raise _Refuse(f"ring {index}: {name} at {user:#x} is not {align}-byte aligned")
            for region in regions:
                guest = region.user_to_guest(user, length)
                if guest is not None:
                    out.append(guest)
                    break
            else:
                raise _Refuse(
                    f"ring {index}: {name} [{user:#x}, +{length:#x}) is outside the memory table"
                )
        return out[0], out[1], out[2]


def check_regions(regions: Sequence[Region]) -> None:
    """Positive sizes, no wrap past 2**64, no overlap in guest or user
    addresses, 4 KiB-aligned file offsets (``_Refuse`` says which)."""
    for i, r in enumerate(regions):
        if r.size <= 0:
            raise _Refuse(f"memory region {i} is empty")
        for what, base in (("guest", r.guest), ("user", r.user), ("file", r.offset)):
            if base + r.size > 1 << 64:
                raise _Refuse(f"memory region {i}: its {what} range wraps past 2**64")
        if r.offset % 4096:
            raise _Refuse(f"memory region {i}: file offset {r.offset:#x} is not page aligned")
    for key in ("guest", "user"):
        spans = sorted((getattr(r, key), r.size, i) for i, r in enumerate(regions))
        for (a, size, i), (b, _size, j) in itertools.pairwise(spans):
            if a + size > b:
                raise _Refuse(f"memory regions {i} and {j} overlap in {key} addresses")


_HANDLERS: dict[int, Callable[[Backend, Message, list[Effect]], None]] = {
    Request.GET_FEATURES: Backend._get_features,
    Request.SET_FEATURES: Backend._set_features,
    Request.GET_PROTOCOL_FEATURES: Backend._get_protocol_features,
    Request.SET_PROTOCOL_FEATURES: Backend._set_protocol_features,
    Request.SET_OWNER: Backend._set_owner,
    Request.RESET_OWNER: Backend._reset,
    Request.RESET_DEVICE: Backend._reset,
    Request.GET_QUEUE_NUM: Backend._get_queue_num,
    Request.SET_MEM_TABLE: Backend._set_mem_table,
    Request.SET_VRING_NUM: Backend._set_vring_num,
    Request.SET_VRING_ADDR: Backend._set_vring_addr,
    Request.SET_VRING_BASE: Backend._set_vring_base,
    Request.GET_VRING_BASE: Backend._get_vring_base,
    Request.SET_VRING_KICK: Backend._set_vring_fd,
    Request.SET_VRING_CALL: Backend._set_vring_fd,
    Request.SET_VRING_ERR: Backend._set_vring_fd,
    Request.SET_VRING_ENABLE: Backend._set_vring_enable,
    Request.GET_CONFIG: Backend._get_config,
    Request.SET_CONFIG: Backend._set_config,
    Request.SET_STATUS: Backend._set_status,
    Request.GET_STATUS: Backend._get_status,
}

_FD_COUNT: dict[int, int] = {
    Request.SET_VRING_KICK: 1,
    Request.SET_VRING_CALL: 1,
    Request.SET_VRING_ERR: 1,
}


def _name(request: int) -> str:
    try:
        return Request(request).name
    except ValueError:
        return f"#{request}"


# --- the front-end's encoders (tests, the soak, a Python front-end) -----------------------


def request(req: int, payload: bytes = b"", *, need_reply: bool = False) -> bytes:
    """A request as a front-end sends it."""
    return encode(req, payload, VERSION | (FLAG_NEED_REPLY if need_reply else 0))


def u64(value: int) -> bytes:
    return _U64.pack(value)


def vring_state(index: int, num: int) -> bytes:
    return _STATE.pack(index, num)


def vring_addr(index: int, desc: int, used: int, avail: int, flags: int = 0) -> bytes:
    return _ADDR.pack(index, flags, desc, used, avail, 0)


def mem_table(regions: Sequence[Region], *, slots: int = MAX_REGIONS) -> bytes:
    """A SET_MEM_TABLE payload padded to ``slots`` regions, as QEMU sends it."""
    body = b"".join(_REGION.pack(r.guest, r.size, r.user, r.offset) for r in regions)
    return _MEM_HEAD.pack(len(regions), 0) + body.ljust(slots * _REGION.size, b"\0")


def config_request(offset: int, size: int, flags: int = 0) -> bytes:
    return _CONFIG_HEAD.pack(offset, size, flags) + bytes(size)


def parse_reply(data: bytes) -> tuple[int, bytes]:
    """A reply's request and payload (the front-end's side; ``ProtocolError`` if bad)."""
    if len(data) < HEADER.size:
        raise ProtocolError("short reply")
    req, flags, size = HEADER.unpack_from(data)
    if flags != VERSION | FLAG_REPLY or len(data) != HEADER.size + size:
        raise ProtocolError("malformed reply")
    return req, data[HEADER.size :]
