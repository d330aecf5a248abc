"""The Xen connector in a real dom0: stock domUs' netfront served on venet ports.

Where ``/proc/xen/capabilities`` says ``control_d`` the Xen connector talks to
the hypervisor through dom0's devices instead of its shims (docs/design.md
4.8): xenstore is the system's xenstored (its Unix socket, with the same
sans-IO protocol module as the shims), grants are copied through
``/dev/xen/gntdev`` and the ring pages mapped there, event channels are
``/dev/xen/evtchn``.  What it serves is what a stock domU has a driver for:
a vif (``xen-netfront``), as a userspace netback.

A vif is the toolstack's: ``xl`` (libxl) writes its backend directory
``/local/domain/0/backend/vif/<domid>/<handle>`` when a domU with
``vif = ["backend=0,..."]`` is created or on ``xl network-attach``.  The
connector watches that tree and, for each new vif whose ``frontend``,
``frontend-id`` and ``state`` are written (a toolstack writing key by key
writes ``state`` last):

- admits the domid through the ``domid:N`` member rules (``Domain(domid)``,
  as the shims do); a domid no rule admits gets no backend: nothing is
  written but ``error`` in the backend directory, and the refusal is logged;
- picks the venet device on that bus: the one the vif's ``bridge`` key
  names (``vif = ["bridge=<device>,..."]``), else the bus's only device with
  a virtio-net form; otherwise refuses, saying so;
- runs the xenbus handshake (``vbus.xen.vif``): features and InitWait; at the
  frontend's Connected it reads the ring references and the event channel,
  maps the two ring pages, binds the channel, opens the device through the
  attachment core, negotiates venet features from what netfront takes, hands
  the device the two queues of ``vbus.xen.netback`` and goes Connected.

Faults (a ring breach, a grant copy that fails, the device unlinked, the bus
or the rule gone) disconnect that vif only: the reason goes to ``error``
and the log, the backend to Closing, everything it held is released; the
frontend may connect again.  The toolstack's Closing (``xl destroy``,
``xl network-detach``) is answered by releasing everything and Closed;
the removal of the backend directory forgets the vif.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vbus.connectors.base import Attachment, Limits, North, NorthCore
from vbus.core.device import VirtioMapping
from vbus.core.members import Domain
from vbus.core.model import RevokeKind, Topology
from vbus.core.resources import Ledger
from vbus.errors import Closed, NotFound, VbusError
from vbus.log import get_logger
from vbus.net import vnet
from vbus.xen import dom0
from vbus.xen.abi import XenbusState
from vbus.xen.netback import TX_BATCH_BYTES, NetifRx, NetifTx, PortKick, rx_slots
from vbus.xen.netif import MAX_TX_SIZE, RX_RING_SIZE, RxBackRing, TxBackRing
from vbus.xen.vif import Action, Map, Read, Remove, Unmap, VifBackend, VifRings, Write
from vbus.xen.xsclient import XsClient
from vbus.xen.xswire import XsError

__all__ = ["VIF_ROOT", "XenDom0Connector", "xenstored_socket"]

log = get_logger("vbus.xen")

VIF_ROOT = "/local/domain/0/backend/vif"
# Where xenstored listens (XEN_RUN_STORED), newest layout first.
XENSTORED_SOCKETS = ("/run/xenstored/socket", "/var/run/xenstored/socket")
# What netback's netif gives venet: partial checksums and TCPv4 super-frames
# from the frontend (it sends csum_blank, and GSO with feature-gso-tcpv4).
TX_FEATURES = vnet.F_VERSION_1 | vnet.F_CSUM | vnet.F_HOST_TSO4
_HELD_FDS = 4  # gntdev, evtchn, and the two ring mappings' descriptors
_HELD_MAPS = 2


def xenstored_socket() -> Path:
    """The system xenstored's socket: ``$XENSTORED_PATH``, else the usual places."""
    env = os.environ.get("XENSTORED_PATH")
    candidates = (env,) if env else XENSTORED_SOCKETS
    for candidate in candidates:
        if candidate and Path(candidate).exists():
            return Path(candidate)
    raise Closed(f"no xenstored socket at {', '.join(c for c in candidates if c)}")


class _Vif:
    """One vif of one domU: its handshake, its device connection, what it holds."""

    def __init__(self, connector: XenDom0Connector, domid: int, handle: int) -> None:
        self.connector = connector
        self.domid = domid
        self.handle = handle
        self.path = f"{VIF_ROOT}/{domid}/{handle}"
        self.frontend = ""
        self.machine = VifBackend()
        self.north: North | None = None
        self.device = ""
        self.mapping: VirtioMapping | None = None
        self.attachment: Attachment | None = None
        self.gntdev: dom0.Gntdev | None = None
        self.chans: dom0.EventChannels | None = None
        self.held: list[Any] = []  # closed in order on release: views, copiers, maps
        self.lock = asyncio.Lock()
        self.refused: str | None = None
        self.gone = False
        self.since = time.time()
        self.connects = 0
        self.log = log.bind(domid=domid, vif=handle)
        self.tokens: list[tuple[str, str]] = []

    # Hooks of the attachment core: a fault, a revocation, the bus gone.
    def faulted(self, handle: int, reason: str) -> None:
        self.connector._later(self, self.machine.fault, reason)

    def revoked(self, handle: int, kind: RevokeKind, reason: str) -> None:
        self.connector._later(self, self.machine.fault, f"the device went: {reason}")

    def expelled(self, reason: str) -> None:
        self.connector._later(self, self.machine.fault, f"the bus went: {reason}")


class XenDom0Connector:
    """Serves vifs of real domUs from dom0 (``vbus.connectors.xen`` is the shims' form)."""

    name = "xen"
    interface = "dom0"

    def __init__(
        self,
        topology: Topology,
        loop: asyncio.AbstractEventLoop,
        limits: Limits | None = None,
        ledger: Ledger | None = None,
        socket_path: Path | None = None,
    ) -> None:
        self.topology = topology
        self.loop = loop
        self.core = NorthCore(self.name, topology, loop, ledger, limits or Limits())
        self.counters = self.core.counters
        self.socket_path = socket_path
        self.xs: XsClient | None = None
        self.vifs: dict[tuple[int, int], _Vif] = {}
        self._task: asyncio.Task[None] | None = None
        self._scan: asyncio.Task[None] | None = None
        self._rescan = False
        self._changes = 0  # the vif tree's watch events so far
        self._work: set[asyncio.Task[None]] = set()

    # --- lifecycle ----------------------------------------------------------------
    def start(self) -> None:
        path = self.socket_path or xenstored_socket()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(str(path))
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"xenstored at {path}: {exc.strerror}") from None
        self.xs = XsClient(sock, self.loop)
        self._task = self.loop.create_task(self._watch_root())
        self._task.add_done_callback(self._done)
        log.info("xen.interface", interface="dom0", xenstored=str(path), serves="vif")

    async def _watch_root(self) -> None:
        assert self.xs is not None
        try:
            await self.xs.watch(VIF_ROOT, "vbus-vifs", lambda _path: self._changed())
        except (VbusError, XsError) as exc:
            log.error("xen.watch_failed", path=VIF_ROOT, reason=str(exc))

    def stop(self, reason: str = "daemon stopping") -> None:
        for task in (self._task, self._scan, *self._work):
            if task is not None:
                task.cancel()
        for vif in list(self.vifs.values()):
            self._release(vif, reason)
            if vif.north is not None:
                vif.north.release(reason)
        self.vifs.clear()
        if self.xs is not None:
            self.xs.close()
            self.xs = None

    def clients(self) -> int:
        return sum(1 for vif in self.vifs.values() if vif.north is not None)

    def queue_totals(self) -> dict[str, int]:
        return self.core.queue_totals()

    def describe(self) -> list[dict[str, Any]]:
        out = []
        for vif in self.vifs.values():
            entry: dict[str, Any] = {
                "domid": vif.domid,
                "vif": vif.handle,
                "device": vif.device or None,
                "state": vif.machine.state.name.lower(),
                "since": vif.since,
                "connects": vif.connects,
            }
            if vif.refused:
                entry["refused"] = vif.refused
            if vif.north is not None:
                entry.update(vif.north.describe())
            out.append(entry)
        return out

    # --- the toolstack's vif tree ----------------------------------------------------------
    def _changed(self) -> None:
        self._changes += 1
        if self._scan is not None and not self._scan.done():
            self._rescan = True
            return
        self._scan = self.loop.create_task(self._scan_vifs())
        self._scan.add_done_callback(self._done)

    async def _scan_vifs(self) -> None:
        while True:
            self._rescan = False
            try:
                await self._scan_once()
            except (VbusError, XsError) as exc:
                log.warning("xen.scan_failed", reason=str(exc))
            if not self._rescan:
                return

    async def _scan_once(self) -> None:
        xs = self.xs
        if xs is None:
            return
        seen: set[tuple[int, int]] = set()
        for domid_text in await _listing(xs, VIF_ROOT):
            for handle_text in await _listing(xs, f"{VIF_ROOT}/{domid_text}"):
                if not (domid_text.isdigit() and handle_text.isdigit()):
                    continue
                key = (int(domid_text), int(handle_text))
                seen.add(key)
                if key not in self.vifs:
                    vif = self.vifs[key] = _Vif(self, *key)
                    self._spawn(self._setup(vif))
        for key, vif in list(self.vifs.items()):
            if key not in seen:
                del self.vifs[key]
                vif.gone = True
                self._spawn(self._forget(vif))

    def _spawn(self, coro: Any) -> None:
        task = self.loop.create_task(coro)
        self._work.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._work.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("xen.vif_task_failed", error=repr(exc), exc_info=exc)

    def _later(self, vif: _Vif, step: Any, *args: Any) -> None:
        """Run a step of the handshake machine, then its actions, in order."""

        async def run() -> None:
            async with vif.lock:
                if not vif.gone:
                    await self._perform(vif, step(*args))

        self._spawn(run())

    # --- one vif -----------------------------------------------------------------
    async def _setup(self, vif: _Vif) -> None:
        xs = self.xs
        assert xs is not None
        async with vif.lock:
            changes = self._changes
            frontend = await _read(xs, f"{vif.path}/frontend")
            frontend_id = await _read(xs, f"{vif.path}/frontend-id")
            bridge = await _read(xs, f"{vif.path}/bridge")
            state = await _read(xs, f"{vif.path}/state")
            if frontend is None or frontend_id is None or state is None:
                # Not all written yet: libxl writes the directory in one
                # transaction, another toolstack may write key by key, its
                # state last.  Looked at again with the next change, or now
                # if one came while these were read.
                self.vifs.pop((vif.domid, vif.handle), None)
                vif.gone = True
                if self._changes != changes:
                    self._changed()
                return
            if frontend_id != str(vif.domid):
                await self._refuse(vif, f"the backend directory names frontend-id {frontend_id}")
                return
            vif.frontend = frontend
            north = self.core.north(Domain(vif.domid), vif, vif.log)
            member = north.join()
            if member is None:
                north.release("refused")
                await self._refuse(vif, f"domid {vif.domid} is not a member of any bus")
                return
            try:
                vif.device, vif.mapping = self._device(member.bus, bridge)
            except VbusError as exc:
                north.release("refused")
                await self._refuse(vif, exc.message)
                return
            vif.north = north
            self.counters["accepted"] += 1
            vif.log.info("xen.vif_admitted", bus=member.bus.name, device=vif.device)
            for path, token in (
                (f"{frontend}/state", f"vbus-vif-{vif.domid}-{vif.handle}-front"),
                (f"{vif.path}/state", f"vbus-vif-{vif.domid}-{vif.handle}-back"),
            ):
                vif.tokens.append((path, token))
                await xs.watch(path, token, self._watcher(vif, token))
            await self._perform(vif, vif.machine.start())

    def _device(self, bus: Any, bridge: str | None) -> tuple[str, VirtioMapping]:
        """The venet device of ``bus`` a vif goes to (see the module's docstring)."""
        candidates = []
        for device in self.topology.devices_on(bus):
            try:
                mapping = device.model.virtio()
            except Exception:  # a deviceclass bug: not a candidate
                continue
            if mapping is not None and mapping.device_id == 1:
                if device.name == bridge:
                    return device.name, mapping
                candidates.append((device.name, mapping))
        if len(candidates) == 1:
            return candidates[0]
        if not candidates:
            raise NotFound(f"bus {bus.name!r} has no network device")
        names = ", ".join(sorted(name for name, _ in candidates))
        raise NotFound(
            f"bus {bus.name!r} has several network devices ({names}): name one "
            "with bridge=<device> in the vif's spec"
        )

    async def _refuse(self, vif: _Vif, reason: str) -> None:
        vif.refused = reason
        self.counters["refused"] += 1
        vif.log.warning("xen.vif_refused", reason=reason)
        if self.xs is not None:
            with contextlib.suppress(VbusError):
                if await _read(self.xs, f"{vif.path}/frontend") is not None:
                    await self.xs.write(f"{vif.path}/error", f"vbus: {reason}")

    def _watcher(self, vif: _Vif, token: str) -> Callable[[str], None]:
        front = token.endswith("-front")

        def changed(_path: str) -> None:
            self._spawn(self._state_changed(vif, front))

        return changed

    async def _state_changed(self, vif: _Vif, front: bool) -> None:
        """The frontend's state, or the backend's as the toolstack writes it."""
        xs = self.xs
        if xs is None:
            return
        async with vif.lock:
            if vif.gone:
                return
            if front:
                raw = await _read(xs, f"{vif.frontend}/state")
                await self._perform(vif, self._frontend_step(vif, raw))
                return
            # the toolstack closing the vif (``xl destroy``, ``network-detach``)
            raw = await _read(xs, f"{vif.path}/state")
            if raw != str(int(XenbusState.CLOSING)) or vif.machine.state == XenbusState.CLOSING:
                return
            vif.log.info("xen.vif_closing", reason="the toolstack closes the vif")
            await self._perform(vif, vif.machine.toolstack_closing())

    @staticmethod
    def _frontend_step(vif: _Vif, raw: str | None) -> Sequence[Action]:
        machine = vif.machine
        if raw is None:  # the domain's nodes went: it died
            if not machine.frontend:
                return ()
            state = int(XenbusState.CLOSED)
        else:
            try:
                state = int(raw)
            except ValueError:
                return machine.fault(f"frontend state {raw!r}")
        return () if state == machine.frontend else machine.frontend_state(state)

    async def _forget(self, vif: _Vif) -> None:
        async with vif.lock:
            self._release(vif, "the vif was removed")
            if vif.north is not None:
                vif.north.release("the vif was removed")
                vif.north = None
            if self.xs is not None:
                for path, token in vif.tokens:
                    await self.xs.unwatch(path, token)
            vif.log.info("xen.vif_removed")

    async def _perform(self, vif: _Vif, actions: Sequence[Action]) -> None:
        xs = self.xs
        pending = list(actions)
        while pending and xs is not None:
            action = pending.pop(0)
            if isinstance(action, Write):
                if action.key == "error":
                    vif.log.warning("xen.vif_disconnected", reason=action.value)
                await self._write(vif, action.key, action.value)
            elif isinstance(action, Remove):
                await self._write(vif, action.key, None)
            elif isinstance(action, Read):
                values = {key: await _read(xs, f"{vif.frontend}/{key}") for key in action.keys}
                pending[:0] = vif.machine.frontend_keys(values)
            elif isinstance(action, Map):
                try:
                    self._connect(vif, action.rings)
                except VbusError as exc:
                    self._release(vif, exc.message)
                    pending[:0] = vif.machine.map_failed(exc.message)
                else:
                    pending[:0] = vif.machine.mapped()
            elif isinstance(action, Unmap):
                self._release(vif, vif.machine.error or "the vif is closing")

    async def _write(self, vif: _Vif, key: str, value: str | None) -> None:
        """Write (None: remove) in the backend directory, unless the toolstack
        removed it (a write would create it again)."""
        xs = self.xs
        if xs is None or vif.gone:
            return
        with contextlib.suppress(XsError):
            if await _read(xs, f"{vif.path}/frontend-id") is None:
                return
            if value is None:
                await xs.rm(f"{vif.path}/{key}")
            else:
                await xs.write(f"{vif.path}/{key}", value)

    # --- the data path -------------------------------------------------------------------
    def _connect(self, vif: _Vif, rings: VifRings) -> None:
        north = vif.north
        mapping = vif.mapping
        assert north is not None and mapping is not None
        north.account.take(fds=_HELD_FDS, maps=_HELD_MAPS)
        vif.held.append(("account", north))
        gnt = vif.gntdev = dom0.Gntdev()
        chans = vif.chans = dom0.EventChannels()
        tx_map = gnt.map(vif.domid, [rings.tx_ring_ref])
        rx_map = gnt.map(vif.domid, [rings.rx_ring_ref])
        tx_page = memoryview(tx_map.buffer)
        rx_page = memoryview(rx_map.buffer)
        vif.held += [tx_page, rx_page, tx_map, rx_map]
        port = chans.bind_interdomain(vif.domid, rings.event_channel)
        kick = PortKick(chans, port)
        attachment = vif.attachment = north.open(vif.device)
        session = attachment.session
        features = TX_FEATURES | rings.rx_caps
        capacity = attachment._enter("negotiate", mapping.negotiate, session, features)
        gso = bool(rings.rx_caps & (vnet.F_GUEST_TSO4 | vnet.F_GUEST_TSO6))
        slots = max(1, RX_RING_SIZE // rx_slots(capacity, gso))
        tx_copier = dom0.GrantCopier(gnt, vif.domid, TX_BATCH_BYTES + MAX_TX_SIZE)
        rx_copier = dom0.GrantCopier(gnt, vif.domid, slots * capacity)
        vif.held[:0] = [tx_copier, rx_copier]
        tx = NetifTx(TxBackRing(tx_page), tx_copier, kick)
        rx = NetifRx(RxBackRing(rx_page), rx_copier, kick, capacity, gso)
        for spec in mapping.queues:
            if spec.writable:
                attachment.add_queue(spec.index, rx, None)
            else:
                attachment.add_queue(spec.index, tx, kick)
        attachment._enter("activate", mapping.activate, session)
        vif.connects += 1
        vif.log.info(
            "xen.vif_connected",
            device=vif.device,
            tx_ref=rings.tx_ring_ref,
            rx_ref=rings.rx_ring_ref,
            port=port,
            features=vnet.feature_names(features),
            rx_buffer=capacity,
        )
        kick.kick()  # the frontend may have posted before the backend was there

    def _release(self, vif: _Vif, reason: str) -> None:
        """Close the device connection, unmap the rings, close the channel."""
        attachment, vif.attachment = vif.attachment, None
        if attachment is not None and not attachment.closed:
            mapping = vif.mapping
            if mapping is not None:
                with contextlib.suppress(VbusError):
                    attachment._enter("deactivate", mapping.deactivate, attachment.session)
            attachment.close(reason)
        for item in vif.held:
            try:
                if isinstance(item, tuple):
                    item[1].account.give(fds=_HELD_FDS, maps=_HELD_MAPS)
                elif isinstance(item, memoryview):
                    item.release()
                else:
                    item.close()
            except (VbusError, OSError, ValueError) as exc:
                vif.log.error("xen.vif_release_failed", item=repr(item), error=str(exc))
        had = bool(vif.held)
        vif.held = []
        for owner in (vif.chans, vif.gntdev):
            if owner is not None:
                owner.close()
        vif.chans = vif.gntdev = None
        if had:
            vif.log.info("xen.vif_released", reason=reason)


async def _read(xs: XsClient, path: str) -> str | None:
    try:
        return (await xs.read(path)).decode(errors="replace")
    except XsError as exc:
        if exc.errno in (errno.ENOENT, errno.EACCES):
            return None
        raise


async def _listing(xs: XsClient, path: str) -> list[str]:
    try:
        return await xs.directory(path)
    except XsError as exc:
        if exc.errno == errno.ENOENT:
            return []
        raise
