"""One error hierarchy for every layer: each class carries the errno it maps to.

The admin tree returns ``exc.errno`` to the kernel, the wire protocol sends it
in an ERROR reply, and the client library turns that reply back into the same
class with :func:`from_errno`.  Errors caused by a remote peer (bad bytes, bad
rings) and errors caused by local misuse share the classes; where they are
raised decides who gets punished.
"""

from __future__ import annotations

import errno as _errno

__all__ = [
    "Busy",
    "Closed",
    "Denied",
    "Exists",
    "Fault",
    "Invalid",
    "NoSpace",
    "NoSuchTask",
    "NotFound",
    "NotPermitted",
    "NotSupported",
    "ProtocolError",
    "TimedOut",
    "TooBig",
    "TooManyFiles",
    "VbusError",
    "from_errno",
]


class VbusError(Exception):
    """Root of every vbus error.  ``errno`` is what the outside world sees."""

    errno: int = _errno.EIO

    def __init__(self, message: str = "") -> None:
        super().__init__(message or _errno.errorcode.get(self.errno, "EIO"))

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class NotFound(VbusError):
    errno = _errno.ENOENT


class NoSuchTask(NotFound):
    """A member rule names a process that does not exist."""

    errno = _errno.ESRCH


class Busy(VbusError):
    errno = _errno.EBUSY


class Exists(VbusError):
    errno = _errno.EEXIST


class Invalid(VbusError, ValueError):
    errno = _errno.EINVAL


class Denied(VbusError, PermissionError):
    errno = _errno.EACCES


class NotPermitted(VbusError):
    """The operation is not possible on this object at all (EPERM), whoever asks."""

    errno = _errno.EPERM


class Fault(VbusError):
    """A north context broke the shared-memory rules (bad ring, bad address)."""

    errno = _errno.EFAULT


class NoSpace(VbusError):
    """A bounded resource is exhausted (ring full, connection cap reached)."""

    errno = _errno.ENOSPC


class TooManyFiles(VbusError):
    """A descriptor bound was reached (per uid, or the daemon's reserve)."""

    errno = _errno.EMFILE


class NotSupported(VbusError):
    errno = _errno.EOPNOTSUPP


class TooBig(VbusError):
    errno = _errno.EMSGSIZE


class TimedOut(VbusError, TimeoutError):
    errno = _errno.ETIMEDOUT


class Closed(VbusError, ConnectionError):
    """The other end went away (daemon stopped, connection closed or faulted)."""

    errno = _errno.ECONNRESET


class ProtocolError(VbusError):
    """Bytes on the wire that do not follow the protocol."""

    errno = _errno.EPROTO


_BY_ERRNO: dict[int, type[VbusError]] = {
    cls.errno: cls
    for cls in (
        NotFound,
        NoSuchTask,
        Busy,
        Exists,
        Invalid,
        Denied,
        NotPermitted,
        Fault,
        NoSpace,
        TooManyFiles,
        NotSupported,
        TooBig,
        TimedOut,
        Closed,
        ProtocolError,
    )
}


def from_errno(code: int, message: str = "") -> VbusError:
    """The exception class for ``code`` (VbusError itself for unknown codes)."""
    cls = _BY_ERRNO.get(code)
    if cls is None:
        err = VbusError(message or _errno.errorcode.get(code, f"errno {code}"))
        err.errno = code
        return err
    return cls(message)
