"""Event channels between domains (Xen's public event_channel.h), delivered through eventfds.

Each port has an *inbox*, the eventfd that a send to it raises, and an
*outbox*, the eventfd a send from it raises.  ``alloc_unbound(dom,
remote_dom)`` makes a port of ``dom`` that ``remote_dom`` may bind; its
outbox is made at once, so a send before the binding is pending when it
comes (as EVTCHNOP_bind_interdomain promises).  ``bind_interdomain`` makes
the binder's port out of the unbound one's two eventfds, crossed.
``close`` of a bound port leaves the other end unbound, its eventfds kept,
awaiting a new binding.  Only these four operations exist.

The eventfds of a domain's ports are shared with that domain (it waits on
its inboxes and raises its outboxes itself, without a round trip through
the daemon), so the daemon touches them only as ``SharedEventfd``: reads
never block, and a write that would (a counter filled, O_NONBLOCK cleared
by the domain) is interrupted and becomes a ``Fault`` of that domain,
never a stalled sender.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from vbus.errors import Busy, Invalid, NotFound
from vbus.signal import SharedEventfd

__all__ = ["EvtchnTable", "Port", "PortTransport"]

MAX_PORTS = 1024  # per domain (Xen's 2-level ABI has 4096 on 64-bit; plenty here)


class _Efd:
    """An eventfd shared by the ports that use it (refcounted)."""

    __slots__ = ("refs", "transport")

    def __init__(self, role: str) -> None:
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            self.transport = SharedEventfd.adopt(fd, role, read=True)
        except BaseException:
            os.close(fd)
            raise
        self.refs = 0

    @property
    def fd(self) -> int:
        return self.transport.fd

    def hold(self) -> _Efd:
        self.refs += 1
        return self

    def drop(self) -> None:
        self.refs -= 1
        if self.refs <= 0:
            self.transport.close()


@dataclass(slots=True, eq=False)
class Port:
    dom: int
    port: int
    remote_dom: int
    inbox: _Efd
    outbox: _Efd
    peer: Port | None = None

    @property
    def bound(self) -> bool:
        return self.peer is not None


class EvtchnTable:
    """Every domain's ports (dom0's, the backend's, among them)."""

    def __init__(self) -> None:
        self.ports: dict[int, dict[int, Port]] = {}
        self.sends = 0

    def _new_port(self, dom: int) -> int:
        ports = self.ports.setdefault(dom, {})
        if len(ports) >= MAX_PORTS:
            raise Busy(f"domain {dom} has {MAX_PORTS} event channels, the limit")
        port = 1  # port 0 is never valid
        while port in ports:
            port += 1
        return port

    def get(self, dom: int, port: int) -> Port:
        found = self.ports.get(dom, {}).get(port)
        if found is None:
            raise NotFound(f"domain {dom} has no event channel {port}")
        return found

    def alloc_unbound(self, dom: int, remote_dom: int) -> Port:
        number = self._new_port(dom)
        inbox = _Efd(f"event channel {dom}:{number}").hold()
        try:
            outbox = _Efd(f"event channel {dom}:{number} (out)").hold()
        except BaseException:
            inbox.drop()
            raise
        port = Port(dom, number, remote_dom, inbox, outbox)
        self.ports[dom][number] = port
        return port

    def bind_interdomain(self, dom: int, remote_dom: int, remote_port: int) -> Port:
        remote = self.get(remote_dom, remote_port)
        if remote.bound:
            raise Busy(f"event channel {remote_dom}:{remote_port} is bound already")
        if remote.remote_dom != dom:
            raise Invalid(f"event channel {remote_dom}:{remote_port} is not for domain {dom}")
        number = self._new_port(dom)
        port = Port(dom, number, remote_dom, remote.outbox.hold(), remote.inbox.hold(), remote)
        remote.peer = port
        self.ports[dom][number] = port
        return port

    def send(self, dom: int, port: int) -> None:
        """Raise the other end (pending until bound); ``Fault`` rather than block."""
        self.sends += 1
        self.get(dom, port).outbox.transport.kick()

    def close(self, dom: int, port: int) -> None:
        ports = self.ports.get(dom, {})
        found = ports.pop(port, None)
        if found is None:
            raise NotFound(f"domain {dom} has no event channel {port}")
        if not ports:
            self.ports.pop(dom, None)
        if found.peer is not None:
            found.peer.peer = None  # unbound again, awaiting a new connection
            found.peer = None
        found.inbox.drop()
        found.outbox.drop()

    def close_domain(self, dom: int) -> int:
        """Close every port of ``dom``; how many there were."""
        numbers = list(self.ports.get(dom, {}))
        for number in numbers:
            self.close(dom, number)
        return len(numbers)

    def count(self, dom: int) -> int:
        return len(self.ports.get(dom, {}))


class PortTransport:
    """A backend port as a ring's ``Transport``: ``fd``/``drain`` its inbox,
    ``kick`` a send; ``close`` closes the port."""

    __slots__ = ("_inbox", "dom", "fd", "kicks", "number", "table")

    def __init__(self, table: EvtchnTable, port: Port) -> None:
        self.table = table
        self.dom = port.dom
        self.number = port.port
        self.fd = port.inbox.fd
        self.kicks = 0
        self._inbox = port.inbox.transport

    def kick(self) -> None:
        self.kicks += 1
        self.table.send(self.dom, self.number)

    def drain(self) -> int:
        return self._inbox.drain()

    def close(self) -> None:
        if self.number in self.table.ports.get(self.dom, {}):
            self.table.close(self.dom, self.number)
        self.fd = -1
