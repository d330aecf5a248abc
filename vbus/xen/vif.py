"""The xenbus handshake of a vif backend, sans-IO (docs/design.md 4.8).

What Linux's netback and netfront do over xenstore, for one single-queue
vif whose rings are ``vbus.xen.netif``'s.  The backend's keys (in its own
directory) and the frontend's it reads::

    backend   feature-rx-copy 1, feature-sg 1, feature-gso-tcpv4 1, state, error
    frontend  tx-ring-ref, rx-ring-ref, event-channel (u32 each), request-rx-copy (must be 1),
              state; what it takes on rx: feature-sg, feature-gso-tcpv4, feature-gso-tcpv6,
              feature-no-csum-offload (absent is 0)

What the frontend takes becomes venet's receive capabilities (``rx_caps``,
virtio-net feature bits for ``vnet.adapt_for``): a partial checksum unless
it opts out, a TCP super-frame only with scatter-gather (a super-frame
spans pages) and a partial checksum.

Theory of operation: the backend offers its features and waits
(InitWait).  The frontend writes its keys and goes to Initialised or, as
Linux's netfront does, straight to Connected; the backend then reads the
keys (``Read``), and if they hold asks for the rings and the event channel
(``Map``), and once those are in place (``mapped``) says Connected.  A
frontend going to Closing is answered with Closing and ``Unmap``, Closed
with Closed; a frontend Initialising again after that (a reboot of its
driver, or its driver bound again) finds the backend in InitWait once more,
the last fault's ``error`` removed.  Anything wrong, in the keys or later on
the rings (``fault``), writes the reason to ``error`` and goes to Closing: a
frontend that broke the rules gets no second chance on the same rings, only
on new ones.

The machine only decides; its caller performs each action in order (a
``Write`` or ``Remove`` in the backend directory, a ``Read`` of the
frontend's keys whose values come back through ``frontend_keys``, a
``Map``/``Unmap`` of rings and port) and reports what it sees with
``frontend_state``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from vbus.net import vnet
from vbus.xen.abi import XenbusState

__all__ = [
    "FEATURES",
    "FRONTEND_KEYS",
    "Action",
    "Map",
    "Read",
    "Remove",
    "Unmap",
    "VifBackend",
    "VifRings",
    "Write",
]

FEATURES: Final = (("feature-rx-copy", "1"), ("feature-sg", "1"), ("feature-gso-tcpv4", "1"))
FRONTEND_KEYS: Final = (
    "tx-ring-ref",
    "rx-ring-ref",
    "event-channel",
    "request-rx-copy",
    "feature-sg",
    "feature-gso-tcpv4",
    "feature-gso-tcpv6",
    "feature-no-csum-offload",
)


@dataclass(frozen=True, slots=True)
class Write:
    """Write ``value`` at ``key`` in the backend's directory."""

    key: str
    value: str


@dataclass(frozen=True, slots=True)
class Remove:
    """Remove ``key`` from the backend's directory."""

    key: str


@dataclass(frozen=True, slots=True)
class Read:
    """Read these keys of the frontend's directory (absent ones as None)."""

    keys: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class VifRings:
    tx_ring_ref: int
    rx_ring_ref: int
    event_channel: int
    rx_caps: int = vnet.F_GUEST_CSUM


@dataclass(frozen=True, slots=True)
class Map:
    """Map the two ring grants and bind the frontend's port."""

    rings: VifRings


@dataclass(frozen=True, slots=True)
class Unmap:
    """Unbind the port and unmap the rings."""


Action = Write | Remove | Read | Map | Unmap


def _u32(values: Mapping[str, str | None], key: str) -> int:
    raw = values.get(key)
    if raw is None:
        raise ValueError(f"the frontend has no {key}")
    try:
        value = int(raw, 10)
    except ValueError:
        raise ValueError(f"the frontend's {key} is not a number: {raw!r}") from None
    if not 0 <= value <= 0xFFFFFFFF or raw.strip() != raw:
        raise ValueError(f"the frontend's {key} is out of range: {raw!r}")
    return value


def _rx_caps(values: Mapping[str, str | None]) -> int:
    def on(key: str) -> bool:
        return values.get(key) == "1"

    if on("feature-no-csum-offload"):
        return 0
    caps = vnet.F_GUEST_CSUM
    if on("feature-sg") and on("feature-gso-tcpv4"):
        caps |= vnet.F_GUEST_TSO4
    if on("feature-sg") and on("feature-gso-tcpv6"):
        caps |= vnet.F_GUEST_TSO6
    return caps


class VifBackend:
    """One vif's backend half of the handshake; ``state`` is what it last wrote."""

    def __init__(self) -> None:
        self.state = XenbusState.INITIALISING
        self.frontend = XenbusState.UNKNOWN
        self.rings: VifRings | None = None
        self.error: str | None = None
        self._reading = False
        self._pending: VifRings | None = None  # asked to Map, not yet mapped

    def _to(self, state: XenbusState) -> Write:
        self.state = state
        return Write("state", str(int(state)))

    def start(self) -> list[Action]:
        """Offer the features, then wait for the frontend."""
        if self.state != XenbusState.INITIALISING:
            return []
        return [*(Write(k, v) for k, v in FEATURES), self._to(XenbusState.INIT_WAIT)]

    def frontend_state(self, state: int) -> list[Action]:
        """The frontend's ``state`` key changed (to ``state``, any integer)."""
        try:
            front = XenbusState(state)
        except ValueError:
            return self.fault(f"the frontend's state {state} is unknown")
        self.frontend = front
        if front in (XenbusState.INITIALISED, XenbusState.CONNECTED):
            if self.state == XenbusState.INIT_WAIT and not self._reading and self._pending is None:
                self._reading = True
                return [Read(FRONTEND_KEYS)]
            return []
        if front == XenbusState.CLOSING:
            return self._close(XenbusState.CLOSING)
        if front == XenbusState.CLOSED:
            actions = self._close(XenbusState.CLOSING)
            if self.state != XenbusState.CLOSED:
                actions.append(self._to(XenbusState.CLOSED))
            return actions
        if front == XenbusState.INITIALISING and self.state == XenbusState.CLOSED:
            stale: list[Action] = [Remove("error")] if self.error is not None else []
            self.error = None
            return [*stale, self._to(XenbusState.INIT_WAIT)]  # the frontend reconnects
        return []

    def frontend_keys(self, values: Mapping[str, str | None]) -> list[Action]:
        """The values of the ``Read`` asked for."""
        if not self._reading:
            return []
        self._reading = False
        try:
            rings = VifRings(
                _u32(values, "tx-ring-ref"),
                _u32(values, "rx-ring-ref"),
                _u32(values, "event-channel"),
                _rx_caps(values),
            )
            if values.get("request-rx-copy") != "1":
                raise ValueError("the frontend does not request rx-copy")
        except ValueError as exc:
            return self.fault(str(exc))
        self._pending = rings
        return [Map(rings)]

    def mapped(self) -> list[Action]:
        """The ``Map`` is done: the rings are live."""
        if self._pending is None:
            return []
        self.rings, self._pending = self._pending, None
        return [self._to(XenbusState.CONNECTED)]

    def map_failed(self, reason: str) -> list[Action]:
        """The ``Map`` could not be done (a bad grant, a bad port)."""
        self._pending = None
        return self.fault(reason)

    def fault(self, reason: str) -> list[Action]:
        """The frontend broke the rules: say why in ``error``, and close."""
        if self.state in (XenbusState.CLOSING, XenbusState.CLOSED):
            return []
        self.error = reason
        return [Write("error", reason), *self._close(XenbusState.CLOSING)]

    def toolstack_closing(self) -> list[Action]:
        """The toolstack set the backend Closing (a destroy, a detach): release
        everything and say Closed, which is what it waits for."""
        if self.state == XenbusState.CLOSED:
            return []
        self.state = XenbusState.CLOSING  # the toolstack's write, not ours
        return [*self._close(XenbusState.CLOSING), self._to(XenbusState.CLOSED)]

    def _close(self, state: XenbusState) -> list[Action]:
        self._reading = False
        actions: list[Action] = []
        if self.rings is not None or self._pending is not None:
            actions.append(Unmap())
        self.rings = self._pending = None
        if self.state not in (XenbusState.CLOSING, XenbusState.CLOSED):
            actions.append(self._to(state))
        return actions
