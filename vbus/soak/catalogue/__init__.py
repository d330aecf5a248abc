"""The catalogue of bad behaviour: one small class per misbehaviour, one module per connector.

A ``Misbehaviour`` does one bad thing once (``run``) against a daemon and
reports an ``Outcome``: what the daemon did about it, whether that was the
reaction the design promises (``expect``), how long it took to notice
(from the moment of the bad act to the fault / error / disconnect the client
sees) and whether what the bad client held was given back.  The soak repeats
every selected behaviour with a pause between instances; the tests run each
one once next to a good client.

Some behaviours need something of the daemon under test (a sink-mode device,
known bounds, an admin tree to change member rules through, huge pages):
``unavailable`` says why one cannot run against a ``Context``, and the soak
skips it with that reason.  A behaviour that ``exhausts_uid`` drives its uid
to a per-uid bound, so it runs under a uid that no other client uses.

Extension point: a connector's catalogue is a module here that exports
``CATALOGUE`` (a tuple of Misbehaviour subclasses) and is listed in
``_MODULES``: ``userspace.py`` (hostile processes), ``kvm.py`` (hostile KVM
guests, simulated by ``vbus.kvmsim``, which need ``kvm_socket``), ``xen.py``
(hostile domains, which need ``xen_socket`` and a pool of admitted
``xen_domids``), ``vhost_user.py`` (hostile VMMs, which need ``vhost_dir``)
and ``venet.py`` (bad venet norths, which need ``venets``).  A connector's
``Context`` needs are optional fields below.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import random
import time
import traceback
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeAlias

__all__ = [
    "CONNECTORS",
    "Context",
    "Expect",
    "Misbehaviour",
    "Outcome",
    "Unexpected",
    "catalogue",
    "run_instance",
    "select",
]

Expect: TypeAlias = Literal[
    "fault",  # the device connection is faulted (FAULT event / EFAULT), the socket stays
    "error",  # a clear ERROR reply; the connection stays usable
    "disconnect",  # ERROR (when it can be said) and the daemon hangs up
    "denied",  # NotFound / Denied with no hint of what exists elsewhere
    "backpressure",  # the device stops taking from the stalled client, loses nothing
    "absorbed",  # well-formed but abusive: served correctly, others unaffected
    "reclaimed",  # the client dies: the daemon releases everything it held
]

# connector -> module with its CATALOGUE, in the order of the report
_MODULES: dict[str, str] = {
    "userspace": "vbus.soak.catalogue.userspace",
    "kvm": "vbus.soak.catalogue.kvm",
    "xen": "vbus.soak.catalogue.xen",
    "vhost_user": "vbus.soak.catalogue.vhost_user",
    "venet": "vbus.soak.catalogue.venet",
}
CONNECTORS: tuple[str, ...] = tuple(_MODULES)


class Unexpected(Exception):
    """The daemon reacted, but not as the design promises (a finding)."""


@dataclass
class Context:
    """What a misbehaviour needs to know about the daemon under test."""

    socket: Path
    device: str = "echo0"  # an echo device on the bad client's bus
    hidden: tuple[str, ...] = ()  # devices that exist, but on other buses
    cap_safe: bool = False  # per-uid caps may be hit without locking out anyone else
    stranger: bool = False  # not the daemon's administrator: STATUS must be denied
    handshake_timeout: float = 5.0
    max_pending_per_uid: int = 256
    max_connections_per_uid: int = 1024
    timeout: float = 10.0  # longest wait for any reaction
    seed: int = 0
    own_bus: bool = False  # the bad clients of this process are the only clients of their bus
    sink_device: str | None = None  # an echo device in sink mode on the bad client's bus
    # The daemon's bounds on registered shared memory (per peer, per uid), when known.
    max_shm_per_peer: int | None = None
    max_shm_per_uid: int | None = None
    max_fds_per_uid: int | None = None
    hugepages: int = 0  # free huge pages a bad client may take to empty the pool
    # Open for writing on the ``members`` file of a bus that ``device`` is linked
    # to (the admin tree): a bad client can have its own member rule removed.
    members_fd: int | None = None
    hold: float = 0.2  # seconds a bad client keeps a bound it reached before letting go
    # Told (behaviour, what) when an instance reaches a point a watcher may act on.
    on_note: Callable[[str, str], None] | None = None
    # Resolves detections only the daemon's log can time (a SIGKILLed client
    # sees nothing): returns the log text, or None where it is not readable.
    read_log: Callable[[], str] | None = None
    # The daemon's kvm.sock, where simulated VMMs register their guests (None: no kvm).
    kvm_socket: Path | None = None
    # The Xen connector's attach socket, and domids a ``domid:N`` rule admits
    # to the bus of ``device`` (a hostile domain attaches under one of them).
    xen_socket: Path | None = None
    xen_domids: tuple[int, ...] = ()
    # The vhost-user socket directory of the bad clients' bus, with one venet
    # per vhost_user behaviour, named after it (None: those cannot run).
    vhost_dir: Path | None = None
    # venet devices of one switch on the bad client's bus (the venet catalogue's ports).
    venets: tuple[str, ...] = ()
    rng: random.Random = field(init=False)
    gate: asyncio.Lock = field(init=False)  # connects vs. bursts of half-open sockets
    _free_domids: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.gate = asyncio.Lock()
        self._free_domids = list(self.xen_domids)

    @contextlib.asynccontextmanager
    async def xen_domid(self) -> AsyncIterator[int]:
        """A domid of the pool for one instance; back at the end of the queue
        afterwards (the daemon releases a domain once it sees the hang-up)."""
        while not self._free_domids:
            await asyncio.sleep(0.05)
        domid = self._free_domids.pop(0)
        try:
            yield domid
        finally:
            self._free_domids.append(domid)

    def note(self, behaviour: str, what: str) -> None:
        if self.on_note is not None:
            self.on_note(behaviour, what)


@dataclass
class Outcome:
    behaviour: str
    ok: bool  # the promised reaction was observed, nothing worse happened
    reaction: str  # what the daemon did, in a few words, with its reason
    detect_s: float | None = None  # bad act -> reaction, as seen by the client
    faults: int = 0  # faults / errors / disconnects / refusals dealt to the bad client
    reclaimed: bool | None = None  # what it held was released (None: not observable here)
    detail: str = ""
    started: float = 0.0  # time.time() at the start of the instance
    pending: dict[str, Any] | None = None  # left for the runner to resolve (see Crash)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Misbehaviour:
    """One kind of bad client.  Subclasses set the class attributes and ``run``."""

    name: ClassVar[str]
    connector: ClassVar[str]
    expect: ClassVar[Expect]
    summary: ClassVar[str]
    pause: ClassVar[float] = 0.5  # between two instances in a soak (keeps bad clients light)
    exhausts_uid: ClassVar[bool] = False  # reaches a per-uid bound: needs a uid of its own

    @classmethod
    def unavailable(cls, ctx: Context) -> str | None:
        """Why this behaviour cannot run against ``ctx`` (None: it can)."""
        if cls.exhausts_uid and not ctx.cap_safe:
            return "it exhausts a per-uid bound and needs a uid no other client uses"
        return None

    async def run(self, ctx: Context) -> Outcome:
        raise NotImplementedError

    def outcome(self, ok: bool, reaction: str, **fields: Any) -> Outcome:
        return Outcome(self.name, ok, reaction, **fields)


async def run_instance(behaviour: Misbehaviour, ctx: Context) -> Outcome:
    """Run one instance, bounded in time; whatever goes wrong becomes a failed Outcome."""
    started = time.time()
    try:
        async with asyncio.timeout(ctx.timeout * 3):
            outcome = await behaviour.run(ctx)
    except Unexpected as exc:
        outcome = behaviour.outcome(False, "unexpected reaction", detail=str(exc))
    except TimeoutError:
        outcome = behaviour.outcome(False, "no reaction in time", detail="instance timed out")
    except Exception as exc:
        outcome = behaviour.outcome(
            False, "client error", detail=f"{type(exc).__name__}: {exc} at {_where(exc)}"[:500]
        )
    outcome.started = started
    return outcome


def _where(exc: BaseException) -> str:
    """The innermost catalogue line an exception went through (what the bad client was doing)."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/soak/catalogue/" in f.filename] or frames
    return f"{Path(ours[-1].filename).name}:{ours[-1].lineno} {ours[-1].line}"


def catalogue(connector: str | None = None) -> tuple[type[Misbehaviour], ...]:
    """Every misbehaviour (of one connector, or of all), in report order."""
    names = CONNECTORS if connector is None else (connector,)
    found: list[type[Misbehaviour]] = []
    for name in names:
        module = importlib.import_module(_MODULES[name])
        found.extend(module.CATALOGUE)
    return tuple(found)


def select(spec: str) -> tuple[type[Misbehaviour], ...]:
    """``all``, a connector name, or a comma-separated list of behaviour names."""
    everything = catalogue()
    by_name = {cls.name: cls for cls in everything}
    chosen: list[type[Misbehaviour]] = []
    for word in (part.strip() for part in spec.split(",")):
        if not word:
            continue
        if word == "all":
            picked: tuple[type[Misbehaviour], ...] = everything
        elif word in CONNECTORS:
            picked = catalogue(word)
        elif word in by_name:
            picked = (by_name[word],)
        else:
            known = ", ".join(["all", *CONNECTORS, *by_name])
            raise ValueError(f"unknown misbehaviour {word!r} (known: {known})")
        chosen.extend(cls for cls in picked if cls not in chosen)
    return tuple(chosen)
