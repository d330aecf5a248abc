"""venet carrying real Linux traffic: network namespaces, `vbus tap`, the switch, the tap backend.

Root only (network namespaces, taps).  Every namespace is made for its test
with a unique name and deleted afterwards; every `vbus tap` is stopped with
SIGTERM and must exit 0 and take its interface with it.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Daemon, require
from tests.netframes import MAC_A, frame
from vbus.client import Bus, connect
from vbus.net import tap as taplib
from vbus.net.calls import CALL_LINK_UP, CALL_MAC, CALL_NEGOTIATE, CALL_STATS, NEGOTIATED, U64
from vbus.net.vnet import F_VERSION_1

pytestmark = pytest.mark.integration

ROOT = os.geteuid() == 0
SUBNET = "10.77.0"
_names = itertools.count()


def need_net() -> None:
    require(ROOT, "network namespaces and taps need root")
    require(os.path.exists("/dev/net/tun"), "no /dev/net/tun")
    require(shutil.which("ip") is not None, "no ip (iproute2)")
    require(shutil.which("ping") is not None, "no ping (iputils-ping)")


def run(*cmd: str, check: bool = True, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=timeout)


def config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "topology.toml"
    path.write_text(textwrap.dedent(text))
    return str(path)


@pytest.fixture
def netns() -> Iterator[Callable[[], str]]:
    """Factory of network namespaces (lo up), all deleted at teardown."""
    made: list[str] = []

    def make() -> str:
        name = f"vbt{os.getpid()}x{next(_names)}"
        run("ip", "netns", "add", name)
        made.append(name)
        run("ip", "-n", name, "link", "set", "lo", "up")
        return name

    yield make
    for name in made:
        run("ip", "netns", "del", name, check=False)


class TapProc:
    """One `vbus tap` process."""

    def __init__(self, daemon: Daemon, args: list[str], preexec: list[str] | None = None) -> None:
        cmd = [sys.executable, "-m", "vbus.cli", "--socket", str(daemon.socket), "tap", *args]
        self.args = args
        self.proc = subprocess.Popen(
            [*(preexec or []), *cmd],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def ready(self, timeout: float = 20.0) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise AssertionError(f"vbus tap {self.args} did not come up")
        line = self.proc.stdout.readline()
        if " up, features " not in line:
            raise AssertionError(f"vbus tap {self.args}: {line!r} {self.proc.stderr.read()!r}")  # type: ignore[union-attr]
        return line

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"vbus tap {self.args} ignored SIGTERM") from None
        return self.proc.returncode


@pytest.fixture
def taps(netns: Callable[[], str], vbusd: Callable[..., Daemon]) -> Iterator[list[TapProc]]:
    """`vbus tap` processes a test starts; each must stop cleanly (exit 0, interface gone)."""
    started: list[TapProc] = []
    yield started
    problems = []
    for tap in started:
        code = tap.stop()
        if code != 0:
            problems.append(f"{tap.args} exited {code}: {tap.proc.stderr.read()}")  # type: ignore[union-attr]
    assert not problems, problems


def start_tap(
    taps: list[TapProc], daemon: Daemon, device: str, ifname: str, ns: str, *extra: str
) -> TapProc:
    tap = TapProc(daemon, ["--device", device, "--ifname", ifname, "--netns", ns, *extra])
    taps.append(tap)
    tap.ready()
    return tap


def address(ns: str, ifname: str, host: int) -> str:
    run("ip", "-n", ns, "addr", "add", f"{SUBNET}.{host}/24", "dev", ifname)
    return f"{SUBNET}.{host}"


def ping(ns: str, dst: str, count: int = 200, interval: float = 0.01) -> str:
    out = run(
        "ip", "netns", "exec", ns, "ping", "-c", str(count), "-i", str(interval), "-W", "2", "-q",
        dst, check=False, timeout=120,
    )  # fmt: skip
    return out.stdout + out.stderr


def warm(ns: str, dst: str) -> None:
    """ARP and the first packets out of the way; fails if nothing gets through."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if " 0% packet loss" in ping(ns, dst, count=3, interval=0.2):
            return
    raise AssertionError(f"no ping from {ns} to {dst}")


SERVER = """
import hashlib, socket, sys
srv = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("listening", flush=True)
conn, _ = srv.accept()
digest, total = hashlib.sha256(), 0
while chunk := conn.recv(1 << 20):
    digest.update(chunk)
    total += len(chunk)
print(total, digest.hexdigest(), flush=True)
"""

CLIENT = """
import hashlib, random, socket, sys, time
size = int(sys.argv[3])
data = random.Random(7).randbytes(size)
for _ in range(100):
    try:
        conn = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
        break
    except OSError:
        time.sleep(0.1)
start = time.monotonic()
conn.sendall(data)
conn.shutdown(socket.SHUT_WR)
conn.recv(1)
print(size, hashlib.sha256(data).hexdigest(), round(time.monotonic() - start, 3), flush=True)
"""


def transfer(src_ns: str, dst_ns: str, dst: str, size: int = 50 << 20) -> tuple[str, str]:
    """Send ``size`` bytes over TCP from src_ns to dst:5400 in dst_ns; the
    sender's and the receiver's (length, sha256) lines."""
    server = subprocess.Popen(
        ["ip", "netns", "exec", dst_ns, sys.executable, "-c", SERVER, dst, "5400"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "listening"
        sent = run(
            "ip", "netns", "exec", src_ns, sys.executable, "-c", CLIENT, dst, "5400", str(size),
            timeout=120,
        ).stdout.split()  # fmt: skip
        got = server.stdout.readline().split()
        server.wait(30)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert got == sent[:2], (got, sent)
    assert int(got[0]) == size
    return got[1], sent[2]


async def stats_of(bus: Bus, name: str) -> dict[str, int]:
    dev = await bus.open(name)
    try:
        text = (await dev.call(CALL_STATS)).decode()
    finally:
        await dev.close()
    return {key: int(value) for key, value in (line.split() for line in text.splitlines())}


def stats(daemon: Daemon, name: str) -> dict[str, int]:
    async def get() -> dict[str, int]:
        async with connect(daemon.socket) as bus:
            return await stats_of(bus, name)

    return asyncio.run(get())


SWITCHED = """
[devices.v0]
class = "venet"
[devices.v1]
class = "venet"
[devices.v2]
class = "venet"
[devices.v3]
class = "venet"
[buses.default]
members = ["uid:self"]
devices = ["v0", "v1", "v2", "v3"]
"""


def two_namespaces(
    tmp_path: Path,
    vbusd: Callable[..., Daemon],
    netns: Callable[[], str],
    taps: list[TapProc],
    a_args: tuple[str, ...] = (),
    b_args: tuple[str, ...] = (),
) -> tuple[Daemon, str, str, str]:
    daemon = vbusd("--config", config(tmp_path, SWITCHED), "--no-admin")
    ns_a, ns_b = netns(), netns()
    start_tap(taps, daemon, "v0", "vt0", ns_a, *a_args)
    start_tap(taps, daemon, "v1", "vt1", ns_b, *b_args)
    address(ns_a, "vt0", 1)
    dst = address(ns_b, "vt1", 2)
    warm(ns_a, dst)
    return daemon, ns_a, ns_b, dst


# --- 1. two namespaces through the switch -------------------------------------------------
def test_two_namespaces_through_the_switch(
    tmp_path: Path, vbusd: Callable[..., Daemon], netns: Callable[[], str], taps: list[TapProc]
) -> None:
    need_net()
    daemon, ns_a, ns_b, dst = two_namespaces(tmp_path, vbusd, netns, taps)
    out = ping(ns_a, dst)
    assert "200 received, 0% packet loss" in out, out
    transfer(ns_a, ns_b, dst)
    transfer(ns_b, ns_a, f"{SUBNET}.1")
    s0, s1 = stats(daemon, "v0"), stats(daemon, "v1")
    assert s0["tx_bytes"] > 50 << 20 and s1["rx_bytes"] > 50 << 20
    assert s0["switch_ports"] == 2
    for s in (s0, s1):
        assert s["tx_drop_bad_header"] == s["tx_drop_runt"] == s["tx_drop_oversize"] == 0
    # the taps went with their processes (checked again by the fixture's exit codes)
    for tap in list(taps):
        assert tap.stop() == 0
    assert run("ip", "-n", ns_a, "link", "show", "vt0", check=False).returncode != 0
    assert run("ip", "-n", ns_b, "link", "show", "vt1", check=False).returncode != 0
    assert stats(daemon, "v0")["link_up"] == 0


# --- 2. the tap backend, its tap moved to another namespace -------------------------------
def test_the_tap_backend_moved_into_another_namespace(
    tmp_path: Path, vbusd: Callable[..., Daemon], netns: Callable[[], str], taps: list[TapProc]
) -> None:
    need_net()
    ifname = f"vbd{os.getpid() % 100000}"
    daemon = vbusd(
        "--config",
        config(
            tmp_path,
            f"""
            [devices.v0]
            class = "venet"
            backend = "tap:{ifname}"
            [buses.default]
            members = ["uid:self"]
            devices = ["v0"]
            """,
        ),
        "--no-admin",
    )
    ns_a, ns_b = netns(), netns()
    start_tap(taps, daemon, "v0", "vt0", ns_a)
    # The daemon's tap exists in the daemon's namespace: the administrator moves it.
    run("ip", "link", "set", ifname, "netns", ns_b)
    run("ip", "-n", ns_b, "link", "set", ifname, "up")
    address(ns_a, "vt0", 1)
    dst = address(ns_b, ifname, 2)
    warm(ns_a, dst)
    out = ping(ns_a, dst)
    assert "200 received, 0% packet loss" in out, out
    transfer(ns_a, ns_b, dst)
    transfer(ns_b, ns_a, f"{SUBNET}.1")
    s = stats(daemon, "v0")
    assert s["tx_bytes"] > 50 << 20 and s["rx_bytes"] > 50 << 20
    assert s["tx_drop_ring_full"] == 0


# --- 3. GSO: super-frames cross with it, none without ----------------------------------------
def test_super_frames_cross_with_gso(
    tmp_path: Path, vbusd: Callable[..., Daemon], netns: Callable[[], str], taps: list[TapProc]
) -> None:
    need_net()
    daemon, ns_a, ns_b, dst = two_namespaces(tmp_path, vbusd, netns, taps)
    transfer(ns_a, ns_b, dst, 20 << 20)
    s0, s1 = stats(daemon, "v0"), stats(daemon, "v1")
    assert s0["tx_gso_frames"] > 0 and s1["rx_gso_frames"] > 0
    assert s0["tx_largest"] > 16 << 10  # far over the MTU: super-frames, up to 64 KiB
    assert s0["tx_largest"] <= 14 + 65536
    assert s1["rx_segmented"] == 0


def test_no_gso_means_no_super_frames_and_traffic_flows(
    tmp_path: Path, vbusd: Callable[..., Daemon], netns: Callable[[], str], taps: list[TapProc]
) -> None:
    need_net()
    daemon, ns_a, ns_b, dst = two_namespaces(
        tmp_path, vbusd, netns, taps, ("--no-gso",), ("--no-gso",)
    )
    transfer(ns_a, ns_b, dst, 20 << 20)
    for name in ("v0", "v1"):
        s = stats(daemon, name)
        assert s["tx_gso_frames"] == s["rx_gso_frames"] == 0
        assert s["tx_largest"] <= 1514 and s["rx_largest"] <= 1514
    assert stats(daemon, "v1")["rx_bytes"] > 20 << 20


def test_a_port_without_gso_gets_super_frames_cut(
    tmp_path: Path, vbusd: Callable[..., Daemon], netns: Callable[[], str], taps: list[TapProc]
) -> None:
    need_net()
    daemon, ns_a, ns_b, dst = two_namespaces(tmp_path, vbusd, netns, taps, (), ("--no-gso",))
    transfer(ns_a, ns_b, dst, 20 << 20)  # checksums and order verified by TCP and the hash
    s0, s1 = stats(daemon, "v0"), stats(daemon, "v1")
    assert s0["tx_gso_frames"] > 0
    assert s1["rx_gso_frames"] == 0 and s1["rx_segmented"] > 0 and s1["rx_largest"] <= 1514


# --- 4. a north that stops reading ------------------------------------------------------
@pytest.mark.asyncio
async def test_a_stalled_north_hurts_only_itself(
    tmp_path: Path, vbusd: Callable[..., Daemon], netns: Callable[[], str], taps: list[TapProc]
) -> None:
    need_net()
    daemon, ns_a, _ns_b, dst = await asyncio.to_thread(two_namespaces, tmp_path, vbusd, netns, taps)
    async with connect(daemon.socket) as bus:
        # v2: posts rx buffers once, never reads them.  v3: floods v2's MAC.
        stalled = await bus.open("v2")
        await stalled.call(CALL_NEGOTIATE, U64.pack(F_VERSION_1))
        stalled_tx = await stalled.shm(0, "tx", count=64, buf_size=2048)
        await stalled.shm(1, "rx", count=64, buf_size=2048)
        await stalled.call(CALL_LINK_UP)
        mac_stalled = await stalled.call(CALL_MAC)
        await stalled_tx.send(frame(b"\xff" * 6, mac_stalled))  # the switch learns it
        flooder = await bus.open("v3")
        _, size = NEGOTIATED.unpack(await flooder.call(CALL_NEGOTIATE, U64.pack(F_VERSION_1)))
        flood_tx = await flooder.shm(0, "tx", count=256, buf_size=size)
        await flooder.shm(1, "rx", count=64, buf_size=size)
        await flooder.call(CALL_LINK_UP)
        burst = [frame(mac_stalled, MAC_A, os.urandom(1000)) for _ in range(256)]
        stop = asyncio.Event()

        async def flood() -> int:
            sent = 0
            while not stop.is_set():
                await flood_tx.send_many(burst)
                sent += len(burst)
                await asyncio.sleep(0)
            return sent

        flooding = asyncio.ensure_future(flood())
        await asyncio.sleep(1.0)
        before = (await stats_of(bus, "v2"))["rx_drop_ring_full"]
        pinger = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", ns_a, "ping", "-c", "200", "-i", "0.01", "-W", "2", "-q", dst,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out = (await pinger.communicate())[0].decode()
        after = (await stats_of(bus, "v2"))["rx_drop_ring_full"]
        stop.set()
        sent = await flooding
        status = await bus.status()
        s2 = await stats_of(bus, "v2")
        s0, s1 = await stats_of(bus, "v0"), await stats_of(bus, "v1")
    assert "200 received, 0% packet loss" in out, out
    assert sent > 10_000
    assert after > before > 0  # its drops climb, and they are its own
    assert s2["rx_frames"] == 64 and s2["rx_stops"] == 1
    assert s0["rx_drop_ring_full"] == s1["rx_drop_ring_full"] == 0
    # The loop stayed responsive throughout (generous: the machine is shared).
    assert float(status["loop_lag_max_ms"]) < 100, status


# --- 5. garbage from a north -------------------------------------------------------------
GARBAGE_TOPOLOGY = """
[devices.v0]
class = "venet"
[devices.v1]
class = "venet"
[buses.default]
members = ["uid:self"]
devices = ["v0", "v1"]
"""


@pytest.mark.asyncio
async def test_garbage_frames_are_dropped_and_counted(
    tmp_path: Path, vbusd: Callable[..., Daemon]
) -> None:
    from tests.netframes import BROADCAST, gso_frame
    from vbus.net.vnet import F_CSUM, header

    daemon = vbusd("--config", config(tmp_path, GARBAGE_TOPOLOGY), "--no-admin")
    baseline_fds = daemon.fd_count()
    body = frame(BROADCAST, MAC_A)[12:]
    garbage = [
        b"",
        b"\x01" * 25,  # runts
        frame(BROADCAST, MAC_A, b"x" * 1501),
        frame(BROADCAST, MAC_A, b"x" * 9000),  # longer than mtu + headers without GSO
        header(hdr_len=len(body) + 1) + body,
        header(1, csum_start=len(body) - 1, csum_offset=4) + body,
        header(1, 1, 54, 1448, 34, 16) + body,  # GSO that lies about everything
        gso_frame(b"g" * 5000, 1448),  # a real super-frame, GSO not negotiated
        header(0xFF, 0xFF, 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF) + body,
    ] * 100
    async with connect(daemon.socket) as bus:
        sender = await bus.open("v0")
        await sender.call(CALL_NEGOTIATE, U64.pack(F_VERSION_1 | F_CSUM))
        tx = await sender.shm(0, "tx", count=256, buf_size=12 + 65550)
        await sender.call(CALL_LINK_UP)
        receiver = await bus.open("v1")
        await receiver.call(CALL_NEGOTIATE, U64.pack(F_VERSION_1))
        rx = await receiver.shm(1, "rx", count=64, buf_size=2048)
        await receiver.call(CALL_LINK_UP)
        await tx.send_many(garbage)
        good = frame(BROADCAST, MAC_A, b"still fine")
        await tx.send(good)
        async with asyncio.timeout(10):
            got = await rx.recv_many(64)
        assert [g[12:] for g in got] == [good[12:]]
        s = await stats_of(bus, "v0")
        await sender.close()
        await receiver.close()
    assert s["tx_drop_runt"] == 200
    assert s["tx_drop_oversize"] == 200
    assert s["tx_drop_bad_header"] == 500
    assert s["tx_frames"] == 1
    deadline = time.monotonic() + 5
    while daemon.fd_count() != baseline_fds and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert daemon.fd_count() == baseline_fds  # nothing leaks
    log = daemon.log()
    assert '"device.error"' not in log and '"level": "error"' not in log


# --- 6. another bus never reaches the switch ----------------------------------------------
def test_a_device_of_another_bus_never_reaches_the_switch(
    tmp_path: Path, vbusd: Callable[..., Daemon], netns: Callable[[], str], taps: list[TapProc]
) -> None:
    need_net()
    ns_a, ns_b, ns_c = netns(), netns(), netns()
    # The third `vbus tap` waits for a go, so that its pid can be a member of bus "other".
    other = TapProc.__new__(TapProc)
    other.args = ["--device", "v2", "--ifname", "vt2", "--netns", ns_c]
    other.proc = subprocess.Popen(
        ["sh", "-c", 'read go; exec "$0" "$@"', sys.executable, "-m", "vbus.cli", "--socket",
         str(tmp_path / "run0" / "vbus.sock"), "tap", *other.args],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    taps.append(other)
    # A process of bus "other" too, to read v2's counters at the end.
    observer = subprocess.Popen(
        ["sh", "-c", 'read go; exec "$0" "$@"', sys.executable, "-c", OBSERVER,
         str(tmp_path / "run0" / "vbus.sock")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _isolated(tmp_path, vbusd, taps, other, observer, ns_a, ns_b, ns_c)
    finally:
        if observer.poll() is None:
            observer.kill()
            observer.wait()


def _isolated(
    tmp_path: Path,
    vbusd: Callable[..., Daemon],
    taps: list[TapProc],
    other: TapProc,
    observer: subprocess.Popen[str],
    ns_a: str,
    ns_b: str,
    ns_c: str,
) -> None:
    daemon = vbusd(
        "--config",
        config(
            tmp_path,
            f"""
            [devices.v0]
            class = "venet"
            [devices.v1]
            class = "venet"
            [devices.v2]
            class = "venet"
            [buses.default]
            members = ["uid:self"]
            devices = ["v0", "v1"]
            [buses.other]
            members = ["pid:{other.proc.pid}", "pid:{observer.pid}"]
            devices = ["v2"]
            """,
        ),
        "--no-admin",
    )
    assert daemon.socket == tmp_path / "run0" / "vbus.sock"
    start_tap(taps, daemon, "v0", "vt0", ns_a)
    start_tap(taps, daemon, "v1", "vt1", ns_b)
    assert other.proc.stdin is not None
    other.proc.stdin.write("go\n")
    other.proc.stdin.flush()
    other.ready()
    address(ns_a, "vt0", 1)
    dst = address(ns_b, "vt1", 2)
    address(ns_c, "vt2", 3)
    mac_c = bytes.fromhex(
        run("ip", "-n", ns_c, "-br", "link", "show", "vt2").stdout.split()[2].replace(":", "")
    )
    # Everything that reaches ns_a's interface, for the length of the test.
    sniffer = taplib.in_netns(ns_a, lambda: _sniffer("vt0"))
    try:
        warm(ns_a, dst)
        out = ping(ns_c, f"{SUBNET}.1", count=20, interval=0.05)  # ARP broadcasts from C
        assert "100% packet loss" in out, out
        out = ping(ns_a, dst, count=50)
        assert " 0% packet loss" in out, out
        sources = _sources(sniffer, 1.0)
    finally:
        sniffer.close()
    assert mac_c not in sources
    assert sources  # the sniffer did see traffic (from B)
    assert stats(daemon, "v0")["switch_ports"] == 2
    out, _ = observer.communicate("go\n", timeout=30)
    s_other = {k: int(v) for k, v in (line.split() for line in out.splitlines())}
    assert s_other["tx_frames"] > 0 and s_other["tx_flooded"] > 0  # it sent, to a switch of its own
    assert s_other["switch_ports"] == 1


def _sniffer(ifname: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    sock.bind((ifname, 0))
    sock.setblocking(False)
    return sock


def _sources(sock: socket.socket, wait: float) -> set[bytes]:
    seen: set[bytes] = set()
    deadline = time.monotonic() + wait
    while True:
        left = deadline - time.monotonic()
        ready, _, _ = select.select([sock], [], [], max(left, 0))
        if not ready:
            if left <= 0:
                return seen
            continue
        while True:
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                break
            seen.add(data[6:12])


OBSERVER = """
import asyncio, sys
from vbus.client import connect
async def main():
    async with connect(sys.argv[1]) as bus:
        dev = await bus.open("v2")
        sys.stdout.write((await dev.call(7)).decode())
asyncio.run(main())
"""


# --- `vbus tap` refusals -------------------------------------------------------------------
def test_vbus_tap_says_what_is_wrong_in_one_line(vbusd: Callable[..., Daemon]) -> None:
    daemon = vbusd("--no-admin")  # the embedded default topology: echo0 only
    cases = [
        (["--device", "nope", "--ifname", "x0"], "vbus tap: no device 'nope' on bus 'default'"),
        (
            ["--device", "echo0", "--ifname", "x0"],
            "vbus tap: device 'echo0' is of class echo, not a venet",
        ),
        (
            ["--device", "echo0", "--ifname", "x0", "--netns", "vbus-no-such-ns"],
            "vbus tap: no network namespace 'vbus-no-such-ns'",
        ),
        (["--device", "echo0", "--ifname", "bad/name"], "vbus tap: bad interface name 'bad/name'"),
    ]
    for args, message in cases:
        tap = TapProc(daemon, args)
        out, err = tap.proc.communicate(timeout=30)
        assert tap.proc.returncode == 1, (args, out, err)
        assert err.splitlines() == [message], (args, err)
        assert out == ""
