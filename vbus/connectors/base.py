"""The attachment core every connector stands on: the life of a north context's handles.

A connector only moves bytes: it accepts its kind of north (a process on a
socket, a VM through its VMM, a Xen domain), says who it is, and carries the
north's requests here.  Everything else is done once, here, the same way for
every connector:

- ``North``: one connected north context.  ``join`` resolves it to its bus
  through the topology's member rules (denied without a hint otherwise); it
  holds an ``Account`` of what it makes the daemon hold (shared memory,
  descriptors, mappings), its open devices, its calls in flight.
- ``Attachment``: one open device of a north.  ``add_queue`` hands a built
  queue to the device's session and wires its kick transport into a NAPI
  poller of the loop's ``PollGroup``; ``call`` runs the device's call().
- The device boundary: every entry into device code (``open``, ``shm``,
  ``call``, ``poll``, ``rearm``) is wrapped here.  A ``VbusError`` is the
  device refusing a request; any other exception is a bug of the deviceclass:
  logged once as ``device.error`` with its traceback, and it faults that
  connection only.  Nothing reaches the event loop's exception handler.
- Faults (DESIGN 6): stop servicing, release everything, then tell the north
  through the connector's ``Hooks`` (an EVENT frame for userspace, a fault
  register and an interrupt for a guest, XenbusState Closing for a domain,
  NEEDS_RESET for vhost-user).  Revocations (device unlinked, bus removed,
  rule removed) take the same path with their own hook.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from vbus.core.members import Domain, Identity, process_of
from vbus.core.model import Bus, Connection, Member, RevokeKind, Topology
from vbus.core.resources import Account, Ledger
from vbus.errors import Busy, Fault, NotFound, VbusError
from vbus.log import get_logger
from vbus.mitigation import NapiPoller, PollGroup
from vbus.queue import Queue
from vbus.signal import Transport

__all__ = [
    "QUEUE_TOTALS",
    "Attachment",
    "Connector",
    "Hooks",
    "Limits",
    "North",
    "NorthCore",
]

log = get_logger("vbus.north")

QUEUE_TOTALS = (
    "messages",
    "bytes",
    "signals_sent",
    "signals_suppressed",
    "stalls",
    "wakeups",
    "polls",
)


def owner_of(identity: Identity) -> int | str:
    """Whom the ledger charges for what ``identity`` makes the daemon hold:
    the uid of its process (a VM's VMM), or the domain itself."""
    process = process_of(identity)
    if process is not None:
        return process.uid
    assert isinstance(identity, Domain)
    return f"domid {identity.domid}"


@dataclass(slots=True)
class Limits:
    """Bounds on what one north context may hold or do.  Defaults are generous."""

    handshake_timeout: float = 5.0
    max_connections_per_uid: int = 1024
    # Connections per uid that have not said HELLO yet.  Past this the oldest
    # is evicted, not the newcomer: idle sockets cannot lock a prompt client out.
    max_pending_per_uid: int = 256
    max_handles: int = 256  # open devices per north
    max_queues: int = 64  # registered queues per north
    frames_per_wakeup: int = 1  # per loop iteration: peers take turns frame by frame
    max_outbound: int = 512  # queued frames before a non-reading peer is dropped
    # ... and queued bytes: 512 frames of up to 64 KiB would let one peer pin 32 MiB.
    max_outbound_bytes: int = 1 << 20
    max_inflight_calls: int = 64  # asynchronous call()s in progress per north
    max_region: int = 1 << 30  # bytes per registered memory region


class Hooks(Protocol):
    """How a connector tells its north what the core decided."""

    def faulted(self, handle: int, reason: str) -> None:
        """The device connection ``handle`` was faulted and released."""
        ...

    def revoked(self, handle: int, kind: RevokeKind, reason: str) -> None:
        """The device went from the bus (``device_removed``) or the bus went."""
        ...

    def expelled(self, reason: str) -> None:
        """The north lost its bus: tell it, then disconnect it."""
        ...


class Connector(Protocol):
    """What the daemon drives, the same way for every connector."""

    name: str
    counters: dict[str, int]

    def start(self) -> None: ...

    def stop(self, reason: str) -> None:
        """Tell every north why, release everything, stop listening."""
        ...

    def clients(self) -> int:
        """North contexts connected now."""
        ...

    def describe(self) -> list[dict[str, Any]]:
        """A line per north context, for ``connections`` and ``status``."""
        ...

    def queue_totals(self) -> dict[str, int]:
        """Ring traffic and signalling since start, closed queues included."""
        ...


class NorthCore:
    """What the north contexts of one connector share: the topology, the
    loop, the ledger, limits, counters, and the totals of closed queues."""

    def __init__(
        self,
        connector: str,
        topology: Topology,
        loop: asyncio.AbstractEventLoop,
        ledger: Ledger | None = None,
        limits: Limits | None = None,
    ) -> None:
        self.connector = connector
        self.topology = topology
        self.loop = loop
        self.ledger = ledger or Ledger()
        self.limits = limits or Limits()
        self.counters = {"accepted": 0, "refused": 0, "denied": 0, "faults": 0, "dropped": 0}
        self.norths: set[North] = set()
        self._retired = dict.fromkeys(QUEUE_TOTALS, 0)

    def north(self, identity: Identity, hooks: Hooks, logger: Any = None) -> North:
        """A new north context (not yet on a bus: ``join`` it)."""
        north = North(self, identity, hooks, logger if logger is not None else log)
        self.norths.add(north)
        return north

    def queue_totals(self) -> dict[str, int]:
        totals = dict(self._retired)
        for north in self.norths:
            for attachment in north.handles.values():
                attachment.add_stats(totals)
        # Loop iterations whose polling time slice ran out with pollers still waiting.
        totals["poll_slices_cut"] = PollGroup.of(self.loop).slices_cut
        return {f"queue_{key}": value for key, value in totals.items()}


class North:
    """One connected north context: its identity, its bus, what it holds."""

    def __init__(self, core: NorthCore, identity: Identity, hooks: Hooks, logger: Any) -> None:
        self.core = core
        self.identity = identity
        self.hooks = hooks
        self.log = logger
        self.account: Account = core.ledger.account(owner_of(identity))
        self.member: Member | None = None
        self.handles: dict[int, Attachment] = {}
        self.queue_count = 0
        self.inflight_calls = 0
        self.released = False
        self._handle_ids = 0

    @property
    def bus(self) -> Bus:
        """The north's bus; NotFound once it has none (never joined, or lost it)."""
        if self.member is None or self.member.gone:
            raise NotFound("the bus of this connection is gone")
        return self.member.bus

    def join(self) -> Member | None:
        """Admit the north to the bus its rules resolve to; None (counted,
        logged) when no rule admits it."""
        member = self.core.topology.join(self.identity, self.core.connector, self._expelled)
        if member is None:
            self.core.counters["denied"] += 1
            self.log.warning("client.denied", reason="not a member of any bus")
            return None
        self.member = member
        return member

    def _expelled(self, _member: Member, reason: str) -> None:
        self.member = None
        self.release(reason)
        self.hooks.expelled(reason)

    # --- devices --------------------------------------------------------------
    def open(self, ref: str | int) -> Attachment:
        """Open a device of the north's bus by name or by its id on that bus."""
        bus = self.bus
        limit = self.core.limits.max_handles
        if len(self.handles) >= limit:
            raise Busy(f"at most {limit} open devices per connection")
        self._handle_ids += 1
        handle = self._handle_ids
        topology = self.core.topology

        def revoke(conn: Connection, kind: RevokeKind, reason: str) -> None:
            self._revoked(handle, kind, reason)

        try:
            conn = topology.open(
                bus.name, ref, self.identity, self.core.connector, revoke, member=self.member
            )
        except VbusError:
            raise
        except Exception as exc:  # the deviceclass's open() failed
            device = topology.find_device(bus, ref)
            _device_bug(self.log, device.name, exc, "open")
            raise Fault("the device failed to open") from None
        attachment = Attachment(self, handle, conn)
        self.handles[handle] = attachment
        self.log.info("device.opened", handle=handle, device=conn.device.name)
        return attachment

    def handle(self, handle: int) -> Attachment:
        attachment = self.handles.get(handle)
        if attachment is None:
            raise NotFound(f"no open device with handle {handle}")
        return attachment

    def close(self, handle: int, reason: str = "closed by the client") -> None:
        self.handle(handle).close(reason)

    def _revoked(self, handle: int, kind: RevokeKind, reason: str) -> None:
        attachment = self.handles.pop(handle, None)
        if attachment is None:
            return
        attachment.release()  # the topology closes the connection itself
        self.log.info("device.revoked", handle=handle, kind=kind, reason=reason)
        self.hooks.revoked(handle, kind, reason)

    # --- teardown ----------------------------------------------------------------
    def release(self, reason: str) -> None:
        """Close every handle, leave the bus, give everything back.  Idempotent."""
        if self.released:
            return
        self.released = True
        for attachment in list(self.handles.values()):
            attachment.close(reason)
        if self.member is not None:
            self.core.topology.leave(self.member)
            self.member = None
        self.account.close()
        self.core.norths.discard(self)

    def describe(self) -> dict[str, Any]:
        return {
            "bus": self.member.bus.name if self.member else None,
            "client_id": self.member.client_id if self.member else None,
            "handles": len(self.handles),
            "shm_bytes": self.account.shm,
            "fds": self.account.fds,
        }


class Attachment:
    """One open device of a north: the core ``Connection`` and what its queues hold."""

    def __init__(self, north: North, handle: int, conn: Connection) -> None:
        self.north = north
        self.id = handle
        self.conn = conn
        session = conn.session
        assert session is not None
        self.session = session
        self.poller: NapiPoller | None = None
        self.queues: dict[int, Queue] = {}
        self.resources: list[Any] = []  # regions and transports, closed on release
        self.held = [0, 0, 0]  # shared-memory bytes, descriptors, mappings of its queues
        self.tasks: set[asyncio.Task[Any]] = set()
        self.closed = False
        session.fault_hook = self._device_fault

    # --- queues ------------------------------------------------------------------
    def add_queue(
        self,
        index: int,
        queue: Queue,
        kick: Transport | None,
        resources: Iterable[Any] = (),
        *,
        held: tuple[int, int, int] = (0, 0, 0),
        budget: int | None = None,
    ) -> None:
        """Hand ``queue`` to the device as queue ``index`` and start servicing it.

        ``resources`` (closed on release) and ``held`` (shared-memory bytes,
        descriptors, mappings already taken from the north's account) become
        the attachment's from here on, also when the device refuses the queue
        (they are released then, and the refusal raised).  ``kick``, if given,
        wakes the poller.  ``budget`` overrides the poll budget (1: a poll per
        message, no mitigation).
        """
        resources = list(resources)
        north = self.north
        limit = north.core.limits.max_queues
        try:
            if north.queue_count >= limit:
                raise Busy(f"at most {limit} queues per connection")
            if index in self.queues:
                raise Busy(f"queue {index} is already registered")
            self._enter("shm", self.session.shm, index, queue)
        except BaseException:
            _close_all([queue, *resources])
            north.account.give(shm=held[0], fds=held[1], maps=held[2])
            raise
        self.queues[index] = queue
        self.resources.extend(resources)
        for i, value in enumerate(held):
            self.held[i] += value
        north.queue_count += 1
        poller = self.poller
        if poller is None:
            poller = self.poller = NapiPoller(north.core.loop, self.session, self._poll_failed)
        if budget is not None:
            poller.budget = budget
        if kick is not None:
            poller.watch(kick)
        poller.schedule()

    def _poll_failed(self, exc: BaseException) -> None:
        if isinstance(exc, VbusError):
            self.fault(exc.message)
        else:
            _device_bug(self.north.log, self.conn.device.name, exc, "poll")
            self.fault("the device failed")

    # --- call() ---------------------------------------------------------------------
    def call(
        self, func: int, data: bytes, later: Callable[[bytes | VbusError], None]
    ) -> bytes | None:
        """The device's call().  Returns the result, or None when the device
        answers later: ``later`` then gets the result or the error, once
        (the work is kept on the attachment and cancelled when it closes).
        A refusal raises its ``VbusError``; a device bug faults the
        connection and raises ``Fault``."""
        self.conn.calls += 1
        try:
            result = self.session.call(func, data)
        except VbusError:
            raise
        except Exception as exc:
            raise self._call_bug(exc) from None
        if type(result) is bytes:
            return result
        if isinstance(result, bytes | bytearray):
            return bytes(result)
        if not inspect.isawaitable(result):
            raise self._call_bug(TypeError(f"call() returned {type(result).__name__}"))
        north = self.north
        if north.inflight_calls >= north.core.limits.max_inflight_calls:
            if inspect.iscoroutine(result):
                result.close()
            raise Busy("too many calls in progress")
        north.inflight_calls += 1
        task = north.core.loop.create_task(_resolve(result))
        self.tasks.add(task)
        task.add_done_callback(lambda done: self._answered(done, later))
        return None

    def _answered(
        self, task: asyncio.Task[bytes], later: Callable[[bytes | VbusError], None]
    ) -> None:
        self.tasks.discard(task)
        self.north.inflight_calls -= 1
        if task.cancelled():
            later(Fault("the device connection was closed during the call"))
            return
        exc = task.exception()
        if exc is None:
            later(task.result())
        elif isinstance(exc, VbusError):
            later(exc)
        else:
            later(self._call_bug(exc))

    def _call_bug(self, exc: BaseException) -> Fault:
        """Log a failed call once, fault the connection; the error to answer with."""
        _device_bug(self.north.log, self.conn.device.name, exc, "call")
        self.fault("the device failed a call")
        return Fault("the device failed this call")

    # --- faults and teardown -------------------------------------------------------------
    def fault(self, reason: str) -> None:
        """The north broke a rule of this device connection (or the device
        failed): stop servicing, release, close, then tell the north."""
        north = self.north
        if self.closed or north.handles.get(self.id) is not self:
            return
        north.core.counters["faults"] += 1
        self.conn.faults += 1
        north.log.warning(
            "connection.faulted", handle=self.id, device=self.conn.device.name, reason=reason
        )
        self.close(f"faulted: {reason}")
        north.hooks.faulted(self.id, reason)

    def _device_fault(self, reason: str) -> None:
        """The device found this north at fault outside a poll (``Session.fault``):
        fault it on the loop's next turn, not inside the device's own call stack
        (it may be delivering to several ports)."""
        if not self.closed:
            self.north.core.loop.call_soon(self.fault, reason)

    def close(self, reason: str) -> None:
        """Release and close the core connection.  Idempotent."""
        if self.north.handles.get(self.id) is self:
            del self.north.handles[self.id]
        if self.closed:
            return
        self.release()
        self.north.core.topology.close(self.conn, reason)

    def release(self) -> None:
        """Stop servicing and give back everything its queues held."""
        if self.closed:
            return
        self.closed = True
        self.session.fault_hook = None
        north = self.north
        for task in list(self.tasks):
            task.cancel()
        totals = north.core._retired
        self.add_stats(totals)
        if self.poller is not None:
            self.poller.close()
            self.poller = None
        for queue in self.queues.values():
            close = getattr(queue, "close", None)
            if close is not None:
                close()
        north.queue_count -= len(self.queues)
        self.queues.clear()
        _close_all(self.resources)
        self.resources.clear()
        shm, fds, maps = self.held
        north.account.give(shm=shm, fds=fds, maps=maps)
        self.held = [0, 0, 0]

    def add_stats(self, totals: dict[str, int]) -> None:
        if self.poller is not None:
            totals["wakeups"] += self.poller.stats.wakeups
            totals["polls"] += self.poller.stats.polls
        for queue in self.queues.values():
            stats = queue.stats
            totals["messages"] += stats.messages
            totals["bytes"] += stats.bytes
            totals["signals_sent"] += stats.signals_sent
            totals["signals_suppressed"] += stats.signals_suppressed
            totals["stalls"] += stats.stalls

    def _enter(self, what: str, method: Callable[..., Any], *args: Any) -> Any:
        """Device code that may refuse (VbusError) or fail (anything else)."""
        try:
            return method(*args)
        except VbusError:
            raise
        except Exception as exc:
            _device_bug(self.north.log, self.conn.device.name, exc, what)
            raise Fault(f"the device failed {what}()") from None


async def _resolve(pending: Awaitable[bytes]) -> bytes:
    data = await pending
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"call() resolved to {type(data).__name__}")
    return bytes(data)


def _device_bug(logger: Any, device: str, exc: BaseException, where: str) -> None:
    logger.error(
        "device.error",
        device=device,
        where=where,
        exc_info=(type(exc), exc, exc.__traceback__),
    )


def _close_all(resources: Iterable[Any]) -> None:
    for resource in resources:
        try:
            resource.close()
        except Exception as exc:  # closing our own mapping or fd: report, go on
            log.error("north.release_failed", resource=repr(resource), error=repr(exc))
