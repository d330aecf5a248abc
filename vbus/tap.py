"""``vbus tap``: a Linux network stack as the north driver of a venet.

The command opens a venet on its bus, negotiates checksum and TSO offloads
(none of TSO with ``--no-gso``), creates a tap interface (inside the network
namespace ``--netns`` when given: the tap is made there, the process stays
where it is), gives it the venet's MAC address and MTU, brings it up, and
moves frames both ways with the client library: what the stack sends on the
tap goes to the device's tx queue, what the device puts on the rx queue is
written to the tap.  The tap carries offloads as negotiated (TUNSETOFFLOAD),
so super-frames cross as they are.

SIGTERM or SIGINT: the link goes down on the device, the tap is removed
(its descriptor closed), exit status 0.  Errors are one line on stderr, exit
status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vbus.client import ClientQueue, Device, connect
from vbus.errors import Closed, Invalid, NotFound, VbusError
from vbus.net import tap as taplib
from vbus.net.calls import (
    CALL_CONFIG,
    CALL_FEATURES,
    CALL_LINK_DOWN,
    CALL_LINK_UP,
    CALL_NEGOTIATE,
    CONFIG,
    NEGOTIATED,
    TAP_MAX_MTU,
    U64,
)
from vbus.net.vnet import (
    F_CSUM,
    F_GUEST_CSUM,
    F_GUEST_TSO4,
    F_GUEST_TSO6,
    F_HOST_TSO4,
    F_HOST_TSO6,
    F_VERSION_1,
    HDR_SIZE,
    MAX_GSO_FRAME,
    feature_names,
    max_plain_frame,
)

__all__ = ["TapBridge", "TapConfig", "add_parser", "main", "run_tap"]

QUEUE_COUNT = 256
# Without GSO frames are small and come in larger numbers: a longer rx ring
# (1.5 KiB buffers) absorbs a burst that 256 would drop.
QUEUE_COUNT_SMALL = 1024
READ_BATCH = 64  # frames read from the tap per wake-up


@dataclass(frozen=True, slots=True)
class TapConfig:
    device: str
    ifname: str
    netns: str | None = None
    gso: bool = True
    mtu: int | None = None
    socket: Path | None = None


def add_parser(sub: Any) -> None:
    tap = sub.add_parser(
        "tap",
        help="bridge a venet to a tap interface (a Linux network stack as its driver)",
        description="Open a venet of your bus, create a tap interface (in network namespace "
        "NS when given), and move frames between them with offloads negotiated, until "
        "SIGTERM: then the link goes down and the tap is removed.",
    )
    tap.add_argument("--device", required=True, help="the venet device (name or numeric id)")
    tap.add_argument("--ifname", required=True, help="name of the tap interface to create")
    tap.add_argument("--netns", help="create the tap in this network namespace (ip netns)")
    tap.add_argument(
        "--no-gso", action="store_true", help="negotiate no TSO: only frames up to the MTU"
    )
    tap.add_argument("--mtu", type=int, help="MTU of the tap (default and maximum: the device's)")


def main(args: argparse.Namespace) -> int:
    config = TapConfig(
        device=args.device,
        ifname=args.ifname,
        netns=args.netns,
        gso=not args.no_gso,
        mtu=args.mtu,
        socket=args.socket,
    )
    try:
        import uvloop

        return int(uvloop.run(run_tap(config)))
    except VbusError as exc:
        print(f"vbus tap: {exc.message}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"vbus tap: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _make_tap(ifname: str, offload: int, mtu: int, mac: bytes) -> tuple[int, str]:
    fd, name = taplib.open_tap(ifname, offload)
    try:
        taplib.set_link(name, mtu=mtu, mac=mac)
        taplib.set_link(name, up=True)
    except BaseException:
        os.close(fd)
        raise
    return fd, name


async def run_tap(config: TapConfig, on_ready: Callable[[str], None] | None = None) -> int:
    """Bridge until SIGTERM/SIGINT (0) or until the device goes away (1)."""
    if config.netns is not None:
        try:
            taplib.netns_path(config.netns)
        except FileNotFoundError:
            raise NotFound(f"no network namespace {config.netns!r}") from None
    if not taplib.valid_ifname(config.ifname):
        raise Invalid(f"bad interface name {config.ifname!r}")
    ref: str | int = int(config.device) if config.device.isdigit() else config.device
    async with connect(config.socket, name=f"vbus-tap {config.ifname}") as bus:
        try:
            dev = await bus.open(ref)
        except NotFound:
            raise NotFound(f"no device {config.device!r} on bus {bus.name!r}") from None
        if dev.info.deviceclass != "venet":
            raise Invalid(
                f"device {config.device!r} is of class {dev.info.deviceclass}, not a venet"
            )
        mac, device_mtu, _link, _features = CONFIG.unpack(await dev.call(CALL_CONFIG))
        mtu = config.mtu if config.mtu is not None else min(device_mtu, TAP_MAX_MTU)
        if not 68 <= mtu <= min(device_mtu, TAP_MAX_MTU):
            raise Invalid(f"--mtu {mtu}: the device takes 68..{min(device_mtu, TAP_MAX_MTU)}")
        offered = U64.unpack(await dev.call(CALL_FEATURES))[0]
        want = F_VERSION_1 | F_CSUM | F_GUEST_CSUM
        if config.gso:
            want |= F_HOST_TSO4 | F_HOST_TSO6 | F_GUEST_TSO4 | F_GUEST_TSO6
        features, rx_size = NEGOTIATED.unpack(
            await dev.call(CALL_NEGOTIATE, U64.pack(want & offered))
        )
        offload = taplib.offload_flags(features, reader="driver")
        try:
            fd, name = taplib.in_netns(
                config.netns, lambda: _make_tap(config.ifname, offload, mtu, mac)
            )
        except OSError as exc:
            raise Invalid(f"cannot create tap {config.ifname!r}: {exc.strerror or exc}") from None
        bridge = TapBridge(dev, fd, features, mtu)
        try:
            return await bridge.run(rx_size, name, config.netns, on_ready)
        finally:
            os.close(fd)  # the tap goes with its last descriptor


class TapBridge:
    """Frames between one tap descriptor and one venet's queues."""

    def __init__(self, dev: Device, fd: int, features: int, mtu: int) -> None:
        self.dev = dev
        self.fd = fd
        self.features = features
        self.tx_size = HDR_SIZE + (
            MAX_GSO_FRAME if features & (F_HOST_TSO4 | F_HOST_TSO6) else max_plain_frame(mtu)
        )
        self.counters = {
            "to_device": 0,
            "to_tap": 0,
            "tap_full": 0,
            "tap_refused": 0,
            "oversize": 0,
        }

    async def run(
        self,
        rx_size: int,
        name: str,
        netns: str | None,
        on_ready: Callable[[str], None] | None,
    ) -> int:
        dev = self.dev
        loop = asyncio.get_running_loop()
        # One byte more than the longest frame: a read that fills the whole
        # window was longer than allowed (the tap truncates it) and is dropped.
        tx = await dev.shm(0, "tx", count=QUEUE_COUNT, buf_size=self.tx_size + 1)
        count = QUEUE_COUNT if rx_size > 16 << 10 else QUEUE_COUNT_SMALL
        rx = await dev.shm(1, "rx", count=count, buf_size=rx_size)
        await dev.call(CALL_LINK_UP)
        # Resolved by SIGTERM/SIGINT, failed by the pump (its reason).
        finished: asyncio.Future[None] = loop.create_future()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, _resolve, finished)
        where = f" in netns {netns}" if netns else ""
        line = (
            f"vbus tap: {dev.info.name} <-> {name}{where} up, "
            f"features {feature_names(self.features)}"
        )
        print(line, flush=True)
        if on_ready is not None:
            on_ready(name)
        pump = _Pump(self, loop, tx, rx, finished)
        try:
            pump.start()
            await asyncio.shield(finished)
        except Exception:  # the pump's reason: raised below, after the link went down
            pass
        finally:
            pump.stop()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
        with contextlib.suppress(VbusError):
            await dev.call(CALL_LINK_DOWN)
        exc = finished.exception() if finished.done() else None
        if exc is not None:
            if isinstance(exc, VbusError):
                raise exc
            raise Closed(f"bridge failed: {exc!r}")
        return 0


class _Pump:
    """The bridge's two directions as event-loop callbacks on descriptors that
    stay registered: no task, future or epoll change per frame.

    tap -> device: the tap descriptor's reader reads frames straight into the
    tx ring (``post_from``); when the ring is full it leaves the loop, and the
    tx queue's call descriptor (the device freed space) brings it back.
    device -> tap: the rx queue's call descriptor wakes the pump, which writes
    the filled buffers to the tap straight from the ring (``recv_each``),
    posts them again and re-arms (arm, fence, re-check: no wake-up is lost).
    """

    def __init__(
        self,
        bridge: TapBridge,
        loop: asyncio.AbstractEventLoop,
        tx: ClientQueue,
        rx: ClientQueue,
        failed: asyncio.Future[None],
    ) -> None:
        self.bridge = bridge
        self.loop = loop
        self.tx = tx
        self.rx = rx
        self.failed = failed
        self.fd = bridge.fd
        self.limit = bridge.tx_size
        self.window = bridge.tx_size + 1  # a read that fills it was too long
        self.empty = False
        self.reading = False
        self.waiting_room = False
        self.rx_scheduled = False
        self.stopped = False

    def start(self) -> None:
        self.tx.on_error = self.rx.on_error = self._fail
        self.loop.add_reader(self.rx.call.fd, self._on_rx_signal)
        self._read_tap(True)
        self.loop.call_soon(self._pump_rx)

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        self.tx.on_error = self.rx.on_error = None
        self._read_tap(False)
        for fd in (self.rx.call.fd, self.tx.call.fd):
            if fd >= 0:
                self.loop.remove_reader(fd)

    def _fail(self, exc: BaseException) -> None:
        if not self.failed.done():
            self.failed.set_exception(exc)
        if not self.stopped:
            self.stop()

    def _read_tap(self, on: bool) -> None:
        if on and not self.reading:
            self.loop.add_reader(self.fd, self._on_tap)
        elif not on and self.reading:
            self.loop.remove_reader(self.fd)
        self.reading = on

    # --- tap -> device --------------------------------------------------------
    def _readinto(self, view: memoryview) -> int | None:
        try:
            n = os.readv(self.fd, (view,))
        except BlockingIOError:
            self.empty = True
            return None
        if n > self.limit:
            self.bridge.counters["oversize"] += 1
            return -1
        if view[0] > 1:
            # The kernel may mark DATA_VALID; from a driver only NEEDS_CSUM is allowed.
            view[0] &= 1
        return n

    def _on_tap(self) -> None:
        try:
            self.empty = False
            done = self.tx.post_from(self._readinto, self.window, READ_BATCH)
            self.bridge.counters["to_device"] += done
            if not done and not self.empty:
                self._wait_room()  # the ring is full: the tap's queue backs up
        except Exception as exc:
            self._fail(exc)

    def _wait_room(self) -> None:
        ring = self.tx.ring
        self._read_tap(False)
        ring.signal.arm()
        if ring.room_for(self.window):
            ring.signal.disarm()
            self._read_tap(True)
            return
        if not self.waiting_room:
            self.waiting_room = True
            self.loop.add_reader(self.tx.call.fd, self._on_room)

    def _on_room(self) -> None:
        tx = self.tx
        tx.call.drain()
        tx.ring.signal.disarm()
        if tx.ring.room_for(self.window):
            self.waiting_room = False
            self.loop.remove_reader(tx.call.fd)
            self._read_tap(True)
        else:
            tx.ring.signal.arm()
            if tx.ring.room_for(self.window):
                self._on_room()

    # --- device -> tap --------------------------------------------------------
    def _write(self, frame: memoryview) -> None:
        if not frame:
            return  # a buffer the device could not use
        counters = self.bridge.counters
        try:
            os.write(self.fd, frame)
            counters["to_tap"] += 1
        except BlockingIOError:
            counters["tap_full"] += 1
        except OSError:
            counters["tap_refused"] += 1

    def _on_rx_signal(self) -> None:
        self.rx.call.drain()
        self.rx.ring.signal.disarm()
        if not self.rx_scheduled:
            self._pump_rx()

    def _pump_rx(self) -> None:
        self.rx_scheduled = False
        if self.stopped:
            return
        rx = self.rx
        ring = rx.ring
        try:
            for _ in range(4):  # then the loop's other callbacks get their turn
                if not rx.take_each(self._write, QUEUE_COUNT):
                    break
            else:
                self._again()
                return
            ring.signal.arm()
            if ring.completed():
                ring.signal.disarm()
                self._again()
        except Exception as exc:
            self._fail(exc)

    def _again(self) -> None:
        self.rx_scheduled = True
        self.loop.call_soon(self._pump_rx)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
