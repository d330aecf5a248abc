"""Acceptance: a stock Linux guest under QEMU, its virtio-net on vbus's vhost-user socket.

The guest (tests/guest.py: Debian's cloud kernel, busybox, an initramfs
whose /init runs a script from the kernel command line) talks through
venet v0 and the learning switch to venet v1, which ``vbus tap`` puts in a
network namespace.  Root, QEMU and Debian's apt tools are required; the
guest is built once per run and its packages are cached between runs
(``$VBUS_GUEST_CACHE``, default ``~/.cache/vbus/guest``).
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Daemon, require
from tests.test_venet_net import TapProc, netns, run, start_tap, taps  # noqa: F401 - fixtures
from vbus.connectors.vhost_user import socket_path
from vbus.vhost import guest as guestlib
from vbus.vhost import wire
from vbus.vhost.driver import NEXT
from vbus.vhost.frontend import Frontend
from vbus.vhost.wire import P, Request

SUBNET = "10.199.0"
GUEST_MAC = "02:00:00:00:77:02"
TOPOLOGY = f"""
[devices.v0]
class = "venet"
mac = "{GUEST_MAC}"
[devices.v1]
class = "venet"
[devices.v2]
class = "venet"
[devices.v3]
class = "venet"
[buses.lab]
members = ["uid:self"]
devices = ["v0", "v1", "v3"]
[buses.closed]
members = []
devices = ["v2"]
"""
TRANSFER = 20 << 20


@pytest.fixture(scope="session")
def guest() -> guestlib.Guest:
    require(os.geteuid() == 0, "QEMU tests need root (namespaces, taps)")
    require(
        shutil.which("qemu-system-x86_64") is not None, "no qemu-system-x86_64 (qemu-system-x86)"
    )
    require(
        shutil.which("apt-get") is not None and shutil.which("dpkg-deb") is not None,
        "no apt-get/dpkg-deb",
    )
    require(os.path.exists("/dev/net/tun"), "no /dev/net/tun")
    return guestlib.build(guestlib.default_cache())


class Qemu:
    """QEMU in the background; its serial console read line by line."""

    def __init__(self, cmd: list[str]) -> None:
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)
            self.lines.put(line)
        self.lines.put("")

    def wait_for(self, marker: str, timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is not None and marker in line:
                return line
            if line == "" or time.monotonic() > deadline:
                raise AssertionError(f"no {marker!r} from the guest:\n{''.join(self.output)}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def qemus() -> Iterator[list[Qemu]]:
    started: list[Qemu] = []
    yield started
    for q in started:
        q.stop()


def daemon_for(vbusd: Callable[..., Daemon], tmp_path: Path) -> Daemon:
    path = tmp_path / "topology.toml"
    path.write_text(textwrap.dedent(TOPOLOGY))
    return vbusd("--config", str(path), "--no-admin")


def namespace_behind_v1(daemon: Daemon, new_netns: Callable[[], str], procs: list[TapProc]) -> str:
    """A network namespace with ``vbus tap`` on v1 (the guest's switch) at SUBNET.1."""
    ns = new_netns()
    start_tap(procs, daemon, "v1", "vq1", ns)
    run("ip", "-n", ns, "addr", "add", f"{SUBNET}.1/24", "dev", "vq1")
    return ns


def wait_for(cond: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


GUEST_SCRIPT = f"""
ip link set eth0 up && ip addr add {SUBNET}.2/24 dev eth0 || exit 3
ping -c 3 -W 5 {SUBNET}.1 > /dev/null
ping -c 50 -i 0.1 -W 2 {SUBNET}.1 | tail -2
echo VBUS-PINGED
sleep 12
dd if=/dev/urandom of=/tmp/data bs=1M count={TRANSFER >> 20} 2>/dev/null
echo "VBUS-HASH $(sha256sum /tmp/data)"
nc {SUBNET}.1 5001 < /tmp/data
echo VBUS-SENT
"""

RECEIVER = f"""
import hashlib, socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("{SUBNET}.1", 5001))
s.listen(1)
print("listening", flush=True)
c, _ = s.accept()
h = hashlib.sha256()
n = 0
while n < {TRANSFER}:
    data = c.recv(1 << 16)
    if not data:
        break
    h.update(data)
    n += len(data)
c.close()
print(n, h.hexdigest(), flush=True)
"""


def test_a_linux_guest_pings_and_transfers_through_vbus(
    guest: guestlib.Guest,
    tmp_path: Path,
    vbusd: Callable[..., Daemon],
    netns: Callable[[], str],  # noqa: F811
    taps: list[TapProc],  # noqa: F811
    qemus: list[Qemu],
) -> None:
    daemon = daemon_for(vbusd, tmp_path)
    ns = namespace_behind_v1(daemon, netns, taps)
    receiver = subprocess.Popen(
        ["ip", "netns", "exec", ns, "python3", "-c", RECEIVER], stdout=subprocess.PIPE, text=True
    )
    try:
        assert receiver.stdout is not None and receiver.stdout.readline().strip() == "listening"
        sock = str(socket_path(daemon.run_dir, "lab", "v0"))
        q = Qemu(guestlib.qemu_command(guest, sock, GUEST_SCRIPT, GUEST_MAC))
        qemus.append(q)
        summary = q.wait_for("packet loss", timeout=180)
        assert " 0% packet loss" in summary, "".join(q.output)
        q.wait_for("VBUS-PINGED")
        out = run(
            "ip",
            "netns",
            "exec",
            ns,
            "ping",
            "-c",
            "50",
            "-i",
            "0.1",
            "-W",
            "2",
            "-q",
            f"{SUBNET}.2",
            check=False,
        )
        assert " 0% packet loss" in out.stdout, out.stdout + out.stderr
        inside = q.wait_for("VBUS-HASH", timeout=120).split()[1]
        line = receiver.communicate(timeout=300)[0].strip()
        count, outside = line.split()
        assert int(count) == TRANSFER and outside == inside
        q.wait_for("VBUS-SENT", timeout=60)
        q.wait_for("VBUS-EXIT 0", timeout=60)
    finally:
        receiver.kill()
        receiver.wait()
    assert q.proc.wait(timeout=60) == 0  # the guest powered off
    assert wait_for(lambda: '"vhost_user.disconnected"' in daemon.log())
    log = daemon.log()
    assert '"vhost_user.device_started"' in log and '"vhost_user.device_stopped"' in log
    assert '"connection.faulted"' not in log, log


def test_an_unadmitted_qemu_is_refused(
    guest: guestlib.Guest, tmp_path: Path, vbusd: Callable[..., Daemon], qemus: list[Qemu]
) -> None:
    daemon = daemon_for(vbusd, tmp_path)
    sock = str(socket_path(daemon.run_dir, "closed", "v2"))
    q = Qemu(guestlib.qemu_command(guest, sock, "sleep 30", "02:00:00:00:77:03"))
    qemus.append(q)
    assert wait_for(lambda: '"vhost_user.refused"' in daemon.log())
    assert "not a member of bus 'closed'" in daemon.log()
    assert '"vhost_user.device_started"' not in daemon.log()


def test_sigkill_of_qemu_gives_everything_back(
    guest: guestlib.Guest,
    tmp_path: Path,
    vbusd: Callable[..., Daemon],
    netns: Callable[[], str],  # noqa: F811
    taps: list[TapProc],  # noqa: F811
    qemus: list[Qemu],
) -> None:
    daemon = daemon_for(vbusd, tmp_path)
    namespace_behind_v1(daemon, netns, taps)
    fds, maps = daemon.fd_count(), daemon.memfd_mappings()
    sock = str(socket_path(daemon.run_dir, "lab", "v0"))
    # killed mid-transfer: the guest floods the namespace with pings
    script = (
        f"ip link set eth0 up && ip addr add {SUBNET}.2/24 dev eth0 &&"
        f" ping -c 3 -W 5 {SUBNET}.1 > /dev/null && echo VBUS-UP &&"
        f" ping -q -i 0.002 -s 1400 -c 1000000 {SUBNET}.1"
    )
    for _ in range(2):  # and QEMU can come back
        q = Qemu(guestlib.qemu_command(guest, sock, script, GUEST_MAC))
        qemus.append(q)
        q.wait_for("VBUS-UP", timeout=180)
        assert wait_for(lambda: daemon.memfd_mappings() > maps)
        assert wait_for(lambda: daemon.log().count('"vhost_user.device_started"') >= 1)
        time.sleep(1.0)  # traffic in flight
        q.proc.send_signal(signal.SIGKILL)
        q.proc.wait()
        assert wait_for(lambda: daemon.fd_count() == fds and daemon.memfd_mappings() == maps), (
            daemon.fd_count(), fds, daemon.memfd_mappings(), maps,
        )  # fmt: skip
    assert '"connection.faulted"' not in daemon.log()


PING_SCRIPT = f"""
ip link set eth0 up && ip addr add {SUBNET}.2/24 dev eth0 || exit 3
ping -c 3 -W 5 {SUBNET}.1 > /dev/null
echo VBUS-PINGING
ping -c 100 -i 0.1 -W 2 {SUBNET}.1 | tail -2
echo VBUS-PINGED
"""


def _hostile_round(path: str) -> None:
    """One round of what a hostile VMM on the same bus does: garbage, a
    descriptor loop on a running device, a kick storm.  Each must cost that
    connection only."""
    with Frontend(path) as bad:
        bad.send_raw(b"\xff" * 64)
        assert bad.closed_by_peer(timeout=10)
    with Frontend(path) as bad:
        bad.send_raw(wire.HEADER.pack(Request.SET_FEATURES, 1, 100000))
        assert bad.closed_by_peer(timeout=10)
    with Frontend(path) as bad:
        bad.start(protocol=P.MQ | P.REPLY_ACK | P.STATUS)
        drv = bad.drivers[1]
        data = bad.ram.alloc(64)
        head, second = drv.free.pop(0), drv.free.pop(0)
        drv.write_desc(head, data, 64, NEXT, second)
        drv.write_desc(second, data, 64, NEXT, head)
        drv.make_available(head)
        bad.kick(1)
        assert wait_for(lambda: bad.error_signalled(1), timeout=10)
    with Frontend(path) as bad:
        bad.start()
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            for _ in range(100):
                os.eventfd_write(bad.kicks[0], 1)
                os.eventfd_write(bad.kicks[1], 1)


def test_hostile_vmms_on_the_bus_cost_a_pinging_guest_nothing(
    guest: guestlib.Guest,
    tmp_path: Path,
    vbusd: Callable[..., Daemon],
    netns: Callable[[], str],  # noqa: F811
    taps: list[TapProc],  # noqa: F811
    qemus: list[Qemu],
) -> None:
    daemon = daemon_for(vbusd, tmp_path)
    namespace_behind_v1(daemon, netns, taps)
    sock = str(socket_path(daemon.run_dir, "lab", "v0"))
    q = Qemu(guestlib.qemu_command(guest, sock, PING_SCRIPT, GUEST_MAC))
    qemus.append(q)
    q.wait_for("VBUS-PINGING", timeout=180)
    hostile = str(socket_path(daemon.run_dir, "lab", "v3"))
    rounds = 0
    done = threading.Event()
    failures: list[BaseException] = []

    def attack() -> None:
        nonlocal rounds
        try:
            while not done.is_set():
                _hostile_round(hostile)
                rounds += 1
        except BaseException as exc:  # reported by the test thread
            failures.append(exc)

    attacker = threading.Thread(target=attack, daemon=True)
    attacker.start()
    try:
        summary = q.wait_for("packet loss", timeout=120)
    finally:
        done.set()
        attacker.join(timeout=60)
    assert not failures, failures
    assert rounds >= 1
    assert " 0% packet loss" in summary, "".join(q.output)
    q.wait_for("VBUS-EXIT 0", timeout=60)
    log = daemon.log()
    assert "descriptor loop" in log and "protocol violation" in log
    assert log.count('"vhost_user.device_started"') >= 1 + rounds  # the guest's and each bad one's


RECONNECT_SCRIPT = f"""
ip link set eth0 up && ip addr add {SUBNET}.2/24 dev eth0 || exit 3
ping -c 3 -W 5 {SUBNET}.1 > /dev/null || exit 4
echo VBUS-UP
sleep 6
i=0
until ping -c 1 -W 1 {SUBNET}.1 > /dev/null; do i=$((i + 1)); [ $i -lt 90 ] || exit 5; done
echo VBUS-BACK
ping -c 20 -i 0.1 -W 2 {SUBNET}.1 | tail -2
"""


def test_qemu_reconnects_to_a_relinked_device(
    guest: guestlib.Guest,
    tmp_path: Path,
    vbusd: Callable[..., Daemon],
    netns: Callable[[], str],  # noqa: F811
    taps: list[TapProc],  # noqa: F811
    qemus: list[Qemu],
) -> None:
    path = tmp_path / "topology.toml"
    path.write_text(textwrap.dedent(TOPOLOGY))
    daemon = vbusd("--config", str(path))
    require(daemon.admin_mounted, "the admin tree (FUSE) is not mounted")
    namespace_behind_v1(daemon, netns, taps)
    sock = str(socket_path(daemon.run_dir, "lab", "v0"))
    q = Qemu(guestlib.qemu_command(guest, sock, RECONNECT_SCRIPT, GUEST_MAC, reconnect=1))
    qemus.append(q)
    q.wait_for("VBUS-UP", timeout=180)
    link = daemon.admin / "buses" / "lab" / "v0"
    os.unlink(link)  # the VMM is disconnected, its socket goes
    assert wait_for(lambda: '"vhost_user.disconnected"' in daemon.log())
    assert not os.path.exists(sock)
    os.symlink("../../devices/v0", link)  # and comes back: QEMU connects again
    assert wait_for(lambda: daemon.log().count('"vhost_user.device_started"') >= 2, timeout=60)
    q.wait_for("VBUS-BACK", timeout=120)
    summary = q.wait_for("packet loss", timeout=60)
    assert " 0% packet loss" in summary, "".join(q.output)
    q.wait_for("VBUS-EXIT 0", timeout=60)
