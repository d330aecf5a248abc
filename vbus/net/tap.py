"""Linux tap devices for venet: open, configure, and create one inside a network namespace.

A tap is opened with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR and a vnet header
size of 12, so every read and write is one venet frame exactly as it sits on
a queue (``vbus.net.vnet``).  The descriptor is non-blocking.  The interface
lives while the descriptor is open (not persistent); it keeps working when an
administrator moves it to another network namespace.

TUNSETOFFLOAD says what the process reading the tap accepts from the kernel
(partial checksums, TSO super-frames); what it writes may carry either
whatever was set.  ``offload_flags`` maps the negotiated virtio-net features
to those flags for each side.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Final, TypeVar

from vbus.net.vnet import (
    F_CSUM,
    F_GUEST_CSUM,
    F_GUEST_TSO4,
    F_GUEST_TSO6,
    F_HOST_TSO4,
    F_HOST_TSO6,
    HDR_SIZE,
)

__all__ = [
    "NETNS_DIR",
    "TUN_F_CSUM",
    "TUN_F_TSO4",
    "TUN_F_TSO6",
    "in_netns",
    "netns_path",
    "offload_flags",
    "open_tap",
    "set_carrier",
    "set_link",
    "set_offload",
    "valid_ifname",
]

T = TypeVar("T")

TUN_DEVICE: Final = "/dev/net/tun"
NETNS_DIR: Final = Path("/run/netns")  # where `ip netns add` binds namespaces

# linux/if_tun.h: _IOW('T', n, int) = 0x400454xx; TUNGETIFF is _IOR.
TUNSETIFF: Final = 0x400454CA
TUNSETOFFLOAD: Final = 0x400454D0
TUNSETVNETHDRSZ: Final = 0x400454D8
TUNSETVNETLE: Final = 0x400454DC
TUNSETCARRIER: Final = 0x400454E2
IFF_TAP: Final = 0x0002
IFF_NO_PI: Final = 0x1000
IFF_VNET_HDR: Final = 0x4000
TUN_F_CSUM: Final = 0x01
TUN_F_TSO4: Final = 0x02
TUN_F_TSO6: Final = 0x04
# linux/sockios.h and linux/if.h
SIOCGIFFLAGS: Final = 0x8913
SIOCSIFFLAGS: Final = 0x8914
SIOCSIFMTU: Final = 0x8922
SIOCSIFHWADDR: Final = 0x8924
ARPHRD_ETHER: Final = 1
IFF_UP: Final = 0x1
CLONE_NEWNET: Final = 0x40000000
IFNAMSIZ: Final = 16
_IFREQ_SIZE: Final = 40


def valid_ifname(name: str) -> bool:
    """What the kernel takes as an interface name (dev_valid_name)."""
    return (
        0 < len(name.encode()) < IFNAMSIZ
        and name not in (".", "..")
        and not any(c in "/:" or c.isspace() for c in name)
    )


def _ifreq(name: str, tail: bytes = b"") -> bytes:
    return struct.pack("16s", name.encode()) + tail.ljust(_IFREQ_SIZE - IFNAMSIZ, b"\0")


def offload_flags(features: int, *, reader: str) -> int:
    """TUNSETOFFLOAD flags for a tap read by the ``"device"`` (the daemon's tap
    backend: what it reads goes to the north, so the GUEST_* features count)
    or by the ``"driver"`` (``vbus tap``: what it reads goes to the device,
    so CSUM and HOST_*)."""
    if reader == "device":
        csum, tso4, tso6 = F_GUEST_CSUM, F_GUEST_TSO4, F_GUEST_TSO6
    else:
        csum, tso4, tso6 = F_CSUM, F_HOST_TSO4, F_HOST_TSO6
    if not features & csum:
        return 0  # TSO without checksum offload does not exist
    flags = TUN_F_CSUM
    if features & tso4:
        flags |= TUN_F_TSO4
    if features & tso6:
        flags |= TUN_F_TSO6
    return flags


def open_tap(name: str, offload: int = 0) -> tuple[int, str]:
    """Create (or attach to) tap ``name`` in the calling thread's network
    namespace; returns its non-blocking descriptor and the kernel's name."""
    if not valid_ifname(name):
        raise ValueError(f"bad interface name {name!r}")
    fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        ifr = fcntl.ioctl(
            fd, TUNSETIFF, _ifreq(name, struct.pack("H", IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
        )
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", HDR_SIZE))
        try:
            # virtio 1.x headers are little-endian whatever the host; on a
            # little-endian host this is already so.
            fcntl.ioctl(fd, TUNSETVNETLE, struct.pack("i", 1))
        except OSError:
            if struct.pack("=H", 1) != b"\x01\x00":
                raise
        set_offload(fd, offload)
    except BaseException:
        os.close(fd)
        raise
    return fd, ifr[:IFNAMSIZ].rstrip(b"\0").decode()


def set_offload(fd: int, flags: int) -> None:
    fcntl.ioctl(fd, TUNSETOFFLOAD, flags)


def set_carrier(fd: int, on: bool) -> None:
    """Carrier up or down (TUNSETCARRIER, Linux 4.19): the stack stops
    sending to a tap without carrier instead of queueing for nobody."""
    fcntl.ioctl(fd, TUNSETCARRIER, struct.pack("i", int(on)))


def set_link(
    name: str, *, mtu: int | None = None, mac: bytes | None = None, up: bool | None = None
) -> None:
    """Set the MTU, the MAC address and/or the administrative state of
    interface ``name`` in the calling thread's network namespace."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        if mac is not None:
            fcntl.ioctl(sock, SIOCSIFHWADDR, _ifreq(name, struct.pack("H6s", ARPHRD_ETHER, mac)))
        if mtu is not None:
            fcntl.ioctl(sock, SIOCSIFMTU, _ifreq(name, struct.pack("i", mtu)))
        if up is not None:
            raw = fcntl.ioctl(sock, SIOCGIFFLAGS, _ifreq(name))
            flags = struct.unpack_from("H", raw, IFNAMSIZ)[0]
            flags = flags | IFF_UP if up else flags & ~IFF_UP
            fcntl.ioctl(sock, SIOCSIFFLAGS, _ifreq(name, struct.pack("H", flags)))


def netns_path(name: str) -> Path:
    """The bind mount of network namespace ``name`` (``ip netns add``);
    ``FileNotFoundError`` when there is none."""
    if not name or "/" in name or name in (".", ".."):
        raise FileNotFoundError(f"bad network namespace name {name!r}")
    path = NETNS_DIR / name
    if not path.exists():
        raise FileNotFoundError(f"no network namespace {name!r} ({path})")
    return path


def in_netns(name: str | None, work: Callable[[], T]) -> T:
    """Run ``work`` inside network namespace ``name`` (or here, for None).

    A namespace belongs to a thread: ``work`` runs in a new thread that
    enters the namespace and ends with it, so no other code of this process
    ever runs there.  Descriptors and interfaces it creates stay where they
    were made.  Its result or exception comes back to the caller."""
    if name is None:
        return work()
    path = netns_path(name)
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            ns = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                if libc.setns(ns, CLONE_NEWNET) != 0:
                    code = ctypes.get_errno()
                    raise OSError(code, f"setns into {name!r}: {os.strerror(code)}")
            finally:
                os.close(ns)
            result.append(work())
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=run, name=f"netns-{name}", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]
