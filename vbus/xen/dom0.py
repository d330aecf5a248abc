"""The hypervisor as a dom0 process reaches it: grant mappings and event channels.

A backend in dom0 sees a domU's shared pages by mapping the grant references
the domU wrote into xenstore, and signals it through an interdomain event
channel.  Linux offers both to userspace as character devices:

- ``/dev/xen/gntdev``: ``IOCTL_GNTDEV_MAP_GRANT_REF`` reserves a range of
  the device's offsets for a list of (domid, ref); ``mmap`` of that range maps
  the granted frames (read-only if the mapping is not writable);
  ``IOCTL_GNTDEV_UNMAP_GRANT_REF`` releases the range after ``munmap``;
  ``IOCTL_GNTDEV_GRANT_COPY`` has the hypervisor copy between granted pages
  and this process's memory (``GrantCopier``), with no mapping at all.
- ``/dev/xen/evtchn``: ``IOCTL_EVTCHN_BIND_INTERDOMAIN`` returns a local port
  bound to the domU's unbound one, ``IOCTL_EVTCHN_NOTIFY`` signals it,
  ``IOCTL_EVTCHN_UNBIND`` drops it.  Reading the device yields the pending
  ports as 32-bit integers; the driver masks a port when it fires, and writing
  the port back unmasks it.  The descriptor is pollable (the event loop's
  reader).

The ioctl numbers and struct layouts are those of Linux's
``include/uapi/xen/gntdev.h`` and ``include/uapi/xen/evtchn.h`` (all
``_IOC(_IOC_NONE, ...)`` with the struct size in the size field);
``tests/test_xen_dom0.py`` compiles the installed headers and compares.  The
calls are plain ``fcntl.ioctl`` and ``mmap``: no libxen bindings, so the
module needs nothing but the kernel's devices.

``detect()`` says whether this kernel runs as the control domain.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from vbus.errors import Busy, Closed, Invalid, NotFound, VbusError, from_errno
from vbus.log import get_logger

__all__ = [
    "CAPABILITIES",
    "EVTCHN_DEVICE",
    "GNTDEV_DEVICE",
    "IOCTL_EVTCHN_BIND_INTERDOMAIN",
    "IOCTL_EVTCHN_NOTIFY",
    "IOCTL_EVTCHN_UNBIND",
    "IOCTL_GNTDEV_GRANT_COPY",
    "IOCTL_GNTDEV_MAP_GRANT_REF",
    "IOCTL_GNTDEV_UNMAP_GRANT_REF",
    "PAGE_SIZE",
    "EventChannels",
    "Gntdev",
    "GrantCopier",
    "GrantMap",
    "detect",
]

log = get_logger("vbus.xen.dom0")

CAPABILITIES = Path("/proc/xen/capabilities")
GNTDEV_DEVICE = Path("/dev/xen/gntdev")
EVTCHN_DEVICE = Path("/dev/xen/evtchn")
PAGE_SIZE = 4096  # XEN_PAGE_SIZE: grants are always 4 KiB frames

_IOC_NRSHIFT, _IOC_TYPESHIFT, _IOC_SIZESHIFT, _IOC_DIRSHIFT = 0, 8, 16, 30
_IOC_NONE = 0


def _ioc(kind: str, nr: int, size: int) -> int:
    """``_IOC(_IOC_NONE, kind, nr, size)`` of asm-generic/ioctl.h."""
    return (
        (_IOC_NONE << _IOC_DIRSHIFT)
        | (size << _IOC_SIZESHIFT)
        | (ord(kind) << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
    )


# struct ioctl_gntdev_grant_ref { __u32 domid; __u32 ref; }
_GRANT_REF = struct.Struct("=II")
# struct ioctl_gntdev_map_grant_ref { __u32 count; __u32 pad; __u64 index;
#                                     struct ioctl_gntdev_grant_ref refs[1]; }
_MAP_HEAD = struct.Struct("=IIQ")
_MAP_SIZE = _MAP_HEAD.size + _GRANT_REF.size  # sizeof() counts refs[1]
# struct ioctl_gntdev_unmap_grant_ref { __u64 index; __u32 count; __u32 pad; }
_UNMAP = struct.Struct("=QII")
# struct ioctl_evtchn_bind_interdomain { unsigned int remote_domain, remote_port; }
_BIND_INTERDOMAIN = struct.Struct("=II")
# struct ioctl_evtchn_unbind / ioctl_evtchn_notify { unsigned int port; }
_PORT = struct.Struct("=I")

# struct gntdev_grant_copy_segment { union { void *virt; struct { grant_ref_t ref;
#   __u16 offset; domid_t domid; } foreign; } source, dest; __u16 len, flags; __s16 status; }
# (24 bytes: the pointer aligns it to 8); a grant side is (ref, offset, domid).
_COPY_FROM_GRANT = struct.Struct("=IHHQHHh2x")
_COPY_TO_GRANT = struct.Struct("=QIHHHHh2x")
_COPY_STATUS = struct.Struct("=h")
_COPY_STATUS_AT = 20
# struct ioctl_gntdev_grant_copy { unsigned int count; struct gntdev_grant_copy_segment *segments; }
_COPY = struct.Struct("=I4xQ")
GNTCOPY_SOURCE_GREF = 1 << 0
GNTCOPY_DEST_GREF = 1 << 1

IOCTL_GNTDEV_MAP_GRANT_REF = _ioc("G", 0, _MAP_SIZE)
IOCTL_GNTDEV_UNMAP_GRANT_REF = _ioc("G", 1, _UNMAP.size)
IOCTL_GNTDEV_GRANT_COPY = _ioc("G", 8, _COPY.size)
IOCTL_EVTCHN_BIND_INTERDOMAIN = _ioc("E", 1, _BIND_INTERDOMAIN.size)
IOCTL_EVTCHN_UNBIND = _ioc("E", 3, _PORT.size)
IOCTL_EVTCHN_NOTIFY = _ioc("E", 4, _PORT.size)

DOMID_MAX = 0x7FEF  # DOMID_FIRST_RESERVED - 1: the special domids are not grant peers
PENDING_BATCH = 64  # ports read per pending() call


def detect(capabilities: Path = CAPABILITIES) -> bool:
    """True when this kernel is Xen's control domain (``control_d`` in xenfs)."""
    try:
        return "control_d" in capabilities.read_text().split()
    except OSError:
        return False


def _error(exc: OSError, what: str) -> VbusError:
    code = exc.errno or errno.EIO
    return from_errno(code, f"{what}: {os.strerror(code)}")


def _open(path: Path, flags: int) -> int:
    try:
        return os.open(path, flags | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound(
            f"{path}: no such device (not a Xen dom0, or its driver is not loaded)"
        ) from None
    except OSError as exc:
        raise _error(exc, f"open {path}") from exc


def _check_domid(domid: int) -> None:
    if not 0 <= domid <= DOMID_MAX:
        raise Invalid(f"domid {domid} is not a domain")


class GrantMap:
    """Pages a domain granted, mapped into this process.  ``close()`` unmaps.

    ``buffer`` is the mapping; views of it must be released before ``close()``
    (the mapping refuses to go while exported).
    """

    def __init__(self, owner: Gntdev, domid: int, refs: tuple[int, ...], index: int) -> None:
        self.domid = domid
        self.refs = refs
        self.index = index  # the gntdev offset the range was reserved at
        self._owner = owner
        self._mmap: mmap.mmap | None = None

    @property
    def buffer(self) -> mmap.mmap:
        if self._mmap is None:
            raise Closed("grant mapping is closed")
        return self._mmap

    @property
    def closed(self) -> bool:
        return self._mmap is None

    def __len__(self) -> int:
        return len(self.refs) * PAGE_SIZE

    def close(self) -> None:
        area, self._mmap = self._mmap, None
        if area is None:
            return
        try:
            area.close()
        except BufferError:
            self._mmap = area
            raise Busy("grant mapping still has views exported") from None
        self._owner._release(self)

    def __enter__(self) -> GrantMap:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Gntdev:
    """``/dev/xen/gntdev``: maps grant references of other domains."""

    def __init__(self, path: Path = GNTDEV_DEVICE) -> None:
        self.path = path
        self._fd = _open(path, os.O_RDWR)
        self._maps: dict[int, GrantMap] = {}

    def fileno(self) -> int:
        if self._fd < 0:
            raise Closed(f"{self.path} is closed")
        return self._fd

    def map(self, domid: int, refs: Sequence[int], *, writable: bool = True) -> GrantMap:
        """Map the pages ``refs`` that ``domid`` granted to this domain, contiguously."""
        _check_domid(domid)
        if not refs:
            raise Invalid("no grant references to map")
        for ref in refs:
            if not 0 <= ref <= 0xFFFFFFFF:
                raise Invalid(f"grant reference {ref} is out of range")
        fd = self.fileno()
        count = len(refs)
        arg = bytearray(max(_MAP_SIZE, _MAP_HEAD.size + count * _GRANT_REF.size))
        _MAP_HEAD.pack_into(arg, 0, count, 0, 0)
        for i, ref in enumerate(refs):
            _GRANT_REF.pack_into(arg, _MAP_HEAD.size + i * _GRANT_REF.size, domid, ref)
        try:
            fcntl.ioctl(fd, IOCTL_GNTDEV_MAP_GRANT_REF, arg)
        except OSError as exc:
            raise _error(exc, f"gntdev map of {count} grant(s) of domain {domid}") from exc
        index = _MAP_HEAD.unpack_from(arg)[2]
        grant = GrantMap(self, domid, tuple(refs), index)
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        try:
            # the grants are mapped here: a bad reference fails this call
            grant._mmap = mmap.mmap(fd, len(grant), mmap.MAP_SHARED, prot, offset=index)
        except OSError as exc:
            self._unmap_ioctl(index, count)
            raise _error(exc, f"mapping grant(s) {list(refs)} of domain {domid}") from exc
        self._maps[index] = grant
        log.debug("xen.grant_mapped", domid=domid, refs=list(refs), index=index)
        return grant

    def _unmap_ioctl(self, index: int, count: int) -> None:
        try:
            fcntl.ioctl(self._fd, IOCTL_GNTDEV_UNMAP_GRANT_REF, _UNMAP.pack(index, count, 0))
        except OSError as exc:
            raise _error(exc, f"gntdev unmap at {index:#x}") from exc

    def _release(self, grant: GrantMap) -> None:
        self._maps.pop(grant.index, None)
        if self._fd >= 0:
            self._unmap_ioctl(grant.index, len(grant.refs))
        log.debug("xen.grant_unmapped", domid=grant.domid, refs=list(grant.refs))

    def close(self) -> None:
        """Unmap what is still mapped, then close the device."""
        for grant in list(self._maps.values()):
            grant.close()
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> Gntdev:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# Xen's GNTST_* (grant_table.h), for the log: what a failed copy segment says.
GNTST = {
    -1: "general error",
    -2: "unknown domain",
    -3: "bad grant reference",
    -4: "bad handle",
    -5: "bad virtual address",
    -6: "bad device address",
    -7: "no device space",
    -8: "permission denied",
    -9: "bad page",
    -10: "copy crosses a page",
    -11: "address too big",
    -12: "try again",
}


class GrantCopier:
    """Copies between one domain's granted pages and a local buffer of this
    process, in batches of ``IOCTL_GNTDEV_GRANT_COPY`` (the hypervisor does the
    copy; nothing of the domain is ever mapped here).

    ``buffer`` is the local side (``size`` bytes, its address fixed for the
    copier's life).  ``from_grant`` and ``to_grant`` queue one segment each,
    ``run()`` performs the queued batch and returns each segment's status in
    order (0, or a negative ``GNTST_*``).  A grant side must stay inside its
    page (``offset + length <= 4096``): the driver refuses the whole batch
    otherwise, so callers check first (``Invalid`` here).
    """

    def __init__(self, gntdev: Gntdev, domid: int, size: int, max_segments: int = 512) -> None:
        _check_domid(domid)
        self.gntdev = gntdev
        self.domid = domid
        self.size = size
        self.max_segments = max_segments
        self._buf = bytearray(size)
        self._segs = bytearray(max_segments * _COPY_FROM_GRANT.size)
        # Pinned: an exported bytearray cannot move or resize while these live.
        self._buf_c = (ctypes.c_char * size).from_buffer(self._buf)
        self._segs_c = (ctypes.c_char * len(self._segs)).from_buffer(self._segs)
        self._base = ctypes.addressof(self._buf_c)
        self.array = self._buf  # the local side, for Memory over it
        self.buffer = memoryview(self._buf)
        self.count = 0
        self.copies = 0  # segments copied since creation
        self.batches = 0  # ioctls

    def _check(self, ref: int, offset: int, length: int, at: int) -> None:
        if self.count >= self.max_segments:
            raise Invalid(f"at most {self.max_segments} copy segments per batch")
        if offset < 0 or length <= 0 or offset + length > PAGE_SIZE:
            raise Invalid(f"a copy of {length} bytes at offset {offset} leaves its page")
        if not 0 <= at <= self.size - length:
            raise Invalid("a copy outside the local buffer")
        if not 0 <= ref <= 0xFFFFFFFF:
            raise Invalid(f"grant reference {ref} is out of range")

    def from_grant(self, ref: int, offset: int, length: int, at: int) -> None:
        """Queue: ``length`` bytes at ``offset`` of grant ``ref`` into ``buffer[at:]``."""
        self._check(ref, offset, length, at)
        _COPY_FROM_GRANT.pack_into(
            self._segs,
            self.count * _COPY_FROM_GRANT.size,
            ref,
            offset,
            self.domid,
            self._base + at,
            length,
            GNTCOPY_SOURCE_GREF,
            0,
        )
        self.count += 1

    def to_grant(self, ref: int, offset: int, at: int, length: int) -> None:
        """Queue: ``buffer[at:at + length]`` into grant ``ref`` at ``offset``."""
        self._check(ref, offset, length, at)
        _COPY_TO_GRANT.pack_into(
            self._segs,
            self.count * _COPY_TO_GRANT.size,
            self._base + at,
            ref,
            offset,
            self.domid,
            length,
            GNTCOPY_DEST_GREF,
            0,
        )
        self.count += 1

    def run(self) -> list[int]:
        """Copy the queued segments; their statuses, in order."""
        count, self.count = self.count, 0
        if not count:
            return []
        arg = _COPY.pack(count, ctypes.addressof(self._segs_c))
        try:
            fcntl.ioctl(self.gntdev.fileno(), IOCTL_GNTDEV_GRANT_COPY, arg)
        except OSError as exc:
            raise _error(exc, f"grant copy of {count} segment(s) of domain {self.domid}") from exc
        self.batches += 1
        self.copies += count
        size = _COPY_FROM_GRANT.size
        segs = self._segs
        return [_COPY_STATUS.unpack_from(segs, i * size + _COPY_STATUS_AT)[0] for i in range(count)]

    def close(self) -> None:
        self.buffer.release()
        del self._buf_c, self._segs_c


class EventChannels:
    """``/dev/xen/evtchn``: this process's ends of interdomain event channels.

    Non-blocking by default, so ``pending()`` fits an event loop's reader on
    ``fileno()``.  A port that fired stays masked until ``unmask(port)``.
    """

    def __init__(self, path: Path = EVTCHN_DEVICE, *, blocking: bool = False) -> None:
        self.path = path
        self._fd = _open(path, os.O_RDWR | (0 if blocking else os.O_NONBLOCK))
        self.ports: set[int] = set()

    def fileno(self) -> int:
        if self._fd < 0:
            raise Closed(f"{self.path} is closed")
        return self._fd

    def bind_interdomain(self, domid: int, remote_port: int) -> int:
        """Bind to ``domid``'s unbound port ``remote_port``; the local port."""
        _check_domid(domid)
        arg = bytearray(_BIND_INTERDOMAIN.pack(domid, remote_port))
        try:
            port = int(fcntl.ioctl(self.fileno(), IOCTL_EVTCHN_BIND_INTERDOMAIN, arg))
        except OSError as exc:
            raise _error(exc, f"binding port {remote_port} of domain {domid}") from exc
        self.ports.add(port)
        log.debug("xen.evtchn_bound", domid=domid, remote_port=remote_port, port=port)
        return port

    def _port_ioctl(self, request: int, port: int, what: str) -> None:
        if port not in self.ports:
            raise NotFound(f"event channel port {port} is not bound here")
        try:
            fcntl.ioctl(self.fileno(), request, _PORT.pack(port))
        except OSError as exc:
            raise _error(exc, f"{what} port {port}") from exc

    def notify(self, port: int) -> None:
        """Signal the remote end of ``port``."""
        self._port_ioctl(IOCTL_EVTCHN_NOTIFY, port, "notify")

    def unbind(self, port: int) -> None:
        self._port_ioctl(IOCTL_EVTCHN_UNBIND, port, "unbind")
        self.ports.discard(port)
        log.debug("xen.evtchn_unbound", port=port)

    def pending(self) -> list[int]:
        """Ports that fired since the last read (empty when none, non-blocking)."""
        try:
            data = os.read(self.fileno(), PENDING_BATCH * _PORT.size)
        except BlockingIOError:
            return []
        except OSError as exc:
            raise _error(exc, f"reading {self.path}") from exc
        usable = len(data) - len(data) % _PORT.size
        return [port for (port,) in _PORT.iter_unpack(data[:usable])]

    def unmask(self, port: int) -> None:
        """Let ``port`` fire again (the driver masks a port when it fires)."""
        try:
            os.write(self.fileno(), _PORT.pack(port))
        except OSError as exc:
            raise _error(exc, f"unmasking port {port}") from exc

    def close(self) -> None:
        """Unbind every port (the kernel would on close; this says so in the log)."""
        for port in sorted(self.ports):
            try:
                self.unbind(port)
            except VbusError as exc:
                log.warning("xen.evtchn_unbind_failed", port=port, error=str(exc))
        self.ports.clear()
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> EventChannels:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
