"""venet: a virtual Ethernet device (docs/design.md 3.8).

Queue 0 carries frames north->south (tx), queue 1 brings them back: the north
posts empty buffers, the device fills them (rx).  A frame is
``struct virtio_net_hdr_v1`` followed by an Ethernet frame (``vbus.net.vnet``).
Behind the device is a backend: a learning switch shared with the other
venets of the same name on the same bus (``switch:NAME``), or a host tap the
daemon opens (``tap:IFNAME``).

call() functions are listed in ``vbus.net.calls``: the offered features,
negotiation (while the link is down; the answer says the rx buffer size
every posted buffer must have: there is no MRG_RXBUF, one frame is one
buffer), the configuration, the MAC address, link up and down, the counters.

Any number of connections may open a venet and ask; one drives it: the first
to negotiate, register a queue or bring the link up, until it closes.  The
others get EBUSY for those.

Frames from the north are checked (``vnet.check_tx``); a bad one is dropped
and counted by cause, nothing is raised.  Frames for the north go straight
into its posted rx buffers; when it has none, up to ``BACKLOG_FRAMES``
(``BACKLOG_BYTES``) wait in the port's own queue, the source stops (the
tap's descriptor leaves the loop) and the rx queue is armed: the north's
next rx post resumes it.  Past the bound, frames for it are dropped and
counted: a stalled north loses its own frames and delays nobody.
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import secrets
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from vbus.core.device import Attribute, DeviceModel, Session
from vbus.errors import Busy, Invalid, NotPermitted, NotSupported, VbusError
from vbus.log import get_logger
from vbus.net import tap as taplib
from vbus.net.calls import (
    CALL_CONFIG,
    CALL_FEATURES,
    CALL_LINK_DOWN,
    CALL_LINK_UP,
    CALL_MAC,
    CALL_NEGOTIATE,
    CALL_STATS,
    CONFIG,
    NEGOTIATED,
    QUEUE_RX,
    QUEUE_TX,
    TAP_MAX_MTU,
    U64,
)
from vbus.net.switch import Switch, Switches
from vbus.net.vnet import (
    CAUSES,
    F_GUEST_CSUM,
    GSO,
    HDR_SIZE,
    MAX_GSO_FRAME,
    NUM_BUFFERS_1,
    OFFERED,
    RX_CAPS,
    VLAN_HLEN,
    check_tx,
    feature_names,
    negotiate,
    rx_buffer_size,
)

if TYPE_CHECKING:
    from vbus.core.model import Connection
    from vbus.memory import Memory
    from vbus.queue import Buffer, Queue

__all__ = [
    "BACKLOG_BYTES",
    "BACKLOG_FRAMES",
    "COUNTERS",
    "SWITCHES",
    "Backend",
    "Venet",
    "parse_backend",
]

log = get_logger("vbus.venet")

BACKLOG_FRAMES: Final = 256  # per port, waiting for rx buffers
BACKLOG_BYTES: Final = 4 << 20
TAP_BATCH: Final = 64  # frames read from a tap per loop wake-up
TAP_READ: Final = HDR_SIZE + MAX_GSO_FRAME + VLAN_HLEN  # the longest frame a tap hands over

# Every key is always there (0 until it counts): one stats file shape.
COUNTERS: Final = (
    "tx_frames",
    "tx_bytes",
    "tx_gso_frames",
    "tx_largest",
    "tx_drop_runt",
    "tx_drop_oversize",
    "tx_drop_bad_header",
    "tx_drop_link_down",
    "tx_drop_same_port",
    "tx_drop_ring_full",
    "tx_drop_backend_error",
    "tx_flooded",
    "tx_learn_refused",
    "rx_frames",
    "rx_bytes",
    "rx_gso_frames",
    "rx_largest",
    "rx_drop_ring_full",
    "rx_drop_no_buffer",
    "rx_drop_link_down",
    "rx_segmented",
    "rx_csum_completed",
    "rx_stops",
    "rx_restarts",
    "link_changes",
)
_SIGNALS: Final = (
    "tx_signals_sent",
    "tx_signals_suppressed",
    "rx_signals_sent",
    "rx_signals_suppressed",
)
_DROP_KEY: Final = {cause: f"tx_drop_{name}" for cause, name in CAUSES.items()}
_SWITCH_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")

# The switches of this daemon.  Keyed by (bus, name): venets on different
# buses never share a switch, whatever its name.
SWITCHES: Final = Switches()


@dataclass(frozen=True, slots=True)
class Backend:
    kind: str  # "switch" or "tap"
    name: str


def parse_backend(text: str) -> Backend:
    kind, sep, name = text.partition(":")
    if sep and kind == "switch" and _SWITCH_NAME.fullmatch(name):
        return Backend(kind, name)
    if sep and kind == "tap" and taplib.valid_ifname(name):
        return Backend(kind, name)
    raise Invalid(f"backend: {text!r} is neither switch:NAME nor tap:IFNAME")


def random_mac() -> str:
    """A random locally administered unicast address."""
    raw = bytearray(secrets.token_bytes(6))
    raw[0] = (raw[0] & 0xFC) | 0x02
    return ":".join(f"{b:02x}" for b in raw)


class VenetSession(Session):
    """One connection's view of the device; the driving one is also a switch port."""

    model: Venet

    def __init__(self, model: Venet, conn: Connection) -> None:
        super().__init__(model, conn)
        self.counters = model.counters  # a switch port counts into these
        self.features = 0
        self.caps = 0  # RX_CAPS bits: what the switch may hand over as is
        self.up = False
        self.switch: Switch | None = None
        self.backlog: deque[bytes] = deque()
        self.backlog_bytes = 0
        self.stopped = False  # frames wait for rx buffers
        self.failed: BaseException | None = None

    # --- call() -----------------------------------------------------------
    def call(self, func: int, data: bytes) -> bytes:
        model = self.model
        if func == CALL_FEATURES:
            return U64.pack(OFFERED)
        if func == CALL_NEGOTIATE:
            self._claim()
            if self.up:
                raise Busy("venet: features are negotiated while the link is down")
            if len(data) != 8:
                raise Invalid("venet: negotiate takes a u64 feature mask")
            try:
                features = negotiate(U64.unpack(data)[0])
            except ValueError as exc:
                raise Invalid(f"venet: {exc}") from None
            self.features = features
            self.caps = features & RX_CAPS
            return NEGOTIATED.pack(features, rx_buffer_size(features, model.mtu))
        if func == CALL_CONFIG:
            return CONFIG.pack(model.mac, model.mtu, int(self.up), self.features)
        if func == CALL_MAC:
            return model.mac
        if func == CALL_LINK_UP:
            self._claim()
            self._link_up()
            return b"\x01"
        if func == CALL_LINK_DOWN:
            if model.owner is not self:
                raise Busy("venet: only the connection driving the device sets its link")
            self._link_down()
            return b"\x00"
        if func == CALL_STATS:
            return "".join(f"{key} {value}\n" for key, value in model.stats().items()).encode()
        raise NotSupported(f"venet: no call function {func}")

    def _claim(self) -> None:
        owner = self.model.owner
        if owner is None:
            self.model.owner = self
        elif owner is not self:
            raise Busy(f"venet: {self.model.device.name} is driven by another connection")

    def shm(self, index: int, queue: Queue) -> None:
        if index not in (QUEUE_TX, QUEUE_RX):
            raise Invalid(f"venet: queue {index} does not exist (0 = tx, 1 = rx)")
        self._claim()
        if index in self.queues:
            raise Busy(f"venet: queue {index} is already registered")
        if queue.writable != (index == QUEUE_RX):
            raise Invalid(f"venet: queue {index} has the wrong direction")
        self.queues[index] = queue

    # --- link ---------------------------------------------------------------
    def _link_up(self) -> None:
        if self.up:
            return
        model = self.model
        backend = model.backend
        if backend.kind == "switch":
            self.switch = SWITCHES.attach((self.conn.bus, backend.name), self)
        else:
            tap = model.open_tap(backend.name)
            try:
                tap.attach(self)
            except OSError as exc:
                tap.detach()
                raise VbusError(f"venet: tap {tap.name!r}: {exc.strerror or exc}") from None
        self.up = True
        model.link_changed(True)
        log.info(
            "venet.link_up",
            device=model.device.name,
            backend=f"{backend.kind}:{backend.name}",
            features=feature_names(self.features),
        )

    def _link_down(self) -> None:
        if not self.up:
            return
        self.up = False
        if self.switch is not None:
            SWITCHES.detach(self.switch, self)
            self.switch = None
        tap = self.model.tap
        if tap is not None and tap.port is self:
            tap.detach()
        if self.backlog:
            self.counters["rx_drop_link_down"] += len(self.backlog)
            self.backlog.clear()
            self.backlog_bytes = 0
        self.stopped = False
        self.model.link_changed(False)
        log.info("venet.link_down", device=self.model.device.name)

    # --- north -> backend ----------------------------------------------------
    def poll(self, budget: int) -> int:
        if self.failed is not None:
            raise self.failed  # found while delivering outside this poll
        done = 0
        rx = self.queues.get(QUEUE_RX)
        if rx is not None:
            if self.backlog:
                done += self._flush(rx)
            tap = self.model.tap
            paused = tap is not None and tap.port is self and tap.paused
            if paused and not self.backlog and rx.pending():
                assert tap is not None
                tap.resume()
        tx = self.queues.get(QUEUE_TX)
        if tx is None:
            return done
        n = min(tx.pending(), budget)
        if n:
            frames = tx.read_many(n)  # fewer when the poll's byte credit runs out
            if frames:
                tx.kick_north()  # the north may be waiting for ring space
                self._transmit(frames)
                done += len(frames)
        return done

    def _transmit(self, frames: list[bytes]) -> None:
        counters = self.counters
        if not self.up:
            counters["tx_drop_link_down"] += len(frames)
            return
        features = self.features
        mtu = self.model.mtu
        good: list[bytes] = []
        gso = 0
        for frame in frames:
            verdict = check_tx(frame, features, mtu)
            if verdict > GSO:
                counters[_DROP_KEY[verdict]] += 1
            else:
                good.append(frame)
                gso += verdict
        if not good:
            return
        lens = list(map(len, good))
        counters["tx_frames"] += len(good)
        counters["tx_bytes"] += sum(lens) - HDR_SIZE * len(good)
        counters["tx_gso_frames"] += gso
        longest = max(lens) - HDR_SIZE
        if longest > counters["tx_largest"]:
            counters["tx_largest"] = longest
        if self.switch is not None:
            self.switch.forward(self, good, time.monotonic())
        else:
            tap = self.model.tap
            if tap is not None and tap.port is self:
                tap.send(good)

    # --- backend -> north ----------------------------------------------------
    def deliver(self, frames: list[bytes]) -> None:
        """Frames for the north (from the switch or the tap): into its rx
        buffers now, else into the bounded backlog.  Never raises: a broken
        rx ring marks the port failed, and its next poll raises the fault."""
        if not self.up:
            self.counters["rx_drop_link_down"] += len(frames)
            return
        try:
            rx = self.queues.get(QUEUE_RX)
            if rx is None:
                self.counters["rx_drop_ring_full"] += len(frames)
                return
            if self.backlog:
                self._queue(frames)
                return
            taken = self._fill(rx, frames)
            if taken < len(frames):
                self._queue(frames[taken:])
                if not self.stopped:
                    self.stopped = True
                    self.counters["rx_stops"] += 1
                self.wait_for_buffers(rx)
        except Exception as exc:  # a Fault of this north's ring, or a bug: this port only
            self.fail(exc)

    def wait_for_buffers(self, rx: Queue) -> None:
        """Arm rx so that the north's next post wakes this session; buffers
        posted in the meantime are used at once."""
        while self.backlog and rx.enable_notify():
            if not self._flush(rx):
                break

    def _queue(self, frames: list[bytes]) -> None:
        backlog = self.backlog
        dropped = 0
        for frame in frames:
            if len(backlog) >= BACKLOG_FRAMES or self.backlog_bytes + len(frame) > BACKLOG_BYTES:
                dropped += 1
                continue
            backlog.append(frame)
            self.backlog_bytes += len(frame)
        if dropped:
            self.counters["rx_drop_ring_full"] += dropped

    def _flush(self, rx: Queue) -> int:
        """Move the backlog into posted rx buffers; frames taken."""
        backlog = self.backlog
        taken = 0
        while backlog:
            n = min(len(backlog), rx.pending(), 256)
            if n == 0:
                break
            batch = [backlog[i] for i in range(n)]
            n = self._fill(rx, batch)
            if n == 0:
                break
            for _ in range(n):
                self.backlog_bytes -= len(backlog.popleft())
            taken += n
        if not backlog and self.stopped:
            self.stopped = False
            self.counters["rx_restarts"] += 1
        return taken

    def _fill(self, rx: Queue, frames: list[bytes]) -> int:
        """Put frames into posted rx buffers, one each, ``num_buffers`` = 1;
        returns how many frames were taken (written, or dropped because the
        buffer was too small: that buffer comes back empty)."""
        bufs = rx.pop_many(len(frames))
        if not bufs:
            return 0
        memory = rx.memory
        items: list[tuple[Buffer, int]] = []
        written = nbytes = gso = small = longest = 0
        for buf, frame in zip(bufs, frames, strict=False):
            size = len(frame)
            if _room(buf) < size:
                items.append((buf, 0))
                small += 1
                continue
            _write_frame(memory, buf, frame)
            items.append((buf, size))
            written += 1
            nbytes += size
            if frame[1]:
                gso += 1
            if size > longest:
                longest = size
        rx.push_many(items)
        rx.kick_north()
        counters = self.counters
        counters["rx_frames"] += written
        counters["rx_bytes"] += nbytes - HDR_SIZE * written
        counters["rx_gso_frames"] += gso
        counters["rx_drop_no_buffer"] += small
        if longest - HDR_SIZE > counters["rx_largest"]:
            counters["rx_largest"] = longest - HDR_SIZE
        return len(bufs)

    def fail(self, exc: BaseException) -> None:
        """The port cannot take frames any more: off the backend now; the
        next poll raises ``exc`` (the connection is then faulted)."""
        if self.failed is not None:
            return
        self.failed = exc
        log.warning(
            "venet.port_failed",
            device=self.model.device.name,
            reason=exc.message if isinstance(exc, VbusError) else repr(exc),
        )
        self._link_down()

    # --- mitigation ------------------------------------------------------------
    def rearm(self) -> bool:
        tx = self.queues.get(QUEUE_TX)
        rx = self.queues.get(QUEUE_RX)
        ready = tx.enable_notify() if tx is not None else False
        # rx notifications only while something waits for rx buffers: a north
        # posting buffers needs no wake-up otherwise.
        tap = self.model.tap
        waiting = bool(self.backlog) or (tap is not None and tap.port is self and tap.paused)
        if rx is not None and waiting and rx.enable_notify():
            ready = True
        return ready

    def close(self) -> None:
        self._link_down()
        model = self.model
        for index, prefix in ((QUEUE_TX, "tx"), (QUEUE_RX, "rx")):
            queue = self.queues.get(index)
            if queue is not None:
                model.signals[f"{prefix}_signals_sent"] += queue.stats.signals_sent
                model.signals[f"{prefix}_signals_suppressed"] += queue.stats.signals_suppressed
        if model.owner is self:
            model.owner = None
        super().close()


def _room(buf: Buffer) -> int:
    """Bytes the device may write into ``buf``: its writable segments."""
    segments = buf.segments
    if len(segments) == 1:
        addr_len_writable = segments[0]
        return addr_len_writable[1] if addr_len_writable[2] else 0
    return sum(length for _addr, length, writable in segments if writable)


def _write_frame(memory: Memory, buf: Buffer, frame: bytes) -> None:
    """``frame`` into ``buf``'s writable segments in order, num_buffers set to 1."""
    segments = buf.segments
    if len(segments) == 1:
        addr = segments[0][0]
        memory.write(addr, frame)
        memory.write(addr + 10, NUM_BUFFERS_1)
        return
    data = memoryview(frame[:10] + NUM_BUFFERS_1 + frame[12:])
    at = 0
    for addr, length, writable in segments:
        if not writable:
            continue
        piece = data[at : at + length]
        if piece:
            memory.write(addr, piece)
        at += len(piece)
        if at >= len(data):
            break


class TapBackend:
    """A host tap the daemon opened for one venet, moved between its
    descriptor and the driving session's rings from the event loop."""

    def __init__(self, model: Venet, ifname: str) -> None:
        self.model = model
        self.fd, self.name = taplib.open_tap(ifname)
        self.port: VenetSession | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.reading = False
        self.paused = False
        try:
            taplib.set_carrier(self.fd, False)
        except OSError:
            pass  # an older kernel: the stack then queues for nobody, harmlessly
        self.set_mtu(model.mtu)

    def set_mtu(self, mtu: int) -> None:
        try:
            taplib.set_link(self.name, mtu=min(mtu, TAP_MAX_MTU))
        except OSError as exc:  # moved to another namespace: its administrator's business
            log.info("venet.tap_mtu_not_set", tap=self.name, error=exc.strerror)

    def attach(self, port: VenetSession) -> None:
        taplib.set_offload(self.fd, taplib.offload_flags(port.features, reader="device"))
        self.port = port
        self.loop = asyncio.get_running_loop()
        self.paused = False
        try:
            taplib.set_carrier(self.fd, True)
        except OSError:
            pass
        self._start()

    def detach(self) -> None:
        self._stop()
        self.port = None
        self.paused = False
        try:
            taplib.set_carrier(self.fd, False)
        except OSError:
            pass

    def _start(self) -> None:
        if not self.reading and self.loop is not None:
            self.loop.add_reader(self.fd, self._readable)
            self.reading = True

    def _stop(self) -> None:
        if self.reading and self.loop is not None:
            self.loop.remove_reader(self.fd)
            self.reading = False

    def pause(self) -> None:
        """No rx buffers: stop reading until the north posts some."""
        if not self.paused and self.port is not None:
            self._stop()
            self.paused = True
            self.port.counters["rx_stops"] += 1

    def resume(self) -> None:
        if self.paused and self.port is not None:
            self.paused = False
            self.port.counters["rx_restarts"] += 1
            self._start()

    def _readable(self) -> None:
        port = self.port
        if port is None:
            return
        try:
            rx = port.queues.get(QUEUE_RX)
            room = rx.pending() if rx is not None else 0
            if room == 0:
                self.pause()
                if rx is not None and rx.enable_notify():
                    self.resume()  # buffers came in meanwhile
                return
            frames: list[bytes] = []
            fd = self.fd
            for _ in range(min(room, TAP_BATCH)):
                try:
                    frames.append(os.read(fd, TAP_READ))
                except BlockingIOError:
                    break
            if not frames:
                return
            if not port.features & F_GUEST_CSUM:
                # Without GUEST_CSUM the flags must be 0 (the kernel may mark DATA_VALID).
                frames = [f if not f[0] else b"\x00" + f[1:] for f in frames]
            port.deliver(frames)
            if port.backlog:
                self.pause()
        except OSError as exc:
            log.warning("venet.tap_failed", tap=self.name, error=exc.strerror)
            self._stop()
        except Exception as exc:
            port.fail(exc)

    def send(self, frames: list[bytes]) -> None:
        """North -> host: one write per frame, never blocking; a full tap
        queue is a counted drop."""
        fd = self.fd
        full = down = failed = 0
        for frame in frames:
            try:
                os.write(fd, frame)
            except BlockingIOError:
                full += 1
            except OSError as exc:
                if exc.errno == errno.EIO:
                    down += 1  # the host's side of the tap is down
                else:
                    failed += 1  # the kernel refused the frame (EINVAL)
        if full or down or failed:
            counters = self.model.counters
            counters["tx_drop_ring_full"] += full
            counters["tx_drop_link_down"] += down
            counters["tx_drop_backend_error"] += failed

    def close(self) -> None:
        self.detach()
        os.close(self.fd)
        self.fd = -1


class Venet(DeviceModel):
    name = "venet"
    description = (
        "Virtual Ethernet: virtio_net_hdr_v1 frames on queue 0 (tx) and 1 (rx), "
        "behind a learning switch or a host tap."
    )
    attributes = (
        Attribute(
            "mac",
            "mac",
            "",
            doc="the MAC address the north uses; default: random, locally administered",
        ),
        Attribute(
            "mtu",
            "int",
            1500,
            minimum=68,
            maximum=65535,
            doc="largest Ethernet payload of a frame that is not a super-frame",
        ),
        Attribute(
            "backend",
            "str",
            "switch:default",
            max_length=80,
            doc="switch:NAME (a learning switch of this bus) or tap:IFNAME (a host tap)",
        ),
        Attribute(
            "link",
            "choice",
            "down",
            choices=("down", "up"),
            readonly=True,
            doc="up while the driving connection has brought the link up",
        ),
    )

    def __init__(self, device: Any) -> None:
        super().__init__(device)
        attrs = device.attrs
        if not attrs.get("mac"):
            # Chosen once, stored as a value that differs from the default: the
            # persisted state keeps it from here on.
            attrs["mac"] = random_mac()
        self.mac = bytes.fromhex(attrs["mac"].replace(":", ""))
        self.mtu: int = attrs["mtu"]
        self.backend = parse_backend(attrs["backend"])
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.signals = dict.fromkeys(_SIGNALS, 0)  # of closed connections' queues
        self.owner: VenetSession | None = None
        self.tap: TapBackend | None = None

    def open(self, conn: Connection) -> Session:
        return VenetSession(self, conn)

    def attribute_changed(self, name: str, value: Any) -> None:
        if name == "backend":
            backend = parse_backend(value)
            if backend != self.backend and self.owner is not None and self.owner.up:
                raise Busy("venet: the backend changes while the link is down")
            if self.tap is not None and backend != self.backend:
                self.tap.close()
                self.tap = None
            self.backend = backend
        elif name == "mtu":
            self.mtu = value
            if self.tap is not None:
                self.tap.set_mtu(value)
        elif name == "mac":
            self.mac = bytes.fromhex(value.replace(":", ""))

    def link_changed(self, up: bool) -> None:
        self.device.attrs["link"] = "up" if up else "down"  # read-only: never persisted
        self.counters["link_changes"] += 1

    def open_tap(self, ifname: str) -> TapBackend:
        """The device's tap, opened on first use and kept while the device
        lives (an administrator may have moved or configured it)."""
        if self.tap is not None:
            return self.tap
        try:
            self.tap = TapBackend(self, ifname)
        except OSError as exc:
            what = f"venet: cannot open tap {ifname!r}: {exc.strerror}"
            if exc.errno in (errno.EPERM, errno.EACCES):
                raise NotPermitted(what) from None
            if exc.errno == errno.EBUSY:
                raise Busy(what) from None
            if exc.errno == errno.EINVAL:
                raise Invalid(what) from None
            raise VbusError(what) from None
        return self.tap

    def stats(self) -> dict[str, int]:
        out = dict(self.counters)
        signals = dict(self.signals)
        owner = self.owner
        if owner is not None:
            for index, prefix in ((QUEUE_TX, "tx"), (QUEUE_RX, "rx")):
                queue = owner.queues.get(index)
                if queue is not None:
                    signals[f"{prefix}_signals_sent"] += queue.stats.signals_sent
                    signals[f"{prefix}_signals_suppressed"] += queue.stats.signals_suppressed
        out.update(signals)
        switch = owner.switch if owner is not None else None
        out["link_up"] = int(owner is not None and owner.up)
        out["features"] = owner.features if owner is not None else 0
        out["rx_backlog"] = len(owner.backlog) if owner is not None else 0
        out["switch_ports"] = len(switch.ports) if switch is not None else 0
        out["switch_macs"] = len(switch.table) if switch is not None else 0
        return out

    def destroy(self) -> None:
        if self.tap is not None:
            self.tap.close()
            self.tap = None
