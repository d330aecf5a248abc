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
    VLAN_HLEN,
    feature_names,
    max_plain_frame,
)

__all__ = ["TapBridge", "TapConfig", "add_parser", "main", "run_tap"]

QUEUE_COUNT = 256
# Without GSO frames are small and come in larger numbers: a longer rx ring
# (1.5 KiB buffers) absorbs a burst that 256 would drop.
QUEUE_COUNT_SMALL = 1024
READ_BATCH = 64  # frames read from the tap per wake-up
READ_SIZE = HDR_SIZE + MAX_GSO_FRAME + VLAN_HLEN


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
        tx = await dev.shm(0, "tx", count=QUEUE_COUNT, buf_size=self.tx_size)
        count = QUEUE_COUNT if rx_size > 16 << 10 else QUEUE_COUNT_SMALL
        rx = await dev.shm(1, "rx", count=count, buf_size=rx_size)
        await dev.call(CALL_LINK_UP)
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        where = f" in netns {netns}" if netns else ""
        line = (
            f"vbus tap: {dev.info.name} <-> {name}{where} up, "
            f"features {feature_names(self.features)}"
        )
        print(line, flush=True)
        if on_ready is not None:
            on_ready(name)
        tasks = [
            asyncio.ensure_future(self._tap_to_device(tx)),
            asyncio.ensure_future(self._device_to_tap(rx)),
            asyncio.ensure_future(stop.wait()),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
            await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(VbusError):
            await dev.call(CALL_LINK_DOWN)
        for task in done:
            if task is not tasks[2] and not task.cancelled() and task.exception() is not None:
                exc = task.exception()
                if isinstance(exc, VbusError):
                    raise exc
                raise Closed(f"bridge failed: {exc!r}")
        return 0

    def _read_batch(self) -> list[bytes]:
        frames: list[bytes] = []
        fd = self.fd
        limit = self.tx_size
        for _ in range(READ_BATCH):
            try:
                data = os.read(fd, READ_SIZE)
            except BlockingIOError:
                break
            if len(data) > limit:
                self.counters["oversize"] += 1
                continue
            if data[0] > 1:
                # The kernel may mark DATA_VALID; from a driver only NEEDS_CSUM is allowed.
                data = bytes((data[0] & 1,)) + data[1:]
            frames.append(data)
        return frames

    async def _readable(self) -> None:
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        loop.add_reader(self.fd, _resolve, ready)
        try:
            await ready
        finally:
            loop.remove_reader(self.fd)

    async def _tap_to_device(self, tx: ClientQueue) -> None:
        while True:
            frames = self._read_batch()
            if not frames:
                await self._readable()
                continue
            await tx.send_many(frames)  # waits while the ring is full: the tap's queue backs up
            self.counters["to_device"] += len(frames)

    async def _device_to_tap(self, rx: ClientQueue) -> None:
        fd = self.fd
        counters = self.counters
        while True:
            for frame in await rx.recv_many(QUEUE_COUNT):
                if not frame:
                    continue  # a buffer the device could not use
                try:
                    os.write(fd, frame)
                    counters["to_tap"] += 1
                except BlockingIOError:
                    counters["tap_full"] += 1
                except OSError:
                    counters["tap_refused"] += 1


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
