"""The vhost-user connector against the real daemon, with Python front-ends (honest and hostile)."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Daemon
from tests.netframes import BROADCAST, MAC_A, frame
from vbus.connectors.vhost_user import socket_path
from vbus.vhost import wire
from vbus.vhost.driver import NEXT
from vbus.vhost.frontend import F_MRG_RXBUF, USER_BASE, Frontend
from vbus.vhost.wire import P, Region, Request

ROOT = os.geteuid() == 0
TOPOLOGY = """
[devices.v0]
class = "venet"
[devices.v1]
class = "venet"
[devices.e0]
class = "echo"
[buses.lab]
members = ["uid:self"]
devices = ["v0", "v1", "e0"]
"""
HDR = bytes(12)  # virtio_net_hdr_v1, no offload
RX, TX = 0, 1  # virtio-net's receiveq1 and transmitq1


def daemon_with(
    vbusd: Callable[..., Daemon], tmp_path: Path, text: str = TOPOLOGY, *args: str
) -> Daemon:
    path = tmp_path / "topology.toml"
    path.write_text(textwrap.dedent(text))
    return vbusd("--config", str(path), *args)


def sock(daemon: Daemon, device: str, bus: str = "lab") -> str:
    return str(socket_path(daemon.run_dir, bus, device))


def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def post_rx(front: Frontend, count: int = 40, size: int = 2048) -> None:
    for _ in range(count):
        front.drivers[RX].buffer(size)
    front.kick(RX)


def send_frame(front: Frontend, data: bytes) -> None:
    front.drivers[TX].buffer(HDR + data, writable=False)
    front.kick(TX)


def received(front: Frontend) -> list[bytes]:
    """Frames in the used rx ring: each the bytes its chains hold, num_buffers checked."""
    drv = front.drivers[RX]
    out = []
    used = drv.take_used()
    i = 0
    while i < len(used):
        head, length = used[i]
        addr = struct.unpack("<Q", front.ram.read(drv.desc + 16 * head, 8))[0]
        first = front.ram.read(addr, length)
        count = struct.unpack_from("<H", first, 10)[0] if length >= 12 else 1
        data = first
        for head2, length2 in used[i + 1 : i + count]:
            addr2 = struct.unpack("<Q", front.ram.read(drv.desc + 16 * head2, 8))[0]
            data += front.ram.read(addr2, length2)
        out.append(data)
        i += max(count, 1)
    return out


def test_sockets_follow_the_links(vbusd: Callable[..., Daemon], tmp_path: Path) -> None:
    daemon = daemon_with(vbusd, tmp_path)
    assert os.path.exists(sock(daemon, "v0")) and os.path.exists(sock(daemon, "v1"))
    assert not os.path.exists(sock(daemon, "e0"))  # echo has no virtio form
    assert oct(os.stat(sock(daemon, "v0")).st_mode & 0o777) == "0o666"
    if not daemon.admin_mounted:
        pytest.skip("the admin tree is not mounted here")
    link = daemon.admin / "buses" / "lab" / "v1"
    os.unlink(link)
    assert wait_for(lambda: not os.path.exists(sock(daemon, "v1")))
    os.symlink("../../devices/v1", link)
    assert wait_for(lambda: os.path.exists(sock(daemon, "v1")))


def test_frames_between_two_vmms_with_every_ring_feature(
    vbusd: Callable[..., Daemon], tmp_path: Path
) -> None:
    daemon = daemon_with(vbusd, tmp_path, TOPOLOGY, "--no-admin")
    with Frontend(sock(daemon, "v0")) as a, Frontend(sock(daemon, "v1")) as b:
        acked = a.start()
        assert acked & F_MRG_RXBUF and acked & (1 << 29) and acked & (1 << 28) and acked & (1 << 32)
        b.start()
        post_rx(b)
        post_rx(a)
        payload = bytes(range(256)) * 4
        for _ in range(3):
            send_frame(a, frame(BROADCAST, MAC_A, payload))
        assert wait_for(lambda: b.drivers[RX].used_idx() >= 3)
        got = received(b)
        assert [g[12:] for g in got] == [frame(BROADCAST, MAC_A, payload)] * 3
        assert all(struct.unpack_from("<H", g, 10)[0] == 1 for g in got)  # num_buffers
        assert wait_for(lambda: len(a.drivers[TX].take_used()) == 3 or a.drivers[TX].last_used == 3)
        # GET_VRING_BASE stops the device and says where each ring stands
        assert a.vring_base(TX) == 3
        assert a.u64(Request.GET_FEATURES) & F_MRG_RXBUF


def test_plain_rings_without_event_idx_or_merging(
    vbusd: Callable[..., Daemon], tmp_path: Path
) -> None:
    daemon = daemon_with(vbusd, tmp_path, TOPOLOGY, "--no-admin")
    plain = (1 << 32) | (1 << 5) | (1 << 30)
    with Frontend(sock(daemon, "v0")) as a, Frontend(sock(daemon, "v1")) as b:
        a.start(plain)
        b.start(plain)
        post_rx(b, 8, 1600)  # one frame per buffer: 12 + 1518 fits
        send_frame(a, frame(BROADCAST, MAC_A))
        assert b.wait_call(RX)
        (got,) = received(b)
        assert got[12:] == frame(BROADCAST, MAC_A)


def test_an_unadmitted_vmm_is_refused(vbusd: Callable[..., Daemon], tmp_path: Path) -> None:
    text = TOPOLOGY.replace('members = ["uid:self"]', 'members = ["uid:54321"]')
    daemon = daemon_with(vbusd, tmp_path, text, "--no-admin")
    with Frontend(sock(daemon, "v0")) as front:
        assert front.closed_by_peer()
    assert wait_for(lambda: '"vhost_user.refused"' in daemon.log())
    assert "not a member of bus" in daemon.log()


def test_a_vmm_of_another_bus_is_refused(vbusd: Callable[..., Daemon], tmp_path: Path) -> None:
    text = TOPOLOGY + "\n[buses.other]\nmembers = []\ndevices = []\n"
    text = text.replace('members = ["uid:self"]', "members = []").replace(
        "[buses.other]\nmembers = []", '[buses.other]\nmembers = ["uid:self"]'
    )
    daemon = daemon_with(vbusd, tmp_path, text, "--no-admin")
    with Frontend(sock(daemon, "v0")) as front:
        assert front.closed_by_peer()
    assert wait_for(lambda: "bus 'other'" in daemon.log())


FRONTEND_SCRIPT = """
import sys, time
from vbus.vhost.frontend import Frontend
f = Frontend(sys.argv[1])
f.start()
for _ in range(64):
    f.drivers[0].buffer(2048)
f.kick(0)
print("ready", flush=True)
time.sleep(60)
"""


def test_a_killed_vmm_leaves_nothing_behind_and_may_reconnect(
    vbusd: Callable[..., Daemon], tmp_path: Path
) -> None:
    daemon = daemon_with(vbusd, tmp_path, TOPOLOGY, "--no-admin")
    fds, maps = daemon.fd_count(), daemon.memfd_mappings()
    for _ in range(2):  # the second round is a reconnect after the kill
        proc = subprocess.Popen(
            [sys.executable, "-c", FRONTEND_SCRIPT, sock(daemon, "v0")],
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).parent.parent,
        )
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        assert wait_for(lambda: '"vhost_user.device_started"' in daemon.log())
        assert daemon.memfd_mappings() == maps + 2
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert wait_for(lambda: daemon.fd_count() == fds and daemon.memfd_mappings() == maps), (
            daemon.fd_count(),
            fds,
            daemon.memfd_mappings(),
            maps,
        )


def test_unlinking_disconnects_the_vmm(vbusd: Callable[..., Daemon], tmp_path: Path) -> None:
    daemon = daemon_with(vbusd, tmp_path)
    if not daemon.admin_mounted:
        pytest.skip("the admin tree is not mounted here")
    link = daemon.admin / "buses" / "lab" / "v0"
    with Frontend(sock(daemon, "v0")) as front:
        front.start()
        assert wait_for(lambda: '"vhost_user.device_started"' in daemon.log())
        os.unlink(link)
        assert front.closed_by_peer()
    os.symlink("../../devices/v0", link)
    assert wait_for(lambda: os.path.exists(sock(daemon, "v0")))
    with Frontend(sock(daemon, "v0")) as again:
        assert again.start()


# --- hostile front-ends: each faults its own connection only ------------------------------


def test_garbage_closes_that_connection_only(vbusd: Callable[..., Daemon], tmp_path: Path) -> None:
    daemon = daemon_with(vbusd, tmp_path, TOPOLOGY, "--no-admin")
    with Frontend(sock(daemon, "v1")) as good:
        good.start()
        with Frontend(sock(daemon, "v0")) as bad:
            bad.send_raw(b"\xff" * 64)
            assert bad.closed_by_peer()
        with Frontend(sock(daemon, "v0")) as bad:
            bad.send_raw(wire.HEADER.pack(Request.SET_FEATURES, 1, 100000))  # oversized
            assert bad.closed_by_peer()
        with Frontend(sock(daemon, "v0")) as bad:
            bad.send(Request.SET_VRING_KICK, wire.u64(0), [bad.memfd] * 8)  # too many fds
            assert bad.closed_by_peer()
        assert good.u64(Request.GET_FEATURES)  # still served
    assert "protocol violation" in daemon.log()


def test_bad_tables_and_rings_are_refused_and_the_connection_stays(
    vbusd: Callable[..., Daemon], tmp_path: Path
) -> None:
    daemon = daemon_with(vbusd, tmp_path, TOPOLOGY, "--no-admin")
    with Frontend(sock(daemon, "v0")) as f:
        f.u64(Request.GET_FEATURES)
        f.send(Request.SET_PROTOCOL_FEATURES, wire.u64(P.MQ | P.REPLY_ACK | P.STATUS))
        overlapping = [
            Region(0, 1 << 20, USER_BASE, 0),
            Region(4096, 1 << 20, USER_BASE + (2 << 20), 0),
        ]
        assert not f.acked(Request.SET_MEM_TABLE, wire.mem_table(overlapping), [f.memfd, f.memfd])
        oversized = [Region(0, 64 << 20, USER_BASE, 0)]  # larger than the memfd
        assert not f.acked(Request.SET_MEM_TABLE, wire.mem_table(oversized), [f.memfd])
        assert not f.acked(
            Request.SET_MEM_TABLE, wire.mem_table(f.regions), [f.memfd, 0]
        )  # stdin: no memfd
        assert f.acked(Request.SET_MEM_TABLE, wire.mem_table(f.regions), [f.memfd, f.memfd])
        assert f.acked(Request.SET_VRING_NUM, wire.vring_state(0, 256))
        outside = wire.vring_addr(0, USER_BASE + (64 << 20), USER_BASE, USER_BASE + 8192)
        assert not f.acked(Request.SET_VRING_ADDR, outside)
        assert not f.acked(Request.SET_VRING_NUM, wire.vring_state(0, 1000))
        assert f.u64(Request.GET_FEATURES)  # still connected
    assert "overlap in guest addresses" in daemon.log()


@pytest.mark.parametrize("status", [True, False])
def test_a_descriptor_loop_faults_the_device(
    vbusd: Callable[..., Daemon], tmp_path: Path, status: bool
) -> None:
    daemon = daemon_with(vbusd, tmp_path, TOPOLOGY, "--no-admin")
    protocol = P.MQ | P.REPLY_ACK | (P.STATUS if status else 0)
    with Frontend(sock(daemon, "v0")) as f, Frontend(sock(daemon, "v1")) as other:
        other.start()
        f.start(protocol=protocol)
        assert wait_for(lambda: daemon.log().count('"vhost_user.device_started"') == 2)
        drv = f.drivers[TX]
        data = f.ram.alloc(64)
        head, second = drv.free.pop(0), drv.free.pop(0)
        drv.write_desc(head, data, 64, NEXT, second)
        drv.write_desc(second, data, 64, NEXT, head)
        drv.make_available(head)
        f.kick(TX)
        assert wait_for(lambda: "descriptor loop" in daemon.log())
        assert wait_for(lambda: f.error_signalled(TX))
        if status:
            assert f.u64(Request.GET_STATUS) & 0x40  # DEVICE_NEEDS_RESET
        else:
            assert f.closed_by_peer()
        assert other.u64(Request.GET_FEATURES)  # the other VMM is untouched


def test_a_kick_storm_harms_nobody_else(vbusd: Callable[..., Daemon], tmp_path: Path) -> None:
    daemon = daemon_with(vbusd, tmp_path, TOPOLOGY, "--no-admin")
    with Frontend(sock(daemon, "v0")) as a, Frontend(sock(daemon, "v1")) as b:
        a.start()
        b.start()
        post_rx(b)
        deadline = time.monotonic() + 1.0
        kicks = 0
        while time.monotonic() < deadline:
            for _ in range(100):
                os.eventfd_write(a.kicks[TX], 1)
                os.eventfd_write(a.kicks[RX], 1)
            kicks += 200
        send_frame(a, frame(BROADCAST, MAC_A))
        assert wait_for(lambda: b.drivers[RX].used_idx() >= 1)
        assert b.u64(Request.GET_FEATURES) and a.u64(Request.GET_FEATURES)
        assert kicks > 1000


def test_disabling_a_ring_stops_the_device_and_enabling_resumes_it(
    vbusd: Callable[..., Daemon], tmp_path: Path
) -> None:
    daemon = daemon_with(vbusd, tmp_path, TOPOLOGY, "--no-admin")
    with Frontend(sock(daemon, "v0")) as a, Frontend(sock(daemon, "v1")) as b:
        a.start()
        b.start()
        post_rx(b)
        b.send(Request.SET_VRING_ENABLE, wire.vring_state(RX, 0))
        assert wait_for(lambda: daemon.log().count('"vhost_user.device_stopped"') == 1)
        send_frame(a, frame(BROADCAST, MAC_A))  # b's link is down: dropped
        assert a.u64(Request.GET_FEATURES)
        b.send(Request.SET_VRING_ENABLE, wire.vring_state(RX, 1))
        assert wait_for(lambda: daemon.log().count('"vhost_user.device_started"') == 3)
        send_frame(a, frame(BROADCAST, MAC_A, b"again" * 10))
        assert wait_for(lambda: b.drivers[RX].used_idx() >= 1)
        (got,) = received(b)
        assert got[12:] == frame(BROADCAST, MAC_A, b"again" * 10)


def test_socket_paths_longer_than_sun_path_work(
    vbusd: Callable[..., Daemon], tmp_path: Path
) -> None:
    text = TOPOLOGY.replace("v0", "a_device_with_a_rather_long_name_0")
    daemon = daemon_with(vbusd, tmp_path, text, "--no-admin")
    path = sock(daemon, "a_device_with_a_rather_long_name_0")
    assert len(path) > 108 and os.path.exists(path)
    with Frontend(path) as front:
        assert front.start()
