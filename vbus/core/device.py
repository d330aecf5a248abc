"""What a deviceclass implements: typed attributes, a device model, and its sessions.

A deviceclass is a ``DeviceModel`` subclass registered under the entry-point
group ``vbus.deviceclasses``.  The core instantiates it once per device; each
north connection that opens the device gets a ``Session`` from ``open()``.
A session sees ``Queue`` objects (docs/design.md 3.5) and nothing of connectors.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from vbus.errors import Invalid, NotSupported

if TYPE_CHECKING:
    from vbus.core.model import Connection, Device
    from vbus.queue import Queue

__all__ = ["Attribute", "DeviceModel", "Session", "VirtioMapping", "VirtioQueue"]

_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


@dataclass(frozen=True, slots=True)
class Attribute:
    """One typed, validated attribute of a deviceclass.

    ``kind`` is one of ``str``, ``int``, ``bool``, ``choice``, ``mac``.
    ``parse`` turns the text an administrator wrote into a value (or raises
    ``Invalid`` with a message saying why); ``format`` turns it back.
    """

    name: str
    kind: str
    default: Any
    doc: str = ""
    choices: tuple[str, ...] = ()
    minimum: int | None = None
    maximum: int | None = None
    max_length: int = 256
    readonly: bool = False

    def parse(self, text: str | int | bool) -> Any:
        # Config files hand over ints and bools; only 0/1 (or a real bool) is a
        # boolean, so ``flag = 5`` is rejected instead of silently meaning true.
        if isinstance(text, bool):
            text = "1" if text else "0"
        elif isinstance(text, int):
            text = str(text)
        elif not isinstance(text, str):
            raise Invalid(f"{self.name}: expected text, got {type(text).__name__}")
        value = text.strip()
        if self.kind == "str":
            try:
                size = len(value.encode())
            except UnicodeEncodeError:  # lone surrogates (surrogateescape'd bytes)
                raise Invalid(f"{self.name}: not valid UTF-8") from None
            if size > self.max_length or "\0" in value:
                raise Invalid(f"{self.name}: at most {self.max_length} bytes, no NUL")
            return value
        if self.kind == "int":
            try:
                if not value.isascii():  # int() would also take other scripts' digits
                    raise ValueError(value)
                number = int(value, 0)
            except ValueError:
                raise Invalid(f"{self.name}: {value!r} is not an integer") from None
            if self.minimum is not None and number < self.minimum:
                raise Invalid(f"{self.name}: {number} is below the minimum {self.minimum}")
            if self.maximum is not None and number > self.maximum:
                raise Invalid(f"{self.name}: {number} is above the maximum {self.maximum}")
            return number
        if self.kind == "bool":
            lowered = value.lower()
            if lowered in ("1", "y", "yes", "true", "on"):
                return True
            if lowered in ("0", "n", "no", "false", "off"):
                return False
            raise Invalid(f"{self.name}: {value!r} is not a boolean (0/1)")
        if self.kind == "choice":
            if value not in self.choices:
                raise Invalid(f"{self.name}: {value!r} is not one of {', '.join(self.choices)}")
            return value
        if self.kind == "mac":
            lowered = value.lower()
            if not _MAC.fullmatch(lowered):
                raise Invalid(f"{self.name}: {value!r} is not a MAC address (aa:bb:cc:dd:ee:ff)")
            if int(lowered[:2], 16) & 1:
                raise Invalid(f"{self.name}: {value!r} is a multicast address")
            return lowered
        raise Invalid(f"{self.name}: unknown attribute kind {self.kind!r}")

    def format(self, value: Any) -> str:
        if self.kind == "bool":
            return "1" if value else "0"
        return str(value)


@dataclass(frozen=True, slots=True)
class VirtioQueue:
    """One virtqueue of a virtio mapping: the device queue it is, its direction."""

    index: int  # the device's queue index (``Session.shm``)
    writable: bool  # south->north: the driver posts room the device fills


@dataclass(frozen=True, slots=True)
class VirtioMapping:
    """How a device appears as a virtio device (vhost-user; docs/design.md 4.7).

    ``device_id`` is the virtio device id (1: network), ``features`` the
    device-type feature bits offered (VIRTIO_F_VERSION_1 included; ring and
    transport bits are the connector's), ``config`` the device's config
    space as it is now, ``queues`` the virtqueues in virtio order.  The
    three hooks take the session the connector opened: ``negotiate`` gets
    the driver's device-type bits and returns the smallest writable buffer
    a south->north queue needs for one message (0: any size), ``activate``
    and ``deactivate`` run when the driver starts and stops the rings.  Each
    may raise ``VbusError`` to refuse.
    """

    device_id: int
    features: int
    config: bytes
    queues: tuple[VirtioQueue, ...]
    negotiate: Callable[[Session, int], int]
    activate: Callable[[Session], None]
    deactivate: Callable[[Session], None]
    # A feature bit the queue implements, not the device: buffers merged
    # across several chains, their count a u16 at ``merge[1]`` in the first
    # (virtio-net's MRG_RXBUF and num_buffers).  Offered with ``features``.
    merge: tuple[int, int] | None = None


class Session:
    """One north connection's open handle on a device, seen from the device.

    The connector calls ``shm()`` when the north registers a queue, then drives
    ``poll()``/``rearm()`` from a NAPI-style poller (``vbus.mitigation``) when
    any of the session's queues is signalled.  ``Fault`` raised from ``poll``
    or ``shm`` faults this connection only.
    """

    def __init__(self, model: DeviceModel, conn: Connection) -> None:
        self.model = model
        self.conn = conn
        self.queues: dict[int, Queue] = {}
        # Set by the connector that serves this session (vbus.connectors.base).
        self.fault_hook: Callable[[str], None] | None = None

    def fault(self, reason: str) -> bool:
        """Fault this connection now, from outside ``poll`` (a bad descriptor
        found while delivering to it, say).  True when a connector took it; the
        connection is faulted on the loop's next turn.  False: nothing serves
        the session, and the device raises ``Fault`` from its next poll instead."""
        hook = self.fault_hook
        if hook is None:
            return False
        hook(reason)
        return True

    # --- the two verbs ---------------------------------------------------
    def call(self, func: int, data: bytes) -> bytes | Awaitable[bytes]:
        """Synchronous request/reply.  May return an awaitable for slow work."""
        raise NotSupported(f"{self.model.device.deviceclass}: no call function {func}")

    def shm(self, index: int, queue: Queue) -> None:
        """The north registered ``queue`` as queue ``index``; validate and keep it."""
        raise NotSupported(f"{self.model.device.deviceclass}: no shared-memory queues")

    # --- polling (called by vbus.mitigation) -----------------------------
    def poll(self, budget: int) -> int:
        """Do up to ``budget`` units of work; return how many were done."""
        return 0

    def rearm(self) -> bool:
        """Re-enable notifications on what this session waits for, fenced; True
        if it can already make progress (poll again instead of sleeping).

        Every queue is re-enabled, but only north->south queues count as work:
        buffers waiting on a queue the south fills are room, not work (a north
        keeps its receive buffers posted), and counting them would poll again
        at every loop iteration.  A device that holds output until such room
        appears overrides this (``echo`` does).
        """
        pending = False
        for queue in self.queues.values():
            if queue.enable_notify() and not queue.writable:
                pending = True
        return pending

    def quiesce(self) -> None:
        """Disable notifications while a poll is scheduled."""
        for queue in self.queues.values():
            queue.disable_notify()

    def close(self) -> None:
        """The connection is going away; drop references to its queues."""
        self.queues.clear()


class DeviceModel(ABC):
    """Base of every deviceclass.  Subclasses set the class variables."""

    name: ClassVar[str]
    description: ClassVar[str]
    attributes: ClassVar[tuple[Attribute, ...]] = ()

    def __init__(self, device: Device) -> None:
        self.device = device

    @abstractmethod
    def open(self, conn: Connection) -> Session:
        """A north context opened this device: return its session."""

    def attribute_changed(self, name: str, value: Any) -> None:  # noqa: B027 - optional hook
        """Called after an attribute was validated and stored."""

    def stats(self) -> dict[str, int]:
        """Live counters, shown in the admin tree's ``stats`` file."""
        return {}

    def destroy(self) -> None:  # noqa: B027 - optional hook
        """The device is being destroyed; no session is open any more."""

    def virtio(self) -> VirtioMapping | None:
        """The device as a virtio device, or None if it has no such form."""
        return None

    @classmethod
    def attribute(cls, name: str) -> Attribute:
        for attr in cls.attributes:
            if attr.name == name:
                return attr
        raise Invalid(f"{cls.name} has no attribute {name!r}")
