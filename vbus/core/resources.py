"""What north contexts may hold of the daemon's finite resources, and who holds what.

Shared memory is charged to the daemon once it touches the pages (the north's
sparse memfd becomes the daemon's RSS), and every registered queue costs
descriptors and a mapping.  So each is bounded per peer and per uid, with
a reserve the north can never take: descriptors for the admin tree, the log and
new connections, mappings below ``vm.max_map_count``.  The peer asking for
more than its share is refused (``NoSpace``, ``TooManyFiles``) with the bound
in the reason; nobody else is blamed for it.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass

from vbus.errors import NoSpace, TooManyFiles

__all__ = ["Account", "Ledger", "ResourceLimits", "format_size", "parse_size"]

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """``64M``, ``1G``, ``4096`` -> bytes (binary units; a trailing ``B``/``iB`` is fine)."""
    raw = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = raw[-1:] if raw[-1:] in _UNITS else ""
    number = raw[: len(raw) - len(unit)]
    if not number.isdigit():
        raise ValueError(f"{text!r} is not a size (e.g. 512M, 4G)")
    return int(number) * _UNITS[unit]


def format_size(size: int) -> str:
    for unit in ("T", "G", "M", "K"):
        if size >= _UNITS[unit] and size % _UNITS[unit] == 0:
            return f"{size // _UNITS[unit]}{unit}"
    return str(size)


def _physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _max_map_count() -> int:
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 65530


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@dataclass(slots=True)
class ResourceLimits:
    """Bounds; 0 means "derive from the machine" (see ``Ledger``)."""

    shm_per_peer: int = 1 << 30
    shm_per_uid: int = 4 << 30
    shm_total: int = 0  # 0: half of physical memory
    fds_per_uid: int = 0  # 0: a quarter of the descriptors left above the reserve
    fd_reserve: int = 0  # 0: max(64, RLIMIT_NOFILE / 16)
    map_reserve: int = 1024  # mappings kept below vm.max_map_count


class Ledger:
    """The daemon-wide books: one ``Account`` per peer, totals per uid and overall.

    Descriptor figures count what north contexts make the daemon hold (their
    sockets and queue eventfds); the budget is RLIMIT_NOFILE minus what was open
    when the ledger was made minus the reserve.
    """

    def __init__(self, limits: ResourceLimits | None = None) -> None:
        limits = limits or ResourceLimits()
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        reserve = limits.fd_reserve or max(64, nofile // 16)
        self.shm_per_peer = limits.shm_per_peer
        self.shm_per_uid = limits.shm_per_uid
        self.shm_total = limits.shm_total or _physical_memory() // 2
        self.fd_budget = max(0, nofile - _open_fds() - reserve)
        self.fds_per_uid = limits.fds_per_uid or max(16, self.fd_budget // 4)
        self.map_budget = max(0, _max_map_count() - limits.map_reserve - _maps_in_use())
        self.shm = 0
        self.fds = 0
        self.maps = 0
        self._uid_shm: dict[int | str, int] = {}
        self._uid_fds: dict[int | str, int] = {}

    def account(self, owner: int | str) -> Account:
        """A new peer's account, charged to ``owner``: a uid (a process, or a
        VM through its VMM) or a label such as ``"domid 7"`` (a Xen domain)."""
        return Account(self, owner)

    def uid_usage(self, owner: int | str) -> tuple[int, int]:
        """(shared-memory bytes, descriptors) held by ``owner``'s peers."""
        return self._uid_shm.get(owner, 0), self._uid_fds.get(owner, 0)

    def _take(self, account: Account, shm: int, fds: int, maps: int) -> None:
        uid = account.uid
        who = f"uid {uid}" if isinstance(uid, int) else uid
        if fds:
            held = self._uid_fds.get(uid, 0)
            if held + fds > self.fds_per_uid:
                raise TooManyFiles(
                    f"file descriptor limit for {who} reached ({held} of {self.fds_per_uid} held)"
                )
            if self.fds + fds > self.fd_budget:
                raise TooManyFiles("the daemon is short of file descriptors; try again later")
        if maps and self.maps + maps > self.map_budget:
            raise NoSpace("the daemon is short of memory mappings (vm.max_map_count)")
        if shm:
            if account.shm + shm > self.shm_per_peer:
                raise NoSpace(
                    f"shared memory limit per connection is {format_size(self.shm_per_peer)} "
                    f"({format_size(account.shm)} registered, {format_size(shm)} more asked)"
                )
            held = self._uid_shm.get(uid, 0)
            if held + shm > self.shm_per_uid:
                raise NoSpace(
                    f"shared memory limit for {who} is {format_size(self.shm_per_uid)} "
                    f"({format_size(held)} registered)"
                )
            if self.shm + shm > self.shm_total:
                raise NoSpace("the daemon's shared memory limit is reached; try again later")
        self._move(account, shm, fds, maps)

    def _move(self, account: Account, shm: int, fds: int, maps: int) -> None:
        uid = account.uid
        account.shm += shm
        account.fds += fds
        account.maps += maps
        self.shm += shm
        self.fds += fds
        self.maps += maps
        for books, delta in ((self._uid_shm, shm), (self._uid_fds, fds)):
            if delta:
                value = books.get(uid, 0) + delta
                if value:
                    books[uid] = value
                else:
                    books.pop(uid, None)


class Account:
    """What one peer holds.  ``take`` refuses past a bound; ``close`` gives all back."""

    __slots__ = ("fds", "ledger", "maps", "shm", "uid")

    def __init__(self, ledger: Ledger, uid: int | str) -> None:
        self.ledger = ledger
        self.uid = uid
        self.shm = 0
        self.fds = 0
        self.maps = 0

    def take(self, *, shm: int = 0, fds: int = 0, maps: int = 0) -> None:
        self.ledger._take(self, shm, fds, maps)

    def give(self, *, shm: int = 0, fds: int = 0, maps: int = 0) -> None:
        self.ledger._move(self, -shm, -fds, -maps)

    def close(self) -> None:
        self.give(shm=self.shm, fds=self.fds, maps=self.maps)


def _maps_in_use() -> int:
    try:
        with open("/proc/self/maps", "rb") as f:
            return f.read().count(b"\n")
    except OSError:
        return 0
