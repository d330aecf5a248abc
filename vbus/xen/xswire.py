"""The xenstored wire format, sans-IO (Xen's public io/xs_wire.h, docs/misc/xenstore.txt).

Every message, in both directions, is a ``struct xsd_sockmsg`` header, four
native u32 (type, req_id, tx_id, len; little-endian on x86), followed by
``len`` bytes of payload, at most ``XENSTORE_PAYLOAD_MAX`` (4096).  Requests
are answered with the same type, req_id and tx_id, or with ``XS_ERROR``
whose payload is an errno *name* (``ENOENT\\0``) from Xen's ``xsd_errors``
list.  ``WATCH_EVENT`` carries ``path\\0token\\0`` with req_id and tx_id 0.

``Decoder`` cuts a byte stream into messages; a header announcing more than
4096 bytes is a ``ProtocolError`` (xenstored drops such a connection).
"""

from __future__ import annotations

import errno as _errno
import struct
from dataclasses import dataclass
from enum import IntEnum

from vbus.errors import ProtocolError

__all__ = [
    "ABS_PATH_MAX",
    "ERROR_NAMES",
    "HEADER",
    "PAYLOAD_MAX",
    "REL_PATH_MAX",
    "Decoder",
    "Msg",
    "XsError",
    "XsType",
    "encode",
    "error_payload",
    "join_strings",
    "split_strings",
]

HEADER = struct.Struct("<IIII")
PAYLOAD_MAX = 4096  # XENSTORE_PAYLOAD_MAX
ABS_PATH_MAX = 3072  # XENSTORE_ABS_PATH_MAX
REL_PATH_MAX = 2048  # XENSTORE_REL_PATH_MAX


class XsType(IntEnum):
    """``enum xsd_sockmsg_type`` (20, XS_RESTRICT, was removed)."""

    CONTROL = 0
    DIRECTORY = 1
    READ = 2
    GET_PERMS = 3
    WATCH = 4
    UNWATCH = 5
    TRANSACTION_START = 6
    TRANSACTION_END = 7
    INTRODUCE = 8
    RELEASE = 9
    GET_DOMAIN_PATH = 10
    WRITE = 11
    MKDIR = 12
    RM = 13
    SET_PERMS = 14
    WATCH_EVENT = 15
    ERROR = 16
    IS_DOMAIN_INTRODUCED = 17
    RESUME = 18
    SET_TARGET = 19
    RESET_WATCHES = 21
    DIRECTORY_PART = 22
    GET_FEATURE = 23
    SET_FEATURE = 24
    GET_QUOTA = 25
    SET_QUOTA = 26


# ``xsd_errors`` in io/xs_wire.h, in its order: the only names on the wire.
ERROR_NAMES: dict[int, str] = {
    _errno.EINVAL: "EINVAL",
    _errno.EACCES: "EACCES",
    _errno.EEXIST: "EEXIST",
    _errno.EISDIR: "EISDIR",
    _errno.ENOENT: "ENOENT",
    _errno.ENOMEM: "ENOMEM",
    _errno.ENOSPC: "ENOSPC",
    _errno.EIO: "EIO",
    _errno.ENOTEMPTY: "ENOTEMPTY",
    _errno.ENOSYS: "ENOSYS",
    _errno.EROFS: "EROFS",
    _errno.EBUSY: "EBUSY",
    _errno.EAGAIN: "EAGAIN",
    _errno.EISCONN: "EISCONN",
    _errno.E2BIG: "E2BIG",
    _errno.EPERM: "EPERM",
}
_BY_NAME = {name: code for code, name in ERROR_NAMES.items()}


class XsError(Exception):
    """A request refused with one of Xen's errors (``errno`` is in ``ERROR_NAMES``)."""

    def __init__(self, code: int, message: str = "") -> None:
        if code not in ERROR_NAMES:
            code = _errno.EINVAL
        super().__init__(message or ERROR_NAMES[code])
        self.errno = code

    @property
    def name(self) -> str:
        return ERROR_NAMES[self.errno]

    @classmethod
    def from_payload(cls, payload: bytes) -> XsError:
        name = payload.rstrip(b"\0").decode("ascii", "replace")
        return cls(_BY_NAME.get(name, _errno.EINVAL), name)


@dataclass(frozen=True, slots=True)
class Msg:
    type: int
    req_id: int
    tx_id: int
    payload: bytes


def encode(mtype: int, req_id: int, tx_id: int, payload: bytes) -> bytes:
    """One message: header and payload.  A payload past 4096 bytes is refused."""
    if len(payload) > PAYLOAD_MAX:
        raise ProtocolError(f"xenstore payload of {len(payload)} bytes exceeds {PAYLOAD_MAX}")
    return HEADER.pack(mtype, req_id & 0xFFFFFFFF, tx_id & 0xFFFFFFFF, len(payload)) + payload


def error_payload(code: int) -> bytes:
    return ERROR_NAMES.get(code, "EINVAL").encode() + b"\0"


def split_strings(payload: bytes) -> list[bytes]:
    """``a\\0b\\0`` -> [a, b]; a last string without its NUL counts too."""
    parts = payload.split(b"\0")
    if parts and parts[-1] == b"":
        parts.pop()
    return parts


def join_strings(parts: list[bytes]) -> bytes:
    return b"".join(part + b"\0" for part in parts)


class Decoder:
    """A byte stream in, whole messages out.  Holds at most one message's bytes."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Msg]:
        """Messages completed by ``data``; ``ProtocolError`` for an oversized one."""
        buf = self._buf
        buf += data
        out: list[Msg] = []
        pos = 0
        size = HEADER.size
        while len(buf) - pos >= size:
            mtype, req_id, tx_id, length = HEADER.unpack_from(buf, pos)
            if length > PAYLOAD_MAX:
                raise ProtocolError(f"xenstore payload of {length} bytes exceeds {PAYLOAD_MAX}")
            end = pos + size + length
            if len(buf) < end:
                break
            out.append(Msg(mtype, req_id, tx_id, bytes(buf[pos + size : end])))
            pos = end
        if pos:
            del buf[:pos]
        return out

    @property
    def buffered(self) -> int:
        return len(self._buf)
