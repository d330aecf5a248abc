"""vhost-user: a Linux guest under QEMU sending TCP to a network namespace, through vbus or QEMU's tap.

Each variant boots the same guest (``vbus.vhost.guest``: Debian's cloud
kernel and busybox, QEMU 7.2 with TCG) and times one TCP stream of
``megabytes`` from the guest to a receiver in a network namespace (the
receiver's clock, from its first byte to its last):

- ``vbus``: virtio-net on vbus's vhost-user socket (venet v0), the learning
  switch, venet v1, ``vbus tap`` into the namespace; EVENT_IDX on (the
  guest negotiates it);
- ``vbus-no-event-idx``: the same with ``event_idx=off`` on the QEMU device,
  so both sides fall back to the ring flags;
- ``qemu-tap``: QEMU's own ``-netdev tap,vhost=off`` (the tap moved into the
  namespace), vbus not involved: what a user would run instead.

For the vbus variants the daemon logs, when the guest stops the device,
what the run cost: kick wake-ups of the daemon, interrupts (call eventfd
writes) to the guest, and buffers on both rings; per buffer they are the
figures below.  Root, QEMU and Debian's apt tools are needed; else the
variant is unavailable.  It runs only when named (``vbus bench vhost_user``).

Every variant uses ``vectors=0`` (INTx: QEMU 7.2 under TCG needs it for
vhost-user, PLATFORM.md), so the interrupt path is the same for all three;
with one TCG vCPU on a shared machine the guest itself is the bottleneck
(measured once here, 32 MB: vbus 0.026-0.035 Gb/s, QEMU's tap 0.017 Gb/s,
the daemon busy ~1 s of the ~8 s).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from vbus.bench.daemon import BenchDaemon
from vbus.bench.subject import Figure, Figures, Params, Subject, Target, Unavailable, Variant
from vbus.connectors.vhost_user import socket_path
from vbus.vhost import guest as guestlib

__all__ = ["SUBJECT", "VhostUserSubject"]

SUBNET = "10.198.0"
MAC = "02:00:00:00:98:02"
TOPOLOGY = f"""
[devices.v0]
class = "venet"
mac = "{MAC}"
[devices.v1]
class = "venet"
[buses.bench]
members = ["uid:self"]
devices = ["v0", "v1"]
"""
RECEIVER = """
import socket, sys, time
total = int(sys.argv[1])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 5001))  # the tap variant's address comes after the receiver
s.listen(1)
print("listening", flush=True)
c, _ = s.accept()
n = 0
first = None
while n < total:
    data = c.recv(1 << 18)
    if not data:
        break
    if first is None:
        first = time.monotonic()
    n += len(data)
print(n, time.monotonic() - (first or time.monotonic()), flush=True)
"""


class VhostUserSubject(Subject):
    name = "vhost_user"
    title = "vhost-user: guest -> namespace TCP through vbus vs QEMU's tap"
    order = 60
    variants = (
        Variant("vbus", "vbus vhost-user (EVENT_IDX)", role="vbus"),
        Variant("vbus-no-event-idx", "vbus vhost-user, event_idx=off", role="reference"),
        Variant("qemu-tap", "QEMU -netdev tap,vhost=off", role="peer"),
    )
    figures = (
        Figure("gbit_per_s", "Gb/s", "Gb/s"),
        Figure("kicks_per_buf", "kicks/buf", "/msg", higher_is_better=False),
        Figure("irqs_per_buf", "irqs/buf", "/msg", higher_is_better=False),
    )
    primary = "gbit_per_s"
    baseline = "vbus"
    on_request = True  # three QEMU boots per round: ``vbus bench vhost_user``

    def params(self, quick: bool) -> Params:
        return {"megabytes": 16 if quick else 64}

    def run(self, variant: str, params: Params) -> Figures:
        if os.geteuid() != 0:
            raise Unavailable("needs root (network namespaces, taps)")
        for tool in ("qemu-system-x86_64", "ip", "apt-get", "dpkg-deb"):
            if shutil.which(tool) is None:
                raise Unavailable(f"needs {tool}")
        guest = guestlib.build(guestlib.default_cache())
        ns = f"vbb{os.getpid()}"
        subprocess.run(["ip", "netns", "add", ns], check=True)
        try:
            subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
            if variant == "qemu-tap":
                return _run_tap(guest, ns, params)
            if variant in ("vbus", "vbus-no-event-idx"):
                return _run_vbus(guest, ns, params, event_idx=variant == "vbus")
            raise KeyError(f"vhost_user: no variant {variant!r}")
        finally:
            subprocess.run(["ip", "netns", "del", ns], check=False)

    def targets(self, medians: dict[str, Figures]) -> list[Target]:
        vbus = medians.get("vbus", {}).get("gbit_per_s")
        tap = medians.get("qemu-tap", {}).get("gbit_per_s")
        ratio = vbus / tap if vbus is not None and tap else None
        return [Target("vhost_user: vbus >= 1.0x QEMU's own tap", ratio, 1.0, ">=")]


def _script(megabytes: int) -> str:
    return (
        f"ip link set eth0 up && ip addr add {SUBNET}.2/24 dev eth0 || exit 3\n"
        f"n=0; until ping -c 1 -W 1 {SUBNET}.1 > /dev/null; do n=$((n+1)); [ $n -gt 60 ] && exit 4; done\n"
        f"dd if=/dev/zero bs=1M count={megabytes} 2>/dev/null | nc {SUBNET}.1 5001\n"
        "echo VBUS-SENT\n"
    )


def _receive(ns: str, qemu: list[str], megabytes: int, setup: object = None) -> float:
    """Start the receiver and QEMU; Gb/s as the receiver saw them."""
    total = megabytes << 20
    receiver = subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-c", RECEIVER, str(total)],
        stdout=subprocess.PIPE,
        text=True,
    )
    proc = None
    try:
        assert receiver.stdout is not None
        if receiver.stdout.readline().strip() != "listening":
            raise RuntimeError("the receiver did not start")
        proc = subprocess.Popen(qemu, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if callable(setup):
            setup()
        out, _ = receiver.communicate(timeout=600)
        count, seconds = out.split()
        if int(count) != total:
            raise RuntimeError(f"the receiver got {count} of {total} bytes")
        proc.wait(timeout=120)
        return total * 8 / float(seconds) / 1e9
    finally:
        receiver.kill()
        receiver.wait()
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()


def _run_vbus(guest: guestlib.Guest, ns: str, params: Params, *, event_idx: bool) -> Figures:
    with BenchDaemon(topology=TOPOLOGY, log_level="info") as daemon:
        tap = subprocess.Popen(
            [sys.executable, "-m", "vbus.cli", "--socket", str(daemon.socket), "tap",
             "--device", "v1", "--ifname", "vbb1", "--netns", ns],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert tap.stdout is not None
            if " up, features " not in tap.stdout.readline():
                raise RuntimeError("vbus tap did not come up")
            subprocess.run(
                ["ip", "-n", ns, "addr", "add", f"{SUBNET}.1/24", "dev", "vbb1"], check=True
            )
            sock = str(socket_path(daemon.run_dir, "bench", "v0"))
            device = "" if event_idx else ",event_idx=off"
            qemu = guestlib.qemu_command(
                guest, sock, _script(params["megabytes"]), MAC, device=device
            )
            gbit = _receive(ns, qemu, params["megabytes"])
            stopped = _wait_stopped(Path(daemon.log_path))
        finally:
            tap.terminate()
            tap.wait(15)
    buffers = max(1, stopped.get("messages", 0))
    return {
        "gbit_per_s": gbit,
        "kicks_per_buf": stopped.get("kicks", 0) / buffers,
        "irqs_per_buf": stopped.get("signals_sent", 0) / buffers,
    }


def _wait_stopped(log: Path, timeout: float = 30.0) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if '"vhost_user.device_stopped"' in line:
                event: dict[str, int] = json.loads(line)
                return event
        time.sleep(0.1)
    return {}


def _run_tap(guest: guestlib.Guest, ns: str, params: Params) -> Figures:
    ifname = f"vbt{os.getpid() % 100000}"
    netdev = f"tap,id=n0,ifname={ifname},script=no,downscript=no,vhost=off"
    qemu = guestlib.qemu_command(guest, None, _script(params["megabytes"]), MAC, netdev=netdev)

    def move_tap() -> None:
        deadline = time.monotonic() + 30
        while subprocess.run(["ip", "link", "show", ifname], capture_output=True).returncode:
            if time.monotonic() > deadline:
                raise RuntimeError("QEMU did not create its tap")
            time.sleep(0.05)
        subprocess.run(["ip", "link", "set", ifname, "netns", ns], check=True)
        subprocess.run(["ip", "-n", ns, "addr", "add", f"{SUBNET}.1/24", "dev", ifname], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", ifname, "up"], check=True)

    return {"gbit_per_s": _receive(ns, qemu, params["megabytes"], move_tap)}


SUBJECT = VhostUserSubject()
