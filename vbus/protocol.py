"""The userspace wire protocol, sans-IO: frames (bytes) in, typed messages out, and back.

No sockets, no asyncio, no file descriptors here.  The transport (AF_UNIX
SOCK_SEQPACKET, one datagram = one frame, fds beside it with SCM_RIGHTS) lives
in the userspace connector and the client library; they tell :func:`decode`
how many fds arrived with a frame and keep ownership of them.

Frame (all little-endian), at most ``MAX_FRAME`` = 65536 bytes in total::

    offset size field
    0      u8   version   WIRE_VERSION (1)
    1      u8   type      MessageType
    2      u16  flags     0
    4      u32  seq       chosen by the client; replies echo it; EVENTs use 0
    8      u32  length    payload bytes, = len(frame) - 16
    12     u32  reserved  0
    16     ...  payload

Strings are a u16 byte length + UTF-8 (names: 64 bytes, no NUL; texts: 1024).
Payloads have no trailing bytes, except that ``data`` takes the rest.

==  =========  ===  =====================================================  ===
#   type       dir  payload                                                fds
==  =========  ===  =====================================================  ===
1   HELLO      c>s  u16 min_version, u16 max_version, str name             0
2   WELCOME    s>c  u16 version, u32 client_id, str bus                    0
3   ENUMERATE  c>s  (empty)                                                0
4   DEVICES    s>c  u32 count, count x (u32 id, str name, str deviceclass) 0
5   OPEN       c>s  u32 device_id, str name (exactly one of them set)      0
6   OPENED     s>c  u32 handle, u32 device_id, str name, str deviceclass   0
7   CALL       c>s  u32 handle, u32 func, data                             0
8   RESULT     s>c  data                                                   0
9   SHM        c>s  u32 handle, u32 index, u64 offset, u32 count,          3
                    u32 flags; fds = memfd, kick eventfd (north->south),
                    call eventfd (south->north)
10  OK         s>c  (empty)                                                0
11  CLOSE      c>s  u32 handle                                             0
12  ERROR      s>c  u32 errno, str message                                 0
13  EVENT      s>c  u16 kind (EventKind), u32 handle (0: session), str     0
                    reason
14  STATUS     c>s  (empty); the reply is a RESULT of ``key value`` lines   0
                    (the daemon's own health: loop lag, RSS, fds, ...)
==  =========  ===  =====================================================  ===

Field rules, checked both ways: HELLO 1 <= min_version <= max_version; WELCOME
version >= 1; device ids in DEVICES/OPENED and OPENED handles >= 1; SHM count a
power of two in 1..65536, offset 64-byte aligned, flags only ``SHM_RESUME``
(bit 0), ``SHM_WRITABLE`` (bit 1) and ``SHM_NO_MITIGATION`` (bit 2);
ERROR errno >= 1; EVENT kind a known EventKind and seq 0.  Handles
in CALL/SHM/CLOSE are not checked here (an unknown one is the connector's
NotFound).

Malformed input raises :class:`~vbus.errors.ProtocolError` (oversized:
:class:`~vbus.errors.TooBig`) and nothing else; encoding a message whose fields
are out of range is a local bug and raises :class:`~vbus.errors.Invalid`.
"""

from __future__ import annotations

import errno as _errno
import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, ClassVar, Literal, TypeAlias

from vbus.errors import Invalid, NotSupported, ProtocolError, TooBig, VbusError, from_errno

__all__ = [
    "CLIENT_TYPES",
    "FD_COUNT",
    "HEADER_SIZE",
    "MAX_CALL_DATA",
    "MAX_FRAME",
    "MAX_RESULT_DATA",
    "NAME_MAX",
    "SERVER_TYPES",
    "SHM_ALIGN",
    "SHM_MAX_COUNT",
    "SHM_NO_MITIGATION",
    "SHM_RESUME",
    "SHM_WRITABLE",
    "TEXT_MAX",
    "WIRE_VERSION",
    "Call",
    "Close",
    "DeviceInfo",
    "Devices",
    "Enumerate",
    "Error",
    "Event",
    "EventKind",
    "Hello",
    "Message",
    "MessageType",
    "Ok",
    "Open",
    "Opened",
    "Result",
    "ServerSession",
    "Shm",
    "Status",
    "Welcome",
    "call_frame",
    "clip",
    "decode",
    "decode_reply",
    "decode_request",
    "encode",
    "error_reply",
    "negotiate",
    "peek_seq",
    "result_frame",
    "split_call",
    "split_result",
]

WIRE_VERSION = 1
HEADER_SIZE = 16
MAX_FRAME = 65536
NAME_MAX = 64  # device names, deviceclasses, bus names, client names
TEXT_MAX = 1024  # error messages and event reasons
SHM_RESUME = 1  # SHM flag: re-register an existing queue, keeping its ring indexes
SHM_WRITABLE = 2  # SHM flag: a south->north queue (the south fills the buffers)
SHM_NO_MITIGATION = 4  # SHM flag: signal every message (for comparison; slow)
_SHM_FLAGS = SHM_RESUME | SHM_WRITABLE | SHM_NO_MITIGATION
SHM_ALIGN = 64
SHM_MAX_COUNT = 65536
MAX_CALL_DATA = MAX_FRAME - HEADER_SIZE - 8
MAX_RESULT_DATA = MAX_FRAME - HEADER_SIZE

_U16_MAX = 0xFFFF
_U32_MAX = 0xFFFF_FFFF
_U64_MAX = 0xFFFF_FFFF_FFFF_FFFF

_HEADER = struct.Struct("<BBHIII")
_CALL_FRAME = struct.Struct("<BBHIIIII")  # header + handle + func: CALL in one pack
_CALL_HEAD = struct.Struct("<II")
_HEADER_SEQ = struct.Struct("<4xI")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U16_U16 = struct.Struct("<HH")
_U16_U32 = struct.Struct("<HI")
_U32_U32 = struct.Struct("<II")
_SHM = struct.Struct("<IIQII")
_DEVICE_MIN = 8  # smallest DEVICES entry: u32 id + two empty strings


class MessageType(IntEnum):
    HELLO = 1
    WELCOME = 2
    ENUMERATE = 3
    DEVICES = 4
    OPEN = 5
    OPENED = 6
    CALL = 7
    RESULT = 8
    SHM = 9
    OK = 10
    CLOSE = 11
    ERROR = 12
    EVENT = 13
    STATUS = 14


class EventKind(IntEnum):
    FAULT = 1
    DEVICE_REMOVED = 2
    BUS_GONE = 3
    SHUTDOWN = 4


CLIENT_TYPES: frozenset[int] = frozenset(
    {
        MessageType.HELLO,
        MessageType.ENUMERATE,
        MessageType.OPEN,
        MessageType.CALL,
        MessageType.SHM,
        MessageType.CLOSE,
        MessageType.STATUS,
    }
)
SERVER_TYPES: frozenset[int] = frozenset(MessageType) - CLIENT_TYPES
_ALL_TYPES: frozenset[int] = frozenset(MessageType)

FD_COUNT: dict[int, int] = {t: 3 if t == MessageType.SHM else 0 for t in MessageType}

# Plain ints for the hot paths: an enum member lookup costs as much as a struct call.
_T_CALL = int(MessageType.CALL)
_T_RESULT = int(MessageType.RESULT)
_T_EVENT = int(MessageType.EVENT)


# --- messages ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    min_version: int
    max_version: int
    name: str
    TYPE: ClassVar[int] = MessageType.HELLO


@dataclass(frozen=True, slots=True)
class Welcome:
    version: int
    client_id: int
    bus: str
    TYPE: ClassVar[int] = MessageType.WELCOME


@dataclass(frozen=True, slots=True)
class Enumerate:
    TYPE: ClassVar[int] = MessageType.ENUMERATE


@dataclass(frozen=True, slots=True)
class Status:
    TYPE: ClassVar[int] = MessageType.STATUS


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    id: int
    name: str
    deviceclass: str


@dataclass(frozen=True, slots=True)
class Devices:
    devices: tuple[DeviceInfo, ...]
    TYPE: ClassVar[int] = MessageType.DEVICES


@dataclass(frozen=True, slots=True)
class Open:
    device_id: int = 0
    name: str = ""
    TYPE: ClassVar[int] = MessageType.OPEN


@dataclass(frozen=True, slots=True)
class Opened:
    handle: int
    device_id: int
    name: str
    deviceclass: str
    TYPE: ClassVar[int] = MessageType.OPENED


@dataclass(frozen=True, slots=True)
class Call:
    handle: int
    func: int
    data: bytes
    TYPE: ClassVar[int] = MessageType.CALL


@dataclass(frozen=True, slots=True)
class Result:
    data: bytes
    TYPE: ClassVar[int] = MessageType.RESULT


@dataclass(frozen=True, slots=True)
class Shm:
    handle: int
    index: int
    offset: int
    count: int
    flags: int = 0
    TYPE: ClassVar[int] = MessageType.SHM


@dataclass(frozen=True, slots=True)
class Ok:
    TYPE: ClassVar[int] = MessageType.OK


@dataclass(frozen=True, slots=True)
class Close:
    handle: int
    TYPE: ClassVar[int] = MessageType.CLOSE


@dataclass(frozen=True, slots=True)
class Error:
    errno: int
    message: str
    TYPE: ClassVar[int] = MessageType.ERROR

    def exception(self) -> VbusError:
        """The exception this reply stands for (the class that was raised south)."""
        return from_errno(self.errno, self.message)


@dataclass(frozen=True, slots=True)
class Event:
    kind: EventKind
    handle: int
    reason: str
    TYPE: ClassVar[int] = MessageType.EVENT


Message: TypeAlias = (
    Hello
    | Welcome
    | Enumerate
    | Devices
    | Open
    | Opened
    | Call
    | Result
    | Shm
    | Ok
    | Close
    | Error
    | Event
    | Status
)


def clip(text: str, limit: int = TEXT_MAX) -> str:
    """``text`` cut to at most ``limit`` UTF-8 bytes, on a character boundary."""
    raw = text.encode("utf-8", "replace")
    if len(raw) <= limit:
        return text
    return raw[:limit].decode("utf-8", "ignore")  # "ignore" drops a cut character


def error_reply(exc: VbusError) -> Error:
    """The ERROR reply for ``exc``: its errno, its message cut to ``TEXT_MAX`` bytes."""
    code = exc.errno
    if not isinstance(code, int) or not 0 < code <= _U32_MAX:
        code = _errno.EIO
    return Error(code, clip(exc.message))


# --- rules shared by encode (Invalid) and decode (ProtocolError) ---------------


def _hello_problem(lo: int, hi: int) -> str | None:
    if lo < 1 or lo > hi:
        return f"HELLO version range {lo}..{hi} is empty or starts below 1"
    return None


def _open_problem(device_id: int, name: str) -> str | None:
    if (device_id != 0) == (name != ""):
        return "OPEN needs exactly one of a device id and a device name"
    return None


def _shm_problem(offset: int, count: int, flags: int) -> str | None:
    if not 0 < count <= SHM_MAX_COUNT or count & (count - 1):
        return f"SHM ring size {count} is not a power of two in 1..{SHM_MAX_COUNT}"
    if flags & ~_SHM_FLAGS:
        return f"SHM flags {flags:#x} set undefined bits"
    if offset % SHM_ALIGN:
        return f"SHM offset {offset} is not {SHM_ALIGN}-byte aligned"
    return None


# --- encoding -----------------------------------------------------------------


def _int(value: int, lo: int, hi: int, what: str) -> int:
    if not isinstance(value, int) or not lo <= value <= hi:
        raise Invalid(f"{what} must be an integer in {lo}..{hi}, got {value!r}")
    return value


def _str(value: str, limit: int, what: str, *, is_name: bool) -> bytes:
    if not isinstance(value, str):
        raise Invalid(f"{what} must be a str, got {type(value).__name__}")
    if is_name and "\x00" in value:
        raise Invalid(f"{what} contains a NUL character")
    try:
        raw = value.encode("utf-8")
    except UnicodeEncodeError:
        raise Invalid(f"{what} cannot be encoded as UTF-8") from None
    if len(raw) > limit:
        raise Invalid(f"{what} of {len(raw)} bytes exceeds the {limit}-byte limit")
    return _U16.pack(len(raw)) + raw


def _frame(mtype: MessageType, seq: int, payload: bytes) -> bytes:
    size = HEADER_SIZE + len(payload)
    if size > MAX_FRAME:
        raise TooBig(f"{mtype.name} frame of {size} bytes exceeds the {MAX_FRAME}-byte limit")
    return _HEADER.pack(WIRE_VERSION, mtype, 0, seq, len(payload), 0) + payload


def _bytes(data: bytes, limit: int, what: str) -> int:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise Invalid(f"{what} data must be bytes, got {type(data).__name__}")
    size = memoryview(data).nbytes
    if size > limit:
        raise TooBig(f"{what} data of {size} bytes exceeds the {limit}-byte limit")
    return size


def _encode_call(msg: Call, seq: int) -> bytes:
    data = msg.data
    if type(data) is bytes and len(data) <= MAX_CALL_DATA:
        try:  # the hot path: one pack, one concatenation; struct checks the ranges
            head = _CALL_FRAME.pack(
                WIRE_VERSION, _T_CALL, 0, seq, len(data) + 8, 0, msg.handle, msg.func
            )
            return head + data
        except struct.error:
            pass
    # Something is wrong, or data is another bytes-like object: check each field.
    size = _bytes(data, MAX_CALL_DATA, "CALL")
    handle = _int(msg.handle, 0, _U32_MAX, "CALL handle")
    func = _int(msg.func, 0, _U32_MAX, "CALL func")
    head = _CALL_FRAME.pack(WIRE_VERSION, _T_CALL, 0, seq, size + 8, 0, handle, func)
    return head + bytes(data)


def _encode_result(msg: Result, seq: int) -> bytes:
    data = msg.data
    if type(data) is bytes and len(data) <= MAX_RESULT_DATA:
        return _HEADER.pack(WIRE_VERSION, _T_RESULT, 0, seq, len(data), 0) + data
    size = _bytes(data, MAX_RESULT_DATA, "RESULT")
    return _HEADER.pack(WIRE_VERSION, _T_RESULT, 0, seq, size, 0) + bytes(data)


def _encode_hello(msg: Hello, seq: int) -> bytes:
    lo = _int(msg.min_version, 1, _U16_MAX, "HELLO min_version")
    hi = _int(msg.max_version, 1, _U16_MAX, "HELLO max_version")
    if problem := _hello_problem(lo, hi):
        raise Invalid(problem)
    name = _str(msg.name, NAME_MAX, "client name", is_name=True)
    return _frame(MessageType.HELLO, seq, _U16_U16.pack(lo, hi) + name)


def _encode_welcome(msg: Welcome, seq: int) -> bytes:
    version = _int(msg.version, 1, _U16_MAX, "WELCOME version")
    client_id = _int(msg.client_id, 0, _U32_MAX, "WELCOME client_id")
    bus = _str(msg.bus, NAME_MAX, "bus name", is_name=True)
    return _frame(MessageType.WELCOME, seq, _U16_U32.pack(version, client_id) + bus)


def _encode_enumerate(msg: Enumerate, seq: int) -> bytes:
    return _frame(MessageType.ENUMERATE, seq, b"")


def _encode_status(msg: Status, seq: int) -> bytes:
    return _frame(MessageType.STATUS, seq, b"")


def _encode_devices(msg: Devices, seq: int) -> bytes:
    parts = [_U32.pack(len(msg.devices))]
    for dev in msg.devices:
        if not isinstance(dev, DeviceInfo):
            raise Invalid(f"DEVICES entries must be DeviceInfo, got {type(dev).__name__}")
        parts.append(_U32.pack(_int(dev.id, 1, _U32_MAX, "device id")))
        parts.append(_str(dev.name, NAME_MAX, "device name", is_name=True))
        parts.append(_str(dev.deviceclass, NAME_MAX, "deviceclass", is_name=True))
    return _frame(MessageType.DEVICES, seq, b"".join(parts))


def _encode_open(msg: Open, seq: int) -> bytes:
    device_id = _int(msg.device_id, 0, _U32_MAX, "OPEN device_id")
    name = _str(msg.name, NAME_MAX, "device name", is_name=True)
    if problem := _open_problem(device_id, msg.name):
        raise Invalid(problem)
    return _frame(MessageType.OPEN, seq, _U32.pack(device_id) + name)


def _encode_opened(msg: Opened, seq: int) -> bytes:
    handle = _int(msg.handle, 1, _U32_MAX, "OPENED handle")
    device_id = _int(msg.device_id, 1, _U32_MAX, "OPENED device_id")
    name = _str(msg.name, NAME_MAX, "device name", is_name=True)
    deviceclass = _str(msg.deviceclass, NAME_MAX, "deviceclass", is_name=True)
    return _frame(MessageType.OPENED, seq, _U32_U32.pack(handle, device_id) + name + deviceclass)


def _encode_shm(msg: Shm, seq: int) -> bytes:
    handle = _int(msg.handle, 0, _U32_MAX, "SHM handle")
    index = _int(msg.index, 0, _U32_MAX, "SHM index")
    offset = _int(msg.offset, 0, _U64_MAX, "SHM offset")
    count = _int(msg.count, 0, _U32_MAX, "SHM count")
    flags = _int(msg.flags, 0, _U32_MAX, "SHM flags")
    if problem := _shm_problem(offset, count, flags):
        raise Invalid(problem)
    return _frame(MessageType.SHM, seq, _SHM.pack(handle, index, offset, count, flags))


def _encode_ok(msg: Ok, seq: int) -> bytes:
    return _frame(MessageType.OK, seq, b"")


def _encode_close(msg: Close, seq: int) -> bytes:
    handle = _int(msg.handle, 0, _U32_MAX, "CLOSE handle")
    return _frame(MessageType.CLOSE, seq, _U32.pack(handle))


def _encode_error(msg: Error, seq: int) -> bytes:
    code = _int(msg.errno, 1, _U32_MAX, "ERROR errno")
    message = _str(msg.message, TEXT_MAX, "error message", is_name=False)
    return _frame(MessageType.ERROR, seq, _U32.pack(code) + message)


def _encode_event(msg: Event, seq: int) -> bytes:
    if seq != 0:
        raise Invalid(f"EVENT frames carry seq 0, not {seq!r}")
    kind = _int(msg.kind, 0, _U16_MAX, "EVENT kind")
    if kind not in _EVENT_KINDS:
        raise Invalid(f"unknown EVENT kind {kind}")
    handle = _int(msg.handle, 0, _U32_MAX, "EVENT handle")
    reason = _str(msg.reason, TEXT_MAX, "event reason", is_name=False)
    return _frame(MessageType.EVENT, 0, _U16_U32.pack(kind, handle) + reason)


_EVENT_KINDS: frozenset[int] = frozenset(EventKind)

_ENCODERS: dict[type, Callable[[Any, int], bytes]] = {
    Hello: _encode_hello,
    Welcome: _encode_welcome,
    Enumerate: _encode_enumerate,
    Devices: _encode_devices,
    Open: _encode_open,
    Opened: _encode_opened,
    Call: _encode_call,
    Result: _encode_result,
    Shm: _encode_shm,
    Ok: _encode_ok,
    Close: _encode_close,
    Error: _encode_error,
    Event: _encode_event,
    Status: _encode_status,
}


def encode(msg: Message, seq: int = 0) -> bytes:
    """The whole frame for ``msg``.

    Raises Invalid for a field out of range (a local bug) and TooBig when the
    frame would exceed ``MAX_FRAME``.
    """
    encoder = _ENCODERS.get(type(msg))
    if encoder is None:
        raise Invalid(f"not a protocol message: {type(msg).__name__}")
    if not isinstance(seq, int) or not 0 <= seq <= _U32_MAX:
        raise Invalid(f"seq must be an integer in 0..{_U32_MAX}, got {seq!r}")
    return encoder(msg, seq)


# --- decoding -----------------------------------------------------------------

_Buffer: TypeAlias = bytes | memoryview


class _Reader:
    """Walks one payload; every read is bounds-checked before it happens."""

    __slots__ = ("buf", "end", "pos", "what")

    def __init__(self, buf: _Buffer, what: str) -> None:
        self.buf = buf
        self.pos = HEADER_SIZE
        self.end = len(buf)
        self.what = what

    def _short(self, field: str) -> ProtocolError:
        return ProtocolError(
            f"{self.what} payload of {self.end - HEADER_SIZE} bytes ends inside the {field}"
        )

    def ints(self, layout: struct.Struct, field: str) -> tuple[int, ...]:
        pos = self.pos
        if pos + layout.size > self.end:
            raise self._short(field)
        self.pos = pos + layout.size
        return layout.unpack_from(self.buf, pos)

    def string(self, limit: int, field: str, *, is_name: bool) -> str:
        pos = self.pos
        if pos + 2 > self.end:
            raise self._short(f"{field} length")
        (size,) = _U16.unpack_from(self.buf, pos)
        if size > limit:
            raise ProtocolError(f"{field} of {size} bytes exceeds the {limit}-byte limit")
        pos += 2
        if pos + size > self.end:
            raise ProtocolError(f"{field} of {size} bytes runs past the end of the {self.what}")
        self.pos = pos + size
        try:
            text = str(self.buf[pos : pos + size], "utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(f"{field} is not valid UTF-8") from None
        if is_name and "\x00" in text:
            raise ProtocolError(f"{field} contains a NUL character")
        return text

    def finish(self) -> None:
        if self.pos != self.end:
            raise ProtocolError(f"{self.what} payload has {self.end - self.pos} trailing bytes")


def _decode_hello(buf: _Buffer) -> Hello:
    r = _Reader(buf, "HELLO")
    lo, hi = r.ints(_U16_U16, "version range")
    name = r.string(NAME_MAX, "client name", is_name=True)
    r.finish()
    if problem := _hello_problem(lo, hi):
        raise ProtocolError(problem)
    return Hello(lo, hi, name)


def _decode_welcome(buf: _Buffer) -> Welcome:
    r = _Reader(buf, "WELCOME")
    version, client_id = r.ints(_U16_U32, "version and client id")
    bus = r.string(NAME_MAX, "bus name", is_name=True)
    r.finish()
    if version == 0:
        raise ProtocolError("WELCOME version 0 does not exist")
    return Welcome(version, client_id, bus)


def _decode_enumerate(buf: _Buffer) -> Enumerate:
    _Reader(buf, "ENUMERATE").finish()
    return Enumerate()


def _decode_status(buf: _Buffer) -> Status:
    _Reader(buf, "STATUS").finish()
    return Status()


def _decode_devices(buf: _Buffer) -> Devices:
    r = _Reader(buf, "DEVICES")
    (count,) = r.ints(_U32, "device count")
    room = (r.end - r.pos) // _DEVICE_MIN
    if count > room:  # before allocating anything for ``count`` entries
        raise ProtocolError(f"DEVICES claims {count} devices but the payload holds at most {room}")
    devices = []
    for _ in range(count):
        (device_id,) = r.ints(_U32, "device id")
        if device_id == 0:
            raise ProtocolError("DEVICES lists device id 0")
        name = r.string(NAME_MAX, "device name", is_name=True)
        deviceclass = r.string(NAME_MAX, "deviceclass", is_name=True)
        devices.append(DeviceInfo(device_id, name, deviceclass))
    r.finish()
    return Devices(tuple(devices))


def _decode_open(buf: _Buffer) -> Open:
    r = _Reader(buf, "OPEN")
    (device_id,) = r.ints(_U32, "device id")
    name = r.string(NAME_MAX, "device name", is_name=True)
    r.finish()
    if problem := _open_problem(device_id, name):
        raise ProtocolError(problem)
    return Open(device_id, name)


def _decode_opened(buf: _Buffer) -> Opened:
    r = _Reader(buf, "OPENED")
    handle, device_id = r.ints(_U32_U32, "handle and device id")
    name = r.string(NAME_MAX, "device name", is_name=True)
    deviceclass = r.string(NAME_MAX, "deviceclass", is_name=True)
    r.finish()
    if handle == 0 or device_id == 0:
        raise ProtocolError("OPENED handle and device id must be >= 1")
    return Opened(handle, device_id, name, deviceclass)


def _decode_call(buf: _Buffer) -> Call:
    if len(buf) < HEADER_SIZE + 8:
        raise ProtocolError(f"CALL payload of {len(buf) - HEADER_SIZE} bytes is shorter than 8")
    handle, func = _CALL_HEAD.unpack_from(buf, HEADER_SIZE)
    return Call(handle, func, bytes(buf[HEADER_SIZE + 8 :]))


def _decode_result(buf: _Buffer) -> Result:
    return Result(bytes(buf[HEADER_SIZE:]))


def _decode_shm(buf: _Buffer) -> Shm:
    r = _Reader(buf, "SHM")
    handle, index, offset, count, flags = r.ints(_SHM, "ring registration")
    r.finish()
    if problem := _shm_problem(offset, count, flags):
        raise ProtocolError(problem)
    return Shm(handle, index, offset, count, flags)


def _decode_ok(buf: _Buffer) -> Ok:
    _Reader(buf, "OK").finish()
    return Ok()


def _decode_close(buf: _Buffer) -> Close:
    r = _Reader(buf, "CLOSE")
    (handle,) = r.ints(_U32, "handle")
    r.finish()
    return Close(handle)


def _decode_error(buf: _Buffer) -> Error:
    r = _Reader(buf, "ERROR")
    (code,) = r.ints(_U32, "errno")
    message = r.string(TEXT_MAX, "error message", is_name=False)
    r.finish()
    if code == 0:
        raise ProtocolError("ERROR with errno 0")
    return Error(code, message)


def _decode_event(buf: _Buffer) -> Event:
    r = _Reader(buf, "EVENT")
    kind, handle = r.ints(_U16_U32, "kind and handle")
    reason = r.string(TEXT_MAX, "event reason", is_name=False)
    r.finish()
    if kind not in _EVENT_KINDS:
        raise ProtocolError(f"unknown EVENT kind {kind}")
    return Event(EventKind(kind), handle, reason)


_DECODERS: dict[int, Callable[[_Buffer], Message]] = {
    MessageType.HELLO: _decode_hello,
    MessageType.WELCOME: _decode_welcome,
    MessageType.ENUMERATE: _decode_enumerate,
    MessageType.DEVICES: _decode_devices,
    MessageType.OPEN: _decode_open,
    MessageType.OPENED: _decode_opened,
    MessageType.CALL: _decode_call,
    MessageType.RESULT: _decode_result,
    MessageType.SHM: _decode_shm,
    MessageType.OK: _decode_ok,
    MessageType.CLOSE: _decode_close,
    MessageType.ERROR: _decode_error,
    MessageType.EVENT: _decode_event,
    MessageType.STATUS: _decode_status,
}


def _decode(
    frame: bytes | bytearray | memoryview, nfds: int, allowed: frozenset[int]
) -> tuple[int, Message]:
    buf: _Buffer
    if type(frame) is bytes:
        buf = frame
    else:
        view = memoryview(frame)
        # Slices of a flat byte view are cheap; anything else is copied once.
        flat = view.ndim == 1 and view.itemsize == 1 and view.c_contiguous
        buf = view if flat else view.tobytes()
    size = len(buf)
    if size < HEADER_SIZE:
        raise ProtocolError(f"frame of {size} bytes is shorter than the {HEADER_SIZE}-byte header")
    if size > MAX_FRAME:
        raise TooBig(f"frame of {size} bytes exceeds the {MAX_FRAME}-byte limit")
    version, mtype, flags, seq, length, reserved = _HEADER.unpack_from(buf)
    if version != WIRE_VERSION:
        raise ProtocolError(f"unsupported wire version {version}")
    if flags or reserved:
        raise ProtocolError(f"header flags {flags:#x} / reserved {reserved:#x} must be 0")
    if length != size - HEADER_SIZE:
        raise ProtocolError(
            f"header says {length} payload bytes, frame carries {size - HEADER_SIZE}"
        )
    decoder = _DECODERS.get(mtype)
    if decoder is None:
        raise ProtocolError(f"unknown message type {mtype}")
    if mtype not in allowed:
        sender = "daemon" if mtype in SERVER_TYPES else "client"
        raise ProtocolError(f"{MessageType(mtype).name} is sent by the {sender}, not expected here")
    if nfds != FD_COUNT[mtype]:
        raise ProtocolError(
            f"{MessageType(mtype).name} expects {FD_COUNT[mtype]} file descriptors, got {nfds}"
        )
    if mtype == _T_EVENT and seq:
        raise ProtocolError(f"EVENT frames carry seq 0, not {seq}")
    return seq, decoder(buf)


def decode(frame: bytes | bytearray | memoryview, nfds: int = 0) -> tuple[int, Message]:
    """``(seq, message)`` from one whole frame that arrived with ``nfds`` fds.

    Raises ProtocolError for anything malformed and TooBig for a frame over
    ``MAX_FRAME``; never anything else.  ``data`` fields are copies.
    """
    return _decode(frame, nfds, _ALL_TYPES)


def decode_request(frame: bytes | bytearray | memoryview, nfds: int = 0) -> tuple[int, Message]:
    """Like :func:`decode`, for the daemon: only client-to-daemon types are accepted."""
    return _decode(frame, nfds, CLIENT_TYPES)


def decode_reply(frame: bytes | bytearray | memoryview, nfds: int = 0) -> tuple[int, Message]:
    """Like :func:`decode`, for the client: only daemon-to-client types are accepted."""
    return _decode(frame, nfds, SERVER_TYPES)


# --- the call() hot path -----------------------------------------------------------
# call() is a round trip of two small frames; building and matching dataclasses
# for them costs more than the rest of the Python work.  These helpers accept
# exactly the frames ``decode`` accepts for CALL/RESULT and answer None for
# anything else, so the caller falls back to ``decode`` (which names the fault).


def split_call(frame: bytes, nfds: int = 0) -> tuple[int, int, int, bytes] | None:
    """(seq, handle, func, data) of a well-formed CALL, else None."""
    if nfds or len(frame) < HEADER_SIZE + 8 or frame[1] != _T_CALL:
        return None
    version, _, flags, seq, length, reserved, handle, func = _CALL_FRAME.unpack_from(frame)
    if version != WIRE_VERSION or flags or reserved or length != len(frame) - HEADER_SIZE:
        return None
    return seq, handle, func, frame[HEADER_SIZE + 8 :]


def split_result(frame: bytes, nfds: int = 0) -> tuple[int, bytes] | None:
    """(seq, data) of a well-formed RESULT, else None."""
    if nfds or len(frame) < HEADER_SIZE or frame[1] != _T_RESULT:
        return None
    version, _, flags, seq, length, reserved = _HEADER.unpack_from(frame)
    if version != WIRE_VERSION or flags or reserved or length != len(frame) - HEADER_SIZE:
        return None
    return seq, frame[HEADER_SIZE:]


def call_frame(seq: int, handle: int, func: int, data: bytes) -> bytes:
    """``encode(Call(handle, func, data), seq)`` without the dataclass."""
    if len(data) > MAX_CALL_DATA:
        raise TooBig(f"CALL data of {len(data)} bytes exceeds {MAX_CALL_DATA}")
    try:
        head = _CALL_FRAME.pack(WIRE_VERSION, _T_CALL, 0, seq, len(data) + 8, 0, handle, func)
    except struct.error:
        raise Invalid(f"CALL field out of range: seq {seq}, handle {handle}, func {func}") from None
    return head + bytes(data)


def result_frame(seq: int, data: bytes) -> bytes:
    """``encode(Result(data), seq)`` without the dataclass."""
    if len(data) > MAX_RESULT_DATA:
        raise TooBig(f"RESULT data of {len(data)} bytes exceeds {MAX_RESULT_DATA}")
    return _HEADER.pack(WIRE_VERSION, _T_RESULT, 0, seq, len(data), 0) + data


def peek_seq(frame: bytes | bytearray | memoryview) -> int:
    """The header's seq, to address an ERROR reply to a frame that failed to decode (else 0)."""
    try:
        (seq,) = _HEADER_SEQ.unpack_from(frame)
    except (struct.error, TypeError, ValueError, BufferError):
        return 0
    return int(seq)


# --- the daemon's side of the handshake -----------------------------------------


def negotiate(hello: Hello) -> int:
    """The wire version to speak with this client, or NotSupported."""
    if hello.min_version <= WIRE_VERSION <= hello.max_version:
        return WIRE_VERSION
    raise NotSupported(
        f"client speaks wire versions {hello.min_version}..{hello.max_version}, "
        f"daemon speaks {WIRE_VERSION}"
    )


SessionState: TypeAlias = Literal["await_hello", "ready", "closed"]


class ServerSession:
    """Request order on one connection: HELLO first, exactly once, then anything.

    A failed handshake (wrong first message, no common version) leaves the
    session ``closed``: reply ERROR, then disconnect.  A malformed frame or a
    second HELLO once ``ready`` raises ProtocolError and changes nothing;
    datagrams keep the framing intact, so the connector may reply ERROR (to
    :func:`peek_seq`) and carry on, or disconnect.
    """

    __slots__ = ("state", "version")

    def __init__(self) -> None:
        self.state: SessionState = "await_hello"
        self.version = 0  # negotiated wire version, once ready

    def receive(self, frame: bytes | bytearray | memoryview, nfds: int = 0) -> tuple[int, Message]:
        if self.state == "ready":
            seq, msg = decode_request(frame, nfds)
            if type(msg) is Hello:
                raise ProtocolError("HELLO sent twice")
            return seq, msg
        if self.state == "closed":
            raise ProtocolError("session is closed")
        try:
            seq, msg = decode_request(frame, nfds)
            if type(msg) is not Hello:
                raise ProtocolError(f"expected HELLO first, got {MessageType(msg.TYPE).name}")
            self.version = negotiate(msg)
        except VbusError:
            self.state = "closed"
            raise
        self.state = "ready"
        return seq, msg

    def close(self) -> None:
        self.state = "closed"
