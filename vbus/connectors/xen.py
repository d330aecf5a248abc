"""The Xen connector: domains reach their bus through xenstore, grants and event channels.

A domain process attaches on ``<run-dir>/xen.sock`` (``vbus.xen.abi``): its
domid, its memory and its grant table, both memfds.  It is admitted as
``Domain(domid)`` by the ``domid:N`` member rules only, one attachment per
domid.  The connector then does what a Xen toolstack and a backend do:

- introduces the domain to the embedded xenstore, gives it a connection of
  its own (unprivileged: that domain's permissions and quotas), and writes
  its directory and, for every device of its bus, a frontend directory
  ``/local/domain/N/device/vbus/ID`` (owned by the domain) and a backend
  directory ``/local/domain/0/backend/vbus/N/ID`` (owned by dom0, readable
  by the domain), backend in state InitWait;
- watches each frontend's ``state``.  At Initialised it opens the device,
  maps the grants the frontend lists (``GrantMemory``: the device
  connection's only view of the domain's memory), binds the event channels,
  builds an ioq ring per queue over the mapped pages, serves the call page,
  and goes to Connected.  Frontend Closing or Closed: the backend releases
  everything and follows; a fault or the device's removal: the backend
  releases, writes ``error`` and goes to Closing, and the frontend follows;
- a hang-up (or the domain's death) releases every device, sets each backend
  Closing then Closed with ``online = 0``, closes the domain's event
  channels, unpins its grants, unmaps its memory and RELEASEs it (its
  directory and every node it owns go, ``@releaseDomain`` fires).

The backend directories of a domain that went stay, Closed, until that
domid attaches again (or the daemon restarts: domain nodes are not saved).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import mmap
import os
import socket
import time
from pathlib import Path
from typing import Any

from vbus.connectors.base import Attachment, Limits, North, NorthCore
from vbus.core.members import NOT_A_MEMBER, Domain
from vbus.core.model import RevokeKind, Topology
from vbus.core.resources import Ledger
from vbus.errors import Busy, Denied, Fault, Invalid, ProtocolError, VbusError
from vbus.ioq import IoqSouth
from vbus.log import get_logger
from vbus.memory import PAGE_SIZE, validate_memfd
from vbus.xen import abi
from vbus.xen.abi import MsgType, XenbusState, backend_path, frontend_path
from vbus.xen.evtchn import EvtchnTable, PortTransport
from vbus.xen.grants import ENTRY_SIZE, GrantMapper, GrantMemory, GrantTable
from vbus.xen.xenstore import LocalClient, XenstoreServer, domain_path
from vbus.xen.xswire import XsError

__all__ = ["XenConnector"]

log = get_logger("vbus.xen")

MAX_MEMORY = 1 << 30  # bytes of memory per domain
MAX_GRANT_ENTRIES = 1 << 18
MAX_QUEUES = 8  # per device
MAX_BUF_REFS = 1024  # data grants per queue
_CMSG_SPACE = socket.CMSG_SPACE(abi.MAX_FDS * 4)
_M32 = 0xFFFFFFFF
# The attach socket, the memfd references the three mappings keep, the
# daemon's end of the domain's xenstore connection.
_DOMAIN_FDS = 5
_PORT_FDS = 2  # an event channel's inbox and outbox, held until it is closed


class _Device:
    """One device of the domain's bus, as its backend: the xenstore side and,
    once connected, the attachment and what it maps."""

    def __init__(self, domain: _Domain, devid: int, name: str, deviceclass: str) -> None:
        self.domain = domain
        self.devid = devid
        self.name = name
        self.deviceclass = deviceclass
        self.front = frontend_path(domain.domid, devid)
        self.back = backend_path(domain.domid, devid)
        self.state = XenbusState.INITIALISING
        self.attachment: Attachment | None = None
        self.memory: GrantMemory | None = None
        self.call_port: PortTransport | None = None
        self.call_words: memoryview[int] | None = None
        self.call_busy = False
        self.gone = False  # unlinked from the bus: its nodes go once the frontend is Closed
        self.token: bytes | None = None


class _Domain:
    """One attached domain: its socket, memory, grants, devices.  Also the core's ``Hooks``."""

    def __init__(self, connector: XenConnector, sock: socket.socket) -> None:
        self.connector = connector
        self.sock = sock
        self.fd = sock.fileno()
        self.domid = 0
        self.name = ""
        self.north: North | None = None
        self.rw: mmap.mmap | None = None
        self.ro: mmap.mmap | None = None
        self.table_map: mmap.mmap | None = None
        self.table: GrantTable | None = None
        self.mapper: GrantMapper | None = None
        self.devices: dict[int, _Device] = {}
        self.closed = False
        self.since = time.time()
        self.log = log
        self.deadline: asyncio.TimerHandle | None = None

    # --- the core's hooks ---------------------------------------------------------------
    def _device_of(self, handle: int) -> _Device | None:
        for device in self.devices.values():
            if device.attachment is not None and device.attachment.id == handle:
                return device
        return None

    def faulted(self, handle: int, reason: str) -> None:
        device = self._device_of(handle)
        if device is not None:
            self.connector._close_device(device, f"faulted: {reason}")

    def revoked(self, handle: int, kind: RevokeKind, reason: str) -> None:
        device = self._device_of(handle)
        if device is not None:
            device.gone = True
            self.connector._close_device(device, f"{kind}: {reason}")

    def expelled(self, reason: str) -> None:
        self.connector._drop(self, reason, level="info")


class XenConnector:
    """Serves ``xen.sock`` and the backends of every attached domain."""

    name = "xen"

    def __init__(
        self,
        topology: Topology,
        socket_path: Path,
        loop: asyncio.AbstractEventLoop,
        xenstore: XenstoreServer,
        limits: Limits | None = None,
        ledger: Ledger | None = None,
    ) -> None:
        self.topology = topology
        self.path = socket_path
        self.loop = loop
        self.xenstore = xenstore
        self.limits = limits or Limits()
        self.core = NorthCore(self.name, topology, loop, ledger, self.limits)
        self.counters = self.core.counters
        self.evtchn = EvtchnTable()
        self.domains: dict[int, _Domain] = {}  # by socket fd
        self.by_domid: dict[int, _Domain] = {}
        self.xs: LocalClient | None = None
        self._listener: socket.socket | None = None

    # --- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        self.xs = LocalClient(self.xenstore.store, defer=self.loop.call_soon)
        self._clear_domains()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            sock.bind(str(self.path))
            os.chmod(self.path, 0o600)
            sock.listen(64)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._listener = sock
        self.loop.add_reader(sock.fileno(), self._accept)
        self.topology.link_watchers.append(self._links_changed)
        log.info("xen.listening", socket=str(self.path))

    def _clear_domains(self) -> None:
        """No domain survives a restart: nodes left of earlier ones go."""
        xs = self.xs
        assert xs is not None
        with contextlib.suppress(XsError):
            for entry in xs.directory("/local/domain"):
                if entry != "0":
                    xs.rm(f"/local/domain/{entry}")
        with contextlib.suppress(XsError):
            xs.rm("/local/domain/0/backend/vbus")

    def stop(self, reason: str = "daemon stopping") -> None:
        with contextlib.suppress(ValueError):
            self.topology.link_watchers.remove(self._links_changed)
        if self._listener is not None:
            self.loop.remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        for domain in list(self.domains.values()):
            self._drop(domain, reason, level="info")
        if self.xs is not None:
            self.xs.close()
            self.xs = None

    def clients(self) -> int:
        return len(self.domains)

    def queue_totals(self) -> dict[str, int]:
        return self.core.queue_totals()

    def describe(self) -> list[dict[str, Any]]:
        out = []
        for d in self.domains.values():
            entry: dict[str, Any] = {"domid": d.domid, "name": d.name, "since": d.since}
            if d.north is not None:
                entry.update(d.north.describe())
            entry["grants_mapped"] = d.mapper.mapped if d.mapper else 0
            entry["event_channels"] = self.evtchn.count(d.domid) if d.domid else 0
            out.append(entry)
        return out

    # --- the attach socket -------------------------------------------------------------------
    def _accept(self) -> None:
        assert self._listener is not None
        for _ in range(16):
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("xen.accept_failed", reason=exc.strerror)
                return
            sock.setblocking(False)
            domain = _Domain(self, sock)
            self.domains[domain.fd] = domain
            self.counters["accepted"] += 1
            domain.deadline = self.loop.call_later(
                self.limits.handshake_timeout, self._attach_expired, domain
            )
            self.loop.add_reader(domain.fd, self._readable, domain)

    def _attach_expired(self, domain: _Domain) -> None:
        domain.deadline = None
        if domain.north is None:
            self._drop(domain, "no ATTACH within the handshake timeout")

    def _send(self, domain: _Domain, frame: bytes, fds: list[int] | None = None) -> None:
        try:
            if fds:
                domain.sock.sendmsg(
                    [frame],
                    [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))],
                    socket.MSG_DONTWAIT,
                )
            else:
                domain.sock.send(frame, socket.MSG_DONTWAIT)
        except OSError as exc:
            # One reply per request, a few per attach: a domain that does not
            # read them has stopped being one.
            self.loop.call_soon(self._drop, domain, f"send failed: {exc.strerror}")

    def _readable(self, domain: _Domain) -> None:
        try:
            data, ancdata, flags, _ = domain.sock.recvmsg(abi.MAX_FRAME, _CMSG_SPACE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._drop(domain, f"receive failed: {exc.strerror}", level="info")
            return
        fds: list[int] = []
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.extend(array.array("i", payload[: len(payload) - len(payload) % 4]))
        if not data and not fds:
            self._drop(domain, "the domain hung up", level="info")
            return
        seq = 0
        try:
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                raise ProtocolError("frame or descriptors truncated")
            mtype, seq, fields = abi.decode(data)
            if len(fds) != abi.FD_COUNT.get(mtype, 0):
                raise ProtocolError(f"{mtype.name} with {len(fds)} descriptors")
            if mtype == MsgType.ATTACH:
                attach = fields[0]
                assert isinstance(attach, abi.Attach)
                try:
                    self._attach(domain, seq, attach, fds)
                except VbusError as exc:
                    self._send(domain, abi.encode(MsgType.ERROR, seq, exc.errno, exc.message))
                    self.counters["refused"] += 1
                    self._drop(domain, f"attach refused: {exc.message}", level="info")
                    return
            elif domain.north is None:
                raise ProtocolError(f"{mtype.name} before ATTACH")
            elif mtype == MsgType.EVTCHN_ALLOC_UNBOUND:
                (remote,) = fields
                assert isinstance(remote, int)
                domain.north.account.take(fds=_PORT_FDS)  # bounded by the domain's share
                try:
                    port = self.evtchn.alloc_unbound(domain.domid, remote)
                except BaseException:
                    domain.north.account.give(fds=_PORT_FDS)
                    raise
                self._send(
                    domain, abi.encode(MsgType.EVTCHN_PORT, seq, port.port),
                    [port.inbox.fd, port.outbox.fd],
                )  # fmt: skip
            elif mtype == MsgType.EVTCHN_BIND_INTERDOMAIN:
                remote, remote_port = fields
                assert isinstance(remote, int) and isinstance(remote_port, int)
                domain.north.account.take(fds=_PORT_FDS)
                try:
                    port = self.evtchn.bind_interdomain(domain.domid, remote, remote_port)
                except BaseException:
                    domain.north.account.give(fds=_PORT_FDS)
                    raise
                self._send(
                    domain, abi.encode(MsgType.EVTCHN_PORT, seq, port.port),
                    [port.inbox.fd, port.outbox.fd],
                )  # fmt: skip
            elif mtype == MsgType.EVTCHN_CLOSE:
                (number,) = fields
                assert isinstance(number, int)
                self.evtchn.close(domain.domid, number)
                domain.north.account.give(fds=_PORT_FDS)
                self._send(domain, abi.encode(MsgType.OK, seq))
            else:
                raise ProtocolError(f"{mtype.name} is not a request")
        except VbusError as exc:
            self._send(domain, abi.encode(MsgType.ERROR, seq, exc.errno, exc.message))
            if isinstance(exc, ProtocolError) or domain.north is None:
                self._drop(domain, exc.message)
        finally:
            for fd in fds:
                os.close(fd)

    # --- attaching -------------------------------------------------------------------------------
    def _attach(self, domain: _Domain, seq: int, msg: abi.Attach, fds: list[int]) -> None:
        if domain.north is not None:
            raise ProtocolError("ATTACH twice")
        if msg.version != abi.VERSION:
            raise ProtocolError(f"attach version {msg.version} (this daemon speaks 1)")
        identity = Domain(msg.domid)  # Invalid for reserved or out-of-range domids
        if msg.domid == 0:
            raise Invalid("dom0 is the host")
        if msg.domid in self.by_domid:
            raise Busy(f"domain {msg.domid} is attached already")
        if not 0 < msg.memory <= MAX_MEMORY or msg.memory % PAGE_SIZE:
            raise Invalid(f"memory of {msg.memory} bytes: whole pages, at most {MAX_MEMORY}")
        if not 0 < msg.grant_entries <= MAX_GRANT_ENTRIES:
            raise Invalid(f"{msg.grant_entries} grant entries (1..{MAX_GRANT_ENTRIES})")
        if validate_memfd(fds[0], max_size=MAX_MEMORY) != msg.memory:
            raise Invalid("the memory memfd is not the size announced")
        table_size = msg.grant_entries * ENTRY_SIZE
        if validate_memfd(fds[1], max_size=MAX_GRANT_ENTRIES * ENTRY_SIZE) < table_size:
            raise Invalid("the grant table memfd is smaller than its entries")
        north = self.core.north(identity, domain, log.bind(domid=msg.domid))
        domain.log = north.log
        try:
            north.account.take(shm=msg.memory + table_size, fds=_DOMAIN_FDS, maps=3)
        except VbusError:
            north.release("refused")
            raise
        domain.north = north
        domain.domid = msg.domid
        domain.name = msg.name
        try:
            domain.rw = mmap.mmap(fds[0], msg.memory, mmap.MAP_SHARED)
            domain.ro = mmap.mmap(fds[0], msg.memory, mmap.MAP_SHARED, mmap.PROT_READ)
            domain.table_map = mmap.mmap(fds[1], table_size, mmap.MAP_SHARED)
        except OSError as exc:
            raise Invalid(f"cannot map the domain's memory: {exc.strerror}") from None
        domain.table = GrantTable(domain.table_map)
        domain.mapper = GrantMapper(domain.table, domain.rw, domain.ro)
        member = north.join()
        if member is None:
            raise Denied(NOT_A_MEMBER)
        if domain.deadline is not None:
            domain.deadline.cancel()
            domain.deadline = None
        self.by_domid[domain.domid] = domain
        north.log = domain.log = north.log.bind(bus=member.bus.name)
        theirs = self._introduce(domain)
        try:
            self._send(domain, abi.encode(MsgType.ATTACHED, seq, domain.domid, member.bus.name),
                       [theirs.fileno()])  # fmt: skip
        finally:
            theirs.close()
        domain.log.info("domain.attached", name=msg.name, memory=msg.memory,
                        devices=len(domain.devices))  # fmt: skip

    def _introduce(self, domain: _Domain) -> socket.socket:
        """The toolstack's part: the domain in xenstore, its devices published."""
        xs = self.xs
        assert xs is not None and domain.north is not None
        domid = domain.domid
        store = self.xenstore.store
        base = domain_path(domid)
        with contextlib.suppress(XsError):
            xs.rm(base)
        with contextlib.suppress(XsError):
            xs.rm(f"/local/domain/0/backend/vbus/{domid}")
        xs.mkdir(base)
        xs.set_perms(base, ["n0", f"r{domid}"])
        xs.write(f"{base}/name", domain.name or f"domain-{domid}")
        xs.write(f"{base}/domid", str(domid))
        for sub, perms in (("device", ["n0", f"r{domid}"]), ("data", [f"n{domid}"])):
            xs.mkdir(f"{base}/{sub}")
            xs.set_perms(f"{base}/{sub}", perms)
        xs.mkdir(f"{base}/device/vbus")
        xs.set_perms(f"{base}/device/vbus", ["n0", f"r{domid}"])
        store.introduce(domid)
        bus = domain.north.bus
        for dev in self.topology.devices_on(bus):
            device = _Device(domain, bus.id_of(dev), dev.name, dev.deviceclass or "")
            domain.devices[device.devid] = device
            self._publish(device)
        return self.xenstore.domain_socket(domid)

    def _links_changed(self) -> None:
        """A device was linked to or unlinked from a bus: every attached
        domain on it sees the new one published (InitWait, as at attach), and
        a published one that is no longer there goes Closing; its nodes go
        once the frontend is Closed.  Open devices are revoked by the
        topology first (``revoked``), so they are already marked gone."""
        for domain in list(self.by_domid.values()):
            north = domain.north
            if domain.closed or north is None:
                continue
            bus = north.bus
            try:
                linked = {bus.id_of(dev): dev for dev in self.topology.devices_on(bus)}
            except VbusError:
                continue  # the bus is going: the core expels its members
            for devid, device in list(domain.devices.items()):
                dev = linked.get(devid)
                if device.gone or (dev is not None and dev.name == device.name):
                    continue
                device.gone = True
                idle = device.state in (XenbusState.INIT_WAIT, XenbusState.CLOSED)
                if idle and device.attachment is None:
                    self._set_state(device, XenbusState.CLOSED)  # nothing was connected
                    self._unpublish(device)
                else:
                    self._close_device(device, f"device {device.name!r} was unlinked")
            for devid, dev in linked.items():
                if devid not in domain.devices:
                    device = _Device(domain, devid, dev.name, dev.deviceclass or "")
                    domain.devices[devid] = device
                    self._publish(device)
                    domain.log.info("backend.published", device=dev.name, devid=devid)

    def _publish(self, device: _Device) -> None:
        xs = self.xs
        assert xs is not None
        domid = device.domain.domid
        front, back = device.front, device.back
        xs.mkdir(front)
        xs.set_perms(front, [f"n{domid}", "r0"])  # the domain's own, as a toolstack makes it
        for key, value in (("backend", back), ("backend-id", "0"), ("name", device.name),
                           ("class", device.deviceclass), ("state", "1")):  # fmt: skip
            xs.write(f"{front}/{key}", value)
        xs.mkdir(back)
        xs.set_perms(back, ["n0", f"r{domid}"])
        for key, value in (("frontend", front), ("frontend-id", str(domid)), ("online", "1"),
                           ("name", device.name), ("class", device.deviceclass),
                           ("max-queues", str(MAX_QUEUES)), ("feature-call", "1")):  # fmt: skip
            xs.write(f"{back}/{key}", value)
        self._set_state(device, XenbusState.INITIALISING)
        device.token = xs.watch(f"{front}/state", lambda _path: self._frontend_changed(device))
        self._set_state(device, XenbusState.INIT_WAIT)

    def _set_state(self, device: _Device, state: XenbusState) -> None:
        device.state = state
        assert self.xs is not None
        self.xs.write(f"{device.back}/state", str(int(state)))
        device.domain.log.info("backend.state", device=device.name, state=state.name)

    # --- the XenbusState handshake ------------------------------------------------------------------
    def _frontend_changed(self, device: _Device) -> None:
        domain = device.domain
        if domain.closed or self.xs is None:
            return
        raw = self.xs.read_or(f"{device.front}/state")
        try:
            state = XenbusState(int(raw or b"0"))
        except ValueError:
            state = XenbusState.UNKNOWN
        if state == XenbusState.INITIALISED and device.state == XenbusState.INIT_WAIT:
            self._connect(device)
        elif state == XenbusState.CLOSING and device.state != XenbusState.CLOSED:
            self._close_device(device, "the frontend is closing", error=False)
        elif state == XenbusState.CLOSED and device.state in (
            XenbusState.CLOSING,
            XenbusState.CONNECTED,
            XenbusState.INIT_WAIT,
        ):
            if device.state != XenbusState.CLOSING:
                self._close_device(device, "the frontend closed", error=False)
            self._set_state(device, XenbusState.CLOSED)
            if device.gone:
                self._unpublish(device)
        elif (
            state == XenbusState.INITIALISING
            and device.state == XenbusState.CLOSED
            and not device.gone
        ):
            with contextlib.suppress(XsError):
                self.xs.rm(f"{device.back}/error")
            self._set_state(device, XenbusState.INIT_WAIT)  # the frontend starts over

    def _connect(self, device: _Device) -> None:
        domain = device.domain
        assert domain.north is not None and domain.mapper is not None
        try:
            attachment = domain.north.open(device.devid)
        except VbusError as exc:
            self._fail(device, exc.message)
            return
        device.attachment = attachment
        try:
            self._build(device, attachment)
        except Fault as exc:
            attachment.fault(exc.message)  # the hook closes the backend
            return
        except VbusError as exc:
            self._fail(device, exc.message)
            return
        self._set_state(device, XenbusState.CONNECTED)

    def _fail(self, device: _Device, reason: str) -> None:
        """A refusal that is not a fault: the device connection is closed, told why."""
        if device.attachment is not None:
            device.attachment.close(reason)
        self._close_device(device, reason)

    def _build(self, device: _Device, attachment: Attachment) -> None:
        """Map what the frontend granted, bind its channels, register its queues."""
        domain = device.domain
        assert domain.mapper is not None and self.xs is not None
        front = device.front
        memory = GrantMemory(domain.mapper)
        device.memory = memory
        call_ref = _number(self.xs.read_or(f"{front}/call-ref"), "call-ref")
        memory.map_grant(call_ref)
        device.call_words = memory.cast(call_ref * PAGE_SIZE, abi.CALL_DATA, "I")
        device.call_port = self._bind(domain, _number(
            self.xs.read_or(f"{front}/call-event-channel"), "call-event-channel"))  # fmt: skip
        call_fd = device.call_port.fd
        self.loop.add_reader(call_fd, self._call_ready, device)
        queues = self.xs.read_or(f"{front}/queues").split()
        if len(queues) > MAX_QUEUES:
            raise Invalid(f"more than {MAX_QUEUES} queues")
        for raw in queues:
            index = _number(raw, "queue index")
            q = f"{front}/queue-{index}"
            ring_ref = _number(self.xs.read_or(f"{q}/ring-ref"), "ring-ref")
            count = _number(self.xs.read_or(f"{q}/count"), "count")
            writable = self.xs.read_or(f"{q}/writable") == b"1"
            buf_refs = self.xs.read_or(f"{q}/buf-refs").split()
            if len(buf_refs) > MAX_BUF_REFS:
                raise Invalid(f"more than {MAX_BUF_REFS} buffer grants on a queue")
            memory.map_grant(ring_ref)
            for ref in buf_refs:
                memory.map_grant(_number(ref, "buf-refs"))
            port = self._bind(domain, _number(self.xs.read_or(f"{q}/event-channel"),
                                              "event-channel"))  # fmt: skip
            try:
                queue = IoqSouth(memory, ring_ref * PAGE_SIZE, count, port, writable=writable)
            except BaseException:
                port.close()
                raise
            attachment.add_queue(index, queue, port, [port], held=(0, 0, 0))
        domain.log.info("backend.connected", device=device.name, grants=len(memory.refs),
                        queues=len(queues))  # fmt: skip

    def _bind(self, domain: _Domain, remote_port: int) -> PortTransport:
        port = self.evtchn.bind_interdomain(0, domain.domid, remote_port)
        return PortTransport(self.evtchn, port)

    def _close_device(self, device: _Device, reason: str, *, error: bool = True) -> None:
        """Release what the backend holds for ``device``; Closing, with the
        reason in ``error`` unless the frontend asked for it."""
        self._release_device(device)
        if device.state in (XenbusState.CLOSING, XenbusState.CLOSED):
            return
        assert self.xs is not None
        if error:
            with contextlib.suppress(XsError):
                self.xs.write(f"{device.back}/error", reason[:512])
        device.domain.log.info("backend.closing", device=device.name, reason=reason)
        self._set_state(device, XenbusState.CLOSING)

    def _release_device(self, device: _Device) -> None:
        attachment, device.attachment = device.attachment, None
        if attachment is not None and not attachment.closed:
            attachment.close("backend closing")
        if device.call_port is not None:
            with contextlib.suppress(ValueError, OSError):
                self.loop.remove_reader(device.call_port.fd)
            device.call_port.close()
            device.call_port = None
        device.call_words = None
        device.call_busy = False
        memory, device.memory = device.memory, None
        if memory is not None:
            memory.close()  # the grants are unpinned: the domain may end access

    def _unpublish(self, device: _Device) -> None:
        assert self.xs is not None
        if device.token is not None:
            self.xs.unwatch(f"{device.front}/state", device.token)
            device.token = None
        for path in (device.front, device.back):
            with contextlib.suppress(XsError):
                self.xs.rm(path)
        device.domain.devices.pop(device.devid, None)

    # --- the call page ------------------------------------------------------------------------------
    def _call_ready(self, device: _Device) -> None:
        port, words, memory = device.call_port, device.call_words, device.memory
        attachment = device.attachment
        if port is None or words is None or memory is None or attachment is None:
            return
        try:
            port.drain()
            if device.call_busy:
                return  # answered when the call in progress is
            req, rsp = words[0], words[1]
            ahead = (req - rsp) & _M32
            if ahead == 0:
                return
            if ahead != 1:
                raise Fault(f"call page: {ahead} calls posted, one at a time")
            func, length = words[2], words[3]
            if length > abi.CALL_DATA_MAX:
                raise Fault(f"call page: a request of {length} bytes")
            base = memory.refs[0] * PAGE_SIZE
            data = memory.read(base + abi.CALL_DATA, length)
        except Fault as exc:
            attachment.fault(exc.message)
            return

        def answer(result: bytes | VbusError) -> None:
            device.call_busy = False
            self._answer(device, req, result)

        device.call_busy = True
        try:
            result = attachment.call(func, data, answer)
        except VbusError as exc:
            device.call_busy = False
            if device.attachment is attachment:
                self._answer(device, req, exc)
            return
        if result is not None:
            device.call_busy = False
            self._answer(device, req, result)

    def _answer(self, device: _Device, req: int, result: bytes | VbusError) -> None:
        words, memory, port = device.call_words, device.memory, device.call_port
        if words is None or memory is None or port is None:
            return
        base = memory.refs[0] * PAGE_SIZE
        if isinstance(result, VbusError):
            status, body = -result.errno, b""
        elif len(result) > abi.CALL_DATA_MAX:
            status, body = -errno.EMSGSIZE, b""
        else:
            status, body = 0, result
        try:
            memory.write(base + abi.CALL_DATA, body)
            words[4] = status & _M32
            words[5] = len(body)
            words[1] = req  # last: the frontend reads the reply once it sees rsp move
            port.kick()
        except Fault as exc:
            if device.attachment is not None:
                device.attachment.fault(exc.message)
            return
        if device.call_busy is False:
            self._call_ready(device)  # a call posted meanwhile

    # --- teardown ----------------------------------------------------------------------------------
    def _drop(self, domain: _Domain, reason: str, level: str = "warning") -> None:
        if domain.closed:
            return
        domain.closed = True
        if domain.deadline is not None:
            domain.deadline.cancel()
        self.loop.remove_reader(domain.fd)
        self.domains.pop(domain.fd, None)
        if domain.north is not None:
            domain.north.release(reason)
        for device in list(domain.devices.values()):
            self._release_device(device)
            if self.xs is not None and device.token is not None:
                self.xs.unwatch(f"{device.front}/state", device.token)
                device.token = None
            if self.xs is not None:
                with contextlib.suppress(XsError):
                    if device.state != XenbusState.CLOSED:
                        if device.state != XenbusState.CLOSING:
                            self._set_state(device, XenbusState.CLOSING)
                        self._set_state(device, XenbusState.CLOSED)
                    self.xs.write(f"{device.back}/online", "0")
        if domain.domid and self.by_domid.get(domain.domid) is domain:
            del self.by_domid[domain.domid]
            closed = self.evtchn.close_domain(domain.domid)
            self.xenstore.close_domain(domain.domid)
            if domain.domid in self.xenstore.store.domains:
                self.xenstore.store.release(domain.domid)
            domain.log.info("domain.released", event_channels=closed)
        if domain.mapper is not None:
            domain.mapper.release()
        if domain.table is not None:
            domain.table.close()
        for mapping in (domain.rw, domain.ro, domain.table_map):
            if mapping is not None:
                with contextlib.suppress(BufferError):
                    mapping.close()
        if level == "warning":
            self.counters["dropped"] += 1
        getattr(domain.log, level)("domain.detached", reason=reason)
        domain.sock.close()


def _number(raw: bytes | str, what: str) -> int:
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
    if not text.isdigit() or len(text) > 10:
        raise Invalid(f"{what} {text!r} is not a number")
    return int(text)
