"""The vhost-user connector: a VMM's virtio device is a vbus device (docs/design.md 4.7).

For every device linked to a bus whose deviceclass has a virtio form
(``DeviceModel.virtio()``), vbusd listens on
``<run-dir>/vhost-user/<bus>/<device>.sock``; the socket appears with the
link and goes with it.  A VMM (QEMU's ``-chardev socket`` with a vhost-user
netdev) connects as the front-end.  It is identified by SO_PEERCRED and
must be admitted to *that* bus by its member rules (a VM resolves as its
VMM process, 5.3); otherwise it is refused and the refusal logged.

The protocol is ``vbus.vhost.wire`` (sans-IO), the rings are
``vbus.vhost.virtq`` over the guest memory the VMM shares
(``GuestMemory.from_memfds``); this module moves bytes and descriptors and
runs the device through the attachment core (``vbus.connectors.base``).
The device runs while the memory table is mapped and every virtqueue is
started and enabled: the connector then opens the device, negotiates the
driver's features with it (the mapping's ``negotiate``), hands it the
queues and activates it.  A ring stopped (GET_VRING_BASE), disabled or
reset stops the device (its connection is closed, the rings' indexes are
kept for the next start).

Faults.  A ring that breaks the virtio rules faults the device connection
(the core's fault path, with the reason logged): the rings' error eventfds
are kicked, and with the STATUS protocol feature the device reports
DEVICE_NEEDS_RESET (GET_STATUS) and stays stopped until the front-end
resets it or restarts its rings; without it, the connection is closed.  A
broken stream (a message the wire refuses with no way to say so) closes
the connection.  Either way only that front-end is touched.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import os
import socket
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vbus.connectors.base import Attachment, Limits, North, NorthCore
from vbus.core.device import VirtioMapping
from vbus.core.members import Peer, Vm
from vbus.core.model import RevokeKind, Topology
from vbus.core.resources import Ledger
from vbus.errors import Invalid, ProtocolError, VbusError
from vbus.log import get_logger
from vbus.memory import DEFAULT_MAX_GUEST, GuestMemory
from vbus.procfs import ProcTasks
from vbus.signal import SharedEventfd
from vbus.vhost import wire
from vbus.vhost.virtq import F_EVENT_IDX, F_INDIRECT_DESC, VirtQueue

__all__ = ["VhostUserConnector", "bind_unix", "socket_path"]

log = get_logger("vbus.vhost_user")

_PEERCRED = struct.Struct("3i")
_MSG_DONTWAIT = int(socket.MSG_DONTWAIT)
_CMSG_SPACE = socket.CMSG_SPACE(wire.MAX_FDS * array.array("i").itemsize)
_READS_PER_WAKEUP = 64  # then other sockets get their turn
RING_FEATURES = F_EVENT_IDX | F_INDIRECT_DESC  # what the virtqueue adds to every device


def socket_path(run_dir: Path, bus: str, device: str) -> Path:
    return run_dir / "vhost-user" / bus / f"{device}.sock"


_SUN_PATH = 107  # bytes of sockaddr_un.sun_path, less its NUL


def bind_unix(sock: socket.socket, path: Path) -> None:
    """Bind to ``path`` even where it is longer than sun_path allows: through
    the directory's /proc/self/fd link (a run directory may be deep)."""
    _via_dir(sock.bind, path)


def _via_dir(call: Callable[[str], None], path: Path) -> None:
    if len(os.fsencode(path)) <= _SUN_PATH:
        call(str(path))
        return
    dirfd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        call(f"/proc/self/fd/{dirfd}/{path.name}")
    finally:
        os.close(dirfd)


@dataclass(slots=True)
class _Ring:
    """What the front-end gave one virtqueue, kept across device stops."""

    kick: SharedEventfd | None = None
    call: SharedEventfd | None = None
    err: SharedEventfd | None = None
    ring: wire.Ring | None = None  # started: its layout
    next_avail: int = 0
    enabled: bool = False
    queue: VirtQueue | None = None


@dataclass(slots=True)
class _Listener:
    bus: str
    device: str
    path: Path
    sock: socket.socket
    frontend: _Frontend | None = None


@dataclass(eq=False)
class _Frontend:
    """One connected VMM: its socket, its wire session, its rings and memory.
    Also the core's ``Hooks``."""

    connector: VhostUserConnector
    listener: _Listener
    sock: socket.socket
    cred: Peer
    north: North
    mapping: VirtioMapping
    backend: wire.Backend
    log: Any
    id: int
    parser: wire.Parser = field(default_factory=wire.Parser)
    rings: list[_Ring] = field(default_factory=list)
    memory: GuestMemory | None = None
    memory_held: tuple[int, int, int] = (0, 0, 0)
    attachment: Attachment | None = None
    features: int = 0
    merge_target: int = 0
    fault_reason: str | None = None  # stopped by a fault until the front-end resets
    closed: bool = False
    since: float = field(default_factory=time.time)

    # --- the core's hooks ------------------------------------------------------
    def faulted(self, handle: int, reason: str) -> None:
        self.connector._device_faulted(self, reason)

    def revoked(self, handle: int, kind: RevokeKind, reason: str) -> None:
        self.attachment = None
        self.connector._drop(self, f"{kind}: {reason}", level="info")

    def expelled(self, reason: str) -> None:
        self.connector._drop(self, reason, level="info")


class VhostUserConnector:
    """Serves ``<run-dir>/vhost-user/<bus>/<device>.sock`` for every linked
    device with a virtio form.  ``start()`` follows the topology's links,
    ``stop()`` disconnects every front-end and removes the sockets."""

    name = "vhost_user"

    def __init__(
        self,
        topology: Topology,
        run_dir: Path,
        loop: asyncio.AbstractEventLoop,
        limits: Limits | None = None,
        tasks: ProcTasks | None = None,
        ledger: Ledger | None = None,
    ) -> None:
        self.topology = topology
        self.root = run_dir / "vhost-user"
        self.run_dir = run_dir
        self.loop = loop
        self.limits = limits or Limits()
        self.tasks = tasks or ProcTasks()
        self.core = NorthCore(self.name, topology, loop, ledger, self.limits)
        self.counters = self.core.counters
        self.listeners: dict[tuple[str, str], _Listener] = {}
        self.frontends: set[_Frontend] = set()
        self._ids = 0
        self._reconcile_soon = False
        self._started = False

    # --- lifecycle ---------------------------------------------------------------
    def start(self) -> None:
        self.root.mkdir(mode=0o755, exist_ok=True)
        self._started = True
        self.topology.link_watchers.append(self._links_changed)
        self._reconcile()
        log.info("vhost_user.listening", root=str(self.root), sockets=len(self.listeners))

    def stop(self, reason: str = "daemon stopping") -> None:
        if self._started:
            self._started = False
            with contextlib.suppress(ValueError):
                self.topology.link_watchers.remove(self._links_changed)
        for frontend in list(self.frontends):
            self._drop(frontend, reason, level="info")
        for key in list(self.listeners):
            self._close_listener(key)

    def clients(self) -> int:
        return len(self.frontends)

    def queue_totals(self) -> dict[str, int]:
        return self.core.queue_totals()

    def describe(self) -> list[dict[str, Any]]:
        return [
            {
                "frontend": f.id,
                "pid": f.cred.pid,
                "uid": f.cred.uid,
                "device": f.listener.device,
                "running": f.attachment is not None,
                **f.north.describe(),
                "since": f.since,
            }
            for f in self.frontends
        ]

    # --- following the links ------------------------------------------------------------
    def _links_changed(self) -> None:
        if not self._reconcile_soon:
            self._reconcile_soon = True
            self.loop.call_soon(self._reconcile)

    def _reconcile(self) -> None:
        self._reconcile_soon = False
        if not self._started:
            return
        wanted = set()
        for bus in self.topology.buses():
            for device in self.topology.devices_on(bus):
                try:
                    mapping = device.model.virtio()
                except Exception as exc:  # a deviceclass bug: that device only
                    log.error("vhost_user.mapping_failed", device=device.name, error=repr(exc))
                    continue
                if mapping is not None:
                    wanted.add((bus.name, device.name))
        for key in list(self.listeners):
            if key not in wanted:
                self._close_listener(key)
        for key in sorted(wanted - set(self.listeners)):
            self._open_listener(*key)

    def _open_listener(self, bus: str, device: str) -> None:
        path = socket_path(self.run_dir, bus, device)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            path.parent.mkdir(mode=0o755, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # left by a daemon that was killed
            bind_unix(sock, path)
            os.chmod(path, 0o666)  # admittance is decided by member rules, not modes
            sock.listen(16)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            log.error("vhost_user.listen_failed", socket=str(path), reason=exc.strerror or str(exc))
            return
        listener = _Listener(bus, device, path, sock)
        self.listeners[(bus, device)] = listener
        self.loop.add_reader(sock.fileno(), self._accept, listener)
        log.info("vhost_user.socket_added", bus=bus, device=device, socket=str(path))

    def _close_listener(self, key: tuple[str, str]) -> None:
        listener = self.listeners.pop(key)
        if listener.frontend is not None:
            self._drop(listener.frontend, "the device was unlinked from the bus", level="info")
        self.loop.remove_reader(listener.sock.fileno())
        listener.sock.close()
        with contextlib.suppress(FileNotFoundError):
            listener.path.unlink()
        with contextlib.suppress(OSError):
            listener.path.parent.rmdir()  # the bus's directory, once empty
        log.info("vhost_user.socket_removed", bus=key[0], device=key[1])

    # --- accepting -------------------------------------------------------------------
    def _accept(self, listener: _Listener) -> None:
        for _ in range(16):
            try:
                sock, _addr = listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("vhost_user.accept_failed", reason=exc.strerror)
                return
            self._admit(listener, sock)

    def _refuse(self, sock: socket.socket, cred: Peer, listener: _Listener, reason: str) -> None:
        self.counters["refused"] += 1
        log.warning(
            "vhost_user.refused",
            pid=cred.pid,
            uid=cred.uid,
            bus=listener.bus,
            device=listener.device,
            reason=reason,
        )
        sock.close()

    def _admit(self, listener: _Listener, sock: socket.socket) -> None:
        sock.setblocking(False)
        pid, uid, gid = _PEERCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        )
        cred = Peer(pid=pid, uid=uid, gid=gid, starttime=self.tasks.starttime(pid))
        if listener.frontend is not None:
            self._refuse(sock, cred, listener, "the device already has a front-end")
            return
        self._ids += 1
        frontend_id = self._ids
        flog = log.bind(frontend=frontend_id, pid=pid, uid=uid, device=listener.device)
        identity = Vm(cred, f"vhost-user:{listener.device}")
        holder: list[_Frontend] = []
        hooks = _LateHooks(holder)
        north = self.core.north(identity, hooks, flog)
        member = north.join()
        if member is None or member.bus.name != listener.bus:
            where = "no bus" if member is None else f"bus {member.bus.name!r}"
            north.release("refused")
            if member is not None:  # join() counted the other case
                self.counters["denied"] += 1
            self._refuse(sock, cred, listener, f"not a member of bus {listener.bus!r} ({where})")
            return
        try:
            north.account.take(fds=1)  # its socket
            device = self.topology.find_device(member.bus, listener.device)
            mapping = device.model.virtio()
            if mapping is None:
                raise Invalid(f"device {listener.device!r} has no virtio form")
        except VbusError as exc:
            north.release(exc.message)
            self._refuse(sock, cred, listener, exc.message)
            return
        offered = mapping.features | RING_FEATURES | (mapping.merge[0] if mapping.merge else 0)
        backend = wire.Backend(offered, config=mapping.config, queues=len(mapping.queues))
        frontend = _Frontend(
            self,
            listener,
            sock,
            cred,
            north,
            mapping,
            backend,
            flog.bind(bus=listener.bus),
            frontend_id,
        )
        frontend.rings = [_Ring() for _ in mapping.queues]
        holder.append(frontend)
        listener.frontend = frontend
        self.frontends.add(frontend)
        self.counters["accepted"] += 1
        self.loop.add_reader(sock.fileno(), self._readable, frontend)
        frontend.log.info("vhost_user.connected", features=f"{offered:#x}")

    # --- receiving ---------------------------------------------------------------------
    def _readable(self, frontend: _Frontend) -> None:
        # Each read stops at the end of the message in progress (``wanted``),
        # so descriptors always arrive with the message that carried them.
        for _ in range(_READS_PER_WAKEUP):
            if frontend.closed:
                return
            try:
                data, ancdata, flags, _ = frontend.sock.recvmsg(
                    frontend.parser.wanted(), _CMSG_SPACE
                )
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._drop(frontend, f"receive failed: {exc.strerror}", level="info")
                return
            fds = _take_fds(ancdata)
            if not data and not fds:
                self._drop(frontend, "the front-end closed the connection", level="info")
                return
            try:
                if flags & socket.MSG_CTRUNC:
                    _close(fds)
                    raise ProtocolError("descriptors were cut off (more than a message may carry)")
                # From here the parser holds the descriptors, then each message its own.
                for msg in frontend.parser.feed(data, fds):
                    claimed: set[int] = set()
                    try:
                        self._handle(frontend, msg, claimed)
                    finally:
                        _close(fd for fd in msg.fds if fd not in claimed)
            except ProtocolError as exc:
                self._drop(frontend, f"protocol violation: {exc.message}")
            except Exception as exc:  # a bug here: this front-end only, never the loop
                log.error(
                    "vhost_user.internal_error",
                    frontend=frontend.id,
                    exc_info=(type(exc), exc, exc.__traceback__),
                )
                self._drop(frontend, "internal error")

    def _handle(self, frontend: _Frontend, msg: wire.Message, claimed: set[int]) -> None:
        effects = frontend.backend.handle(msg)
        ok = True
        for effect in effects:
            if isinstance(effect, wire.Reply):
                self._send(frontend, effect.data)
            elif isinstance(effect, wire.Ack):
                self._send(frontend, frontend.backend.ack(effect.request, ok))
            elif isinstance(effect, wire.Refused):
                frontend.log.warning(
                    "vhost_user.refused_request",
                    request=_name(effect.request),
                    reason=effect.reason,
                )
            elif ok:
                try:
                    self._apply(frontend, effect, claimed)
                except VbusError as exc:
                    ok = False
                    frontend.log.warning(
                        "vhost_user.request_failed", request=_name(msg.request), reason=exc.message
                    )
                    if not (msg.need_reply and frontend.backend.acked_protocol & wire.P.REPLY_ACK):
                        self._drop(frontend, f"{_name(msg.request)} failed: {exc.message}")
                        return
            if frontend.closed:
                return
        self._update(frontend)

    def _apply(self, frontend: _Frontend, effect: wire.Effect, claimed: set[int]) -> None:
        if isinstance(effect, wire.Features):
            self._stop_device(frontend)
            frontend.features = effect.features
        elif isinstance(effect, wire.MemTable):
            claimed.update(effect.fds)
            try:
                self._map(frontend, effect)
            finally:
                for fd in effect.fds:
                    os.close(fd)  # the mappings keep what they need
        elif isinstance(effect, wire.SetKick | wire.SetCall | wire.SetErr):
            self._set_fd(frontend, effect, claimed)
        elif isinstance(effect, wire.StartRing):
            self._stop_device(frontend)
            ring = frontend.rings[effect.ring.index]
            ring.ring = effect.ring
            ring.next_avail = effect.ring.base
            ring.enabled = frontend.backend.rings[effect.ring.index].enabled
            frontend.fault_reason = None  # restarted rings are a fresh start
        elif isinstance(effect, wire.StopRing):
            self._stop_device(frontend)
            ring = frontend.rings[effect.index]
            ring.ring = None
            if effect.reply:
                self._send(frontend, frontend.backend.stopped(effect.index, ring.next_avail))
        elif isinstance(effect, wire.Enable):
            if not effect.enabled:
                self._stop_device(frontend)  # "started but disabled" is served as stopped
            frontend.rings[effect.index].enabled = effect.enabled
        elif isinstance(effect, wire.Status):
            if effect.status == 0:
                frontend.fault_reason = None
        elif isinstance(effect, wire.Reset):
            self._stop_device(frontend)
            for ring in frontend.rings:
                ring.ring = None
                ring.next_avail = 0
            frontend.fault_reason = None

    def _set_fd(
        self,
        frontend: _Frontend,
        effect: wire.SetKick | wire.SetCall | wire.SetErr,
        claimed: set[int],
    ) -> None:
        ring = frontend.rings[effect.index]
        role = {wire.SetKick: "kick", wire.SetCall: "call", wire.SetErr: "err"}[type(effect)]
        transport = None
        if effect.fd is not None:
            claimed.add(effect.fd)
            try:
                transport = SharedEventfd.adopt(effect.fd, role, read=role == "kick")
            except BaseException:
                os.close(effect.fd)
                raise
            try:
                frontend.north.account.take(fds=1)
            except BaseException:
                transport.close()
                raise
        if role == "kick":
            self._stop_device(frontend)  # the poller watches the old one
        old = getattr(ring, role)
        setattr(ring, role, transport)
        if role == "call" and ring.queue is not None:
            ring.queue.call = transport
        if old is not None:
            old.close()
            frontend.north.account.give(fds=1)

    def _map(self, frontend: _Frontend, table: wire.MemTable) -> None:
        """Map the new table; running rings are stopped first and restart over it."""
        self._stop_device(frontend)
        account = frontend.north.account
        count = len(table.regions)
        account.take(fds=count, maps=count)  # mmap keeps a duplicate of each fd
        charged = 0

        def admit(total: int) -> None:
            nonlocal charged
            account.take(shm=total)
            charged = total

        try:
            memory = GuestMemory.from_memfds(
                [
                    (fd, r.guest, r.size, r.offset)
                    for fd, r in zip(table.fds, table.regions, strict=True)
                ],
                max_size=DEFAULT_MAX_GUEST,  # the ledger bounds it per VMM and per uid
                admit=admit,
            )
        except BaseException:
            account.give(shm=charged, fds=count, maps=count)
            frontend.backend.memory_failed()
            self._release_memory(frontend)
            raise
        self._release_memory(frontend)
        frontend.memory = memory
        frontend.memory_held = (charged, count, count)
        frontend.log.info("vhost_user.memory_mapped", regions=count, size=charged)

    def _release_memory(self, frontend: _Frontend) -> None:
        if frontend.memory is not None:
            frontend.memory.close()
            frontend.memory = None
            shm, fds, maps = frontend.memory_held
            frontend.north.account.give(shm=shm, fds=fds, maps=maps)
            frontend.memory_held = (0, 0, 0)

    # --- running the device -------------------------------------------------------------
    def _update(self, frontend: _Frontend) -> None:
        """Start the device when everything it needs is there."""
        if frontend.closed or frontend.attachment is not None or frontend.fault_reason:
            return
        if frontend.memory is None:
            return
        if not all(r.ring is not None and r.enabled and r.kick is not None for r in frontend.rings):
            return
        try:
            self._start_device(frontend)
        except VbusError as exc:
            frontend.log.warning("vhost_user.start_failed", reason=exc.message)
            self._stop_device(frontend)
            self._device_faulted(frontend, f"the device refused to start: {exc.message}")

    def _start_device(self, frontend: _Frontend) -> None:
        mapping = frontend.mapping
        features = frontend.features
        merge = None
        attachment = frontend.attachment = frontend.north.open(frontend.listener.device)
        session = attachment.session
        need = attachment._enter(
            "negotiate", mapping.negotiate, session, features & mapping.features
        )
        if mapping.merge is not None and features & mapping.merge[0]:
            merge = (max(need, 1), mapping.merge[1])
        memory = frontend.memory
        assert memory is not None
        for spec, ring in zip(mapping.queues, frontend.rings, strict=True):
            layout = ring.ring
            assert layout is not None
            queue = VirtQueue(
                memory,
                layout.num,
                layout.desc,
                layout.avail,
                layout.used,
                ring.call,
                writable=spec.writable,
                next_avail=ring.next_avail,
                event_idx=bool(features & F_EVENT_IDX),
                indirect=bool(features & F_INDIRECT_DESC),
                merge=merge if spec.writable else None,
            )
            ring.queue = queue
            attachment.add_queue(spec.index, queue, ring.kick)
        attachment._enter("activate", mapping.activate, session)
        frontend.log.info(
            "vhost_user.device_started",
            features=f"{features:#x}",
            rings=[r.ring.num for r in frontend.rings if r.ring is not None],
            merge=merge[0] if merge else 0,
        )

    def _stop_device(self, frontend: _Frontend) -> None:
        """Stop servicing: keep each ring's next index, close the device connection."""
        attachment = frontend.attachment
        # What this run of the device cost in signals, for the log (and the bench).
        figures = {
            "kicks": attachment.poller.stats.wakeups if attachment and attachment.poller else 0
        }
        for key in ("messages", "signals_sent", "signals_suppressed"):
            figures[key] = sum(
                getattr(r.queue.stats, key) for r in frontend.rings if r.queue is not None
            )
        for ring in frontend.rings:
            if ring.queue is not None:
                if not ring.queue.closed:
                    ring.next_avail = ring.queue.stop()
                else:
                    ring.next_avail = ring.queue.next_avail
                ring.queue = None
        if attachment is None:
            return
        frontend.attachment = None
        if not attachment.closed:
            with contextlib.suppress(VbusError):
                attachment._enter("deactivate", frontend.mapping.deactivate, attachment.session)
            attachment.close("the front-end stopped the device")
        frontend.log.info("vhost_user.device_stopped", **figures)

    def _device_faulted(self, frontend: _Frontend, reason: str) -> None:
        """The core faulted the device connection (or it refused to start)."""
        frontend.attachment = None
        self._stop_device(frontend)
        frontend.fault_reason = reason
        for ring in frontend.rings:
            if ring.err is not None:
                with contextlib.suppress(VbusError):
                    ring.err.kick()
        if frontend.backend.reports_status:
            frontend.backend.needs_reset()
            frontend.log.warning("vhost_user.needs_reset", reason=reason)
        else:
            self._drop(frontend, f"device faulted: {reason}")

    # --- sending and teardown ------------------------------------------------------------
    def _send(self, frontend: _Frontend, data: bytes) -> None:
        try:
            sent = frontend.sock.send(data, _MSG_DONTWAIT)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._drop(frontend, f"send failed: {exc.strerror}", level="info")
            return
        if sent != len(data):
            # Replies are a few bytes: a front-end that cannot take one does not read.
            self._drop(frontend, "the front-end does not read its replies")

    def _drop(self, frontend: _Frontend, reason: str, level: str = "warning") -> None:
        if frontend.closed:
            return
        frontend.closed = True
        self._stop_device(frontend)
        frontend.north.release(reason)
        for ring in frontend.rings:
            for role in ("kick", "call", "err"):
                transport = getattr(ring, role)
                if transport is not None:
                    transport.close()
                    setattr(ring, role, None)
        self._release_memory(frontend)
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(frontend.sock.fileno())
        frontend.sock.close()
        _close(frontend.parser.take_fds())
        if frontend.listener.frontend is frontend:
            frontend.listener.frontend = None
        self.frontends.discard(frontend)
        if level == "warning":
            self.counters["dropped"] += 1
        getattr(frontend.log, level)("vhost_user.disconnected", reason=reason)


class _LateHooks:
    """The core's hooks before the front-end object exists (join needs them)."""

    def __init__(self, holder: list[_Frontend]) -> None:
        self.holder = holder

    def faulted(self, handle: int, reason: str) -> None:
        if self.holder:
            self.holder[0].faulted(handle, reason)

    def revoked(self, handle: int, kind: RevokeKind, reason: str) -> None:
        if self.holder:
            self.holder[0].revoked(handle, kind, reason)

    def expelled(self, reason: str) -> None:
        if self.holder:
            self.holder[0].expelled(reason)


def _take_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % 4
            fds.extend(array.array("i", payload[:usable]))
    return fds


def _close(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _name(request: int) -> str:
    try:
        return wire.Request(request).name
    except ValueError:
        return f"#{request}"
