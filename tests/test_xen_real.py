"""vbus's dom0 side against the real Xen hypervisor (vbus.xenlab: Xen 4.17 under QEMU TCG).

One boot per test session, shared by the tests.  A domU (PV, then PVH) gets a
vif whose backend is the test itself: libxl writes the backend nodes, the test
answers in xenstore as a userspace netback would (``feature-rx-copy``, state
InitWait), and the domU's stock xen-netfront publishes its rings and event
channel.  Then vbus.xen.dom0, running in dom0 from this checkout, maps the
domU's ring grants through gntdev and binds its event channel.

Needs QEMU and apt (``make test-xen``; ``.ci/system-deps`` installs QEMU as root).
The lab directory (console, dmesg, domU consoles) is kept when a test failed,
or with ``VBUS_XENLAB_KEEP=1``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import require
from vbus.errors import VbusError
from vbus.xenlab import Build, Result, XenLab, missing_host_tools

ROOT = Path(__file__).resolve().parent.parent
LAB_TIMEOUT = 900  # first run: download and build, then a TCG boot on a shared machine
FRONTEND_TIMEOUT = 180  # domU boot to netfront Connected, under TCG

pytestmark = pytest.mark.timeout(LAB_TIMEOUT)

# A PVH domU under QEMU TCG: QEMU's emulated SVM has no next-RIP, so Xen
# cannot emulate the guest's RDTSCP (tsc_mode); and the guest's AVX
# instructions now and then trap as invalid opcodes there (busybox's string
# functions, chosen by CPUID), so the domU is not offered AVX.
PVH_UNDER_TCG = ['tsc_mode = "native"', 'cpuid = "host,avx=0,avx2=0"']

# libxl's hotplug script for a vif served from userspace (no kernel netback)
VIF_SCRIPT = ROOT / "contrib" / "xen" / "vif-vbus"


@pytest.fixture(scope="session")
def lab(request: pytest.FixtureRequest) -> Iterator[XenLab]:
    missing = missing_host_tools()
    require(not missing, f"the Xen lab needs {', '.join(missing)} (qemu-system-x86, apt)")
    try:
        build = Build.ensure()
    except VbusError as exc:
        require(False, f"the Xen lab's Debian packages are not available: {exc}")
        raise
    # Not under pytest's basetemp: other sessions on the machine prune old ones,
    # and this directory is the running dom0's share.
    workdir = Path(tempfile.mkdtemp(prefix="vbus-xenlab-"))
    machine = XenLab(build, workdir, checkout=ROOT)
    failed_before = request.session.testsfailed
    try:
        machine.start()
        yield machine
    finally:
        machine.close()
        if request.session.testsfailed == failed_before and not os.environ.get("VBUS_XENLAB_KEEP"):
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"xenlab: console, dmesg and domU logs kept in {workdir}")


def test_dom0_runs_this_checkout_on_real_xen(lab: XenLab) -> None:
    info = lab.check("xl info")
    fields = {
        key.strip(): value.strip()
        for key, value in (line.split(":", 1) for line in info.splitlines() if ":" in line)
    }
    assert (fields["xen_major"], fields["xen_minor"]) == ("4", "17")
    result = lab.python(
        "import json, vbus, vbus.xen.dom0 as dom0\n"
        "print(json.dumps({'file': vbus.__file__, 'dom0': dom0.detect()}))\n"
    )
    report = json.loads(result.check("python in dom0"))
    assert report == {"file": str(ROOT / "vbus" / "__init__.py"), "dom0": True}


def _domain(lab: XenLab, name: str, kind: str, memory: int, *extra: str) -> str:
    """An xl config for a domU of Debian's kernel and the lab's initramfs; its lab path."""
    lines = [
        f'name = "{name}"',
        f'type = "{kind}"',
        f'kernel = "{lab.build.kernel}"',
        f'ramdisk = "{lab.build.domu_initrd}"',
        f"memory = {memory}",
        "vcpus = 1",
        *extra,
    ]
    if kind == "pvh":
        lines += PVH_UNDER_TCG
    path = lab.dir / f"{name}.cfg"
    path.write_text("\n".join(lines) + "\n")
    return lab.lab_path(path)


def _config(lab: XenLab, name: str, kind: str) -> str:
    return _domain(
        lab,
        name,
        kind,
        192,
        'extra = "console=hvc0"',
        f'vif = ["mac=00:16:3e:00:00:02,backend=0,script={VIF_SCRIPT}"]',
    )


def _create_as_backend(lab: XenLab, name: str, cfg: str) -> int:
    """``xl create``, answering the vif's backend nodes as a userspace backend does."""
    log = lab.lab_path(lab.dir / f"xl-create-{name}.log")
    out = lab.check(
        textwrap.dedent(
            f"""\
            xl create {cfg} > {log} 2>&1 &
            xl_pid=$!
            i=0
            until domid=$(xl domid {name} 2>/dev/null) &&
                  xenstore-exists /local/domain/0/backend/vif/$domid/0/state 2>/dev/null; do
                i=$((i + 1)); [ $i -lt 300 ] || {{ echo "no backend nodes" >&2; exit 1; }}
                kill -0 $xl_pid 2>/dev/null || {{ cat {log} >&2; exit 1; }}
                sleep 0.1
            done
            be=/local/domain/0/backend/vif/$domid/0
            fe=/local/domain/$domid/device/vif/0
            # the domain is still paused: its netfront has published nothing yet
            xenstore-exists $fe/tx-ring-ref 2>/dev/null && echo "early=1" || echo "early=0"
            echo "backend_state=$(xenstore-read $be/state)"
            xenstore-write $be/feature-rx-copy 1 $be/state 2
            wait $xl_pid || {{ cat {log} >&2; xl destroy {name}; exit 1; }}
            echo "domid=$domid"
            """
        ),
        timeout=120,
    )
    values = dict(line.split("=", 1) for line in out.split() if "=" in line)
    assert values["early"] == "0", "netfront published rings before the backend's InitWait"
    assert values["backend_state"] == "1"  # libxl's Initialising, before the test answered
    return int(values["domid"])


def _frontend(lab: XenLab, name: str, domid: int) -> dict[str, int]:
    """Wait for the domU's netfront to reach Connected; its ring refs and channel."""
    fe = f"/local/domain/{domid}/device/vif/0"
    out = lab.run(
        textwrap.dedent(
            f"""\
            i=0
            # Connected, with every key readable in one pass (a read can race
            # netfront's own transaction on a loaded machine: read again)
            until [ "$(xenstore-read {fe}/state 2>/dev/null)" = 4 ] &&
                  out=$(for key in tx-ring-ref rx-ring-ref event-channel request-rx-copy; do
                            v=$(xenstore-read {fe}/$key 2>/dev/null) && [ -n "$v" ] || exit 1
                            echo "$key=$v"
                        done); do
                i=$((i + 1)); [ $i -lt {FRONTEND_TIMEOUT * 5} ] || exit 3
                sleep 0.2
            done
            echo "$out"
            """
        ),
        timeout=FRONTEND_TIMEOUT + 30,
    )
    assert out.rc == 0, (
        f"netfront never connected with its keys; domU console:\n{_console(lab, name)}"
    )
    return {k: int(v) for k, v in (line.split("=", 1) for line in out.out.split())}


def _interrupts(lab: XenLab, name: str, above: int = -1) -> int:
    """netfront's interrupt count as the domU last reported it, once it is above ``above``."""
    deadline = time.monotonic() + 60
    while True:
        counts = re.findall(r"xenlab-domu: eth0 interrupts (\d+)", _console(lab, name))
        if counts and int(counts[-1]) > above:
            return int(counts[-1])
        assert time.monotonic() < deadline, (
            f"no eth0 interrupt count above {above}; domU console:\n{_console(lab, name)}"
        )
        time.sleep(0.5)


def _console(lab: XenLab, name: str, tail: int = 3000) -> str:
    """The end of a domU's console log (``tail=0``: all of it)."""
    path = lab.logs / f"guest-{name}.log"
    return path.read_text(errors="replace")[-tail:] if path.exists() else "(no console log)"


DOM0_SIDE = """
import json, os, select, struct
from vbus.errors import VbusError
from vbus.xen import dom0

def fds():
    return len(os.listdir("/proc/self/fd"))

def gntdev_maps():
    with open("/proc/self/maps") as f:
        return sum("gntdev" in line for line in f)

domid, tx_ref, rx_ref, remote_port = {domid}, {tx}, {rx}, {port}
report = {{"fds_before": fds()}}
with dom0.Gntdev() as gnt, dom0.EventChannels() as chans:
    report["fds_open"] = fds()
    for name, ref in (("tx", tx_ref), ("rx", rx_ref)):
        with gnt.map(domid, [ref]) as ring:
            # struct {{name}}_sring: req_prod, req_event, rsp_prod, rsp_event
            report[name] = list(struct.unpack_from("=IIII", ring.buffer, 0))
            report[name + "_len"] = len(ring.buffer)
            report["maps_while_mapped"] = gntdev_maps()
    report["maps_after_unmap"] = gntdev_maps()
    with gnt.map(domid, [tx_ref, rx_ref], writable=False) as both:
        # one mapping, two pages, in the order of the references
        report["both"] = [list(struct.unpack_from("=IIII", both.buffer, off)) for off in (0, 4096)]
        try:
            both.buffer[64] = 0
            report["readonly"] = "written"
        except TypeError:
            report["readonly"] = "refused"
    try:
        gnt.map(domid, [0xFFFFFF])  # far past the domU's grant table
        report["bad_ref"] = "mapped"
    except VbusError as exc:
        report["bad_ref"] = type(exc).__name__
        report["bad_ref_message"] = str(exc)
    report["maps_after_bad_ref"] = gntdev_maps()
    port = chans.bind_interdomain(domid, remote_port)
    report["local_port"] = port
    # Xen marks the new local port pending (a notification sent to the unbound
    # port before the bind would otherwise be lost): the device must say so.
    report["readable_after_bind"] = bool(select.select([chans], [], [], 10)[0])
    report["pending_after_bind"] = chans.pending()
    chans.unmask(port)
    chans.notify(port)
    report["pending_after_notify"] = chans.pending()  # a notify goes to the domU only
    chans.unbind(port)
    report["ports_after_unbind"] = sorted(chans.ports)
    try:
        chans.bind_interdomain(domid, 0xFFFF)  # no such port in the domU
        report["bad_port"] = "bound"
    except VbusError as exc:
        report["bad_port"] = type(exc).__name__
    report["fds_inside"] = fds()
report["fds_after"] = fds()
print(json.dumps(report))
"""


def _destroy(lab: XenLab, name: str, domid: int) -> None:
    """``xl destroy``, answering the backend's Closing as the userspace backend would."""
    be = f"/local/domain/0/backend/vif/{domid}/0"
    lab.check(
        textwrap.dedent(
            f"""\
            xl destroy {name} &
            xl_pid=$!
            while kill -0 $xl_pid 2>/dev/null; do
                [ "$(xenstore-read {be}/state 2>/dev/null)" = 5 ] && xenstore-write {be}/state 6
                sleep 0.1
            done
            wait $xl_pid
            """
        ),
        timeout=60,
    )
    listing = lab.check("xl list")
    assert name not in listing
    gone = lab.run(
        f"xenstore-exists /local/domain/{domid} || xenstore-exists /local/domain/0/backend/vif/{domid}"
    )
    assert gone.rc != 0, f"xenstore keeps domain {domid}'s nodes"


@pytest.mark.parametrize("kind", ["pv", "pvh"])
def test_domu_netfront_rings_map_and_bind_from_dom0(lab: XenLab, kind: str) -> None:
    name = f"xenlab-{kind}"
    domid = _create_as_backend(lab, name, _config(lab, name, kind))
    try:
        front = _frontend(lab, name, domid)
        assert front["request-rx-copy"] == 1
        assert front["tx-ring-ref"] != front["rx-ring-ref"]
        before = _interrupts(lab, name)
        result = lab.python(
            DOM0_SIDE.format(
                domid=domid,
                tx=front["tx-ring-ref"],
                rx=front["rx-ring-ref"],
                port=front["event-channel"],
            )
        )
        report = json.loads(result.check("dom0 side").splitlines()[-1])  # after the log lines
        # the notify reached the domU: netfront's interrupt count went up
        after = _interrupts(lab, name, above=before)
    finally:
        _destroy(lab, name, domid)
    # a fresh tx ring (SHARED_RING_INIT; the domU's eth0 is down, so nothing sent):
    # no requests, no responses, both event thresholds at 1
    assert report["tx"] == [0, 1, 0, 1]
    assert report["tx_len"] == 4096
    # netfront fills its rx ring with buffers before it says Connected: all
    # NET_RX_RING_SIZE (256 for 4 KiB pages) requests posted, none answered
    assert report["rx"] == [256, 1, 0, 1]
    assert report["rx_len"] == 4096
    assert report["maps_while_mapped"] == 1
    assert report["maps_after_unmap"] == 0
    assert report["both"] == [report["tx"], report["rx"]]
    assert report["readonly"] == "refused"
    assert report["bad_ref"] == "Invalid", report.get("bad_ref_message")
    assert report["maps_after_bad_ref"] == 0
    assert report["local_port"] > 0
    assert report["readable_after_bind"] is True
    assert report["pending_after_bind"] == [report["local_port"]]
    assert report["pending_after_notify"] == []
    assert after == before + 1  # one notify, one interrupt
    assert report["ports_after_unbind"] == []
    assert report["bad_port"] != "bound"
    assert report["fds_open"] == report["fds_before"] + 2
    assert report["fds_inside"] == report["fds_open"]  # every mapping's descriptor went
    assert report["fds_after"] == report["fds_before"]


# --- vbusd in dom0: real domUs' netfront on venet ports -------------------------------------

VBUSD_CONFIG = """\
[devices.ns0]
class = "venet"
backend = "switch:lab"

[devices.vif-a]
class = "venet"
backend = "switch:lab"

[devices.vif-b]
class = "venet"
backend = "switch:lab"

[devices.vif-c]
class = "venet"
backend = "switch:lab"

[buses.lab]
members = ["uid:0"]
devices = ["ns0", "vif-a", "vif-b", "vif-c"]
"""

NS_ADDR = "10.9.0.1"
TRANSFER = 5 << 20  # bytes each way

# The namespace's end, in dom0 behind `vbus tap`: take TRANSFER bytes on 5001 and
# report their hash, send TRANSFER seeded bytes on 5002, count what arrives on 5003.
SERVERS = """\
import hashlib, json, random, socket, sys, threading
size, report = int(sys.argv[1]), sys.argv[2]
lock = threading.Lock()
def say(**kw):
    with lock, open(report, "a") as f:
        f.write(json.dumps(kw) + "\\n")
def serve(port, handle):
    srv = socket.create_server((sys.argv[3], port))
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()
def take(conn):
    h, got = hashlib.sha256(), 0
    while got < size:
        data = conn.recv(65536)
        if not data:
            break
        h.update(data); got += len(data)
    conn.close()
    say(port=5001, bytes=got, sha=h.hexdigest())
def give(conn):
    data = random.Random(7).randbytes(size)
    conn.sendall(data)
    conn.close()
    say(port=5002, bytes=size, sha=hashlib.sha256(data).hexdigest())
def sink(conn):
    got = 0
    while data := conn.recv(65536):
        got += len(data)
        if got // (256 << 10) != (got - len(data)) // (256 << 10):
            say(port=5003, bytes=got)
    say(port=5003, bytes=got, closed=True)
for port, handle in ((5001, take), (5002, give)):
    threading.Thread(target=serve, args=(port, handle), daemon=True).start()
serve(5003, sink)
"""

# What a domU does once netfront is up (its init runs it from the command line).
DOMU_PING_AND_TRANSFER = """\
ip link set eth0 up && ip addr add {addr}/24 dev eth0
sleep 1
ping -c 50 -i 0.2 -W 3 {ns} | grep -E 'transmitted|min/avg'
dd if=/dev/urandom of=/tmp/up bs=4096 count={pages} 2>/dev/null
echo "up $(sha256sum /tmp/up)"
nc {ns} 5001 < /tmp/up
nc {ns} 5002 > /tmp/down
echo "down $(wc -c < /tmp/down) $(sha256sum /tmp/down)"
"""
DOMU_STREAM = """\
ip link set eth0 up && ip addr add {addr}/24 dev eth0
sleep 1
echo streaming
cat /dev/zero | nc {ns} 5003
"""
DOMU_PINGER = """\
ip link set eth0 up && ip addr add {addr}/24 dev eth0
sleep 1
echo pinging
ping -c {count} -i 0.2 -W 3 {ns} | grep -E 'transmitted'
"""


class Dom0Vbusd:
    """vbusd running in the lab's dom0, a namespace behind `vbus tap`, the servers."""

    def __init__(self, lab: XenLab) -> None:
        self.lab = lab
        self.log = lab.dir / "vbusd.log"
        self.report = lab.dir / "servers.jsonl"
        self.pid = 0

    def start(self) -> None:
        lab = self.lab
        (lab.dir / "vbusd.toml").write_text(VBUSD_CONFIG)
        (lab.dir / "servers.py").write_text(SERVERS)
        self.report.write_text("")
        py = f"cd {lab.checkout} && PYTHONPATH={lab.checkout} {lab.interpreter}"
        out = lab.check(
            textwrap.dedent(
                f"""\
                mkdir -p /tmp/vbus
                ulimit -c unlimited  # a crash leaves its core beside the log
                echo {lab.lab_path(lab.dir)}/core.%p > /proc/sys/kernel/core_pattern
                {py} -m vbus.daemon --run-dir /run/vbus --state /tmp/vbus/state.json \\
                    --config {lab.lab_path(lab.dir / "vbusd.toml")} --log-format json \\
                    --log-level debug > {lab.lab_path(self.log)} 2>&1 &
                echo "pid=$!"
                i=0
                until grep -q '"daemon.ready"' {lab.lab_path(self.log)}; do
                    i=$((i + 1)); [ $i -lt 300 ] || {{ tail -20 {lab.lab_path(self.log)} >&2; exit 1; }}
                    sleep 0.2
                done
                /usr/bin/ip netns add ns0
                ({py} -m vbus.cli --socket /run/vbus/vbus.sock tap --device ns0 --ifname ns0 \\
                    --netns ns0 > {lab.lab_path(lab.dir / "tap.log")} 2>&1 &)
                i=0
                until /usr/bin/ip netns exec ns0 /usr/bin/ip link show ns0 2>/dev/null | grep -q UP; do
                    i=$((i + 1)); [ $i -lt 300 ] || {{ cat {lab.lab_path(lab.dir / "tap.log")} >&2; exit 1; }}
                    sleep 0.2
                done
                /usr/bin/ip netns exec ns0 /usr/bin/ip addr add {NS_ADDR}/24 dev ns0
                /usr/bin/ip netns exec ns0 /usr/bin/ip link set lo up
                (/usr/bin/ip netns exec ns0 {lab.interpreter} {lab.lab_path(lab.dir / "servers.py")} \\
                    {TRANSFER} {lab.lab_path(self.report)} {NS_ADDR} > {lab.lab_path(lab.dir / "servers.log")} 2>&1 &)
                """
            ),
            timeout=120,
        )
        self.pid = int(out.split("pid=", 1)[1].split()[0])

    def logged(self, text: str, timeout: float = 60.0) -> bool:
        deadline = time.monotonic() + timeout
        while text not in self.log.read_text(errors="replace"):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.5)
        return True

    def events(self, event: str) -> list[dict[str, object]]:
        found = []
        for line in self.log.read_text(errors="replace").splitlines():
            if f'"{event}"' in line:
                with contextlib.suppress(ValueError):
                    found.append(json.loads(line))
        return found

    def held(self) -> dict[str, int]:
        """What vbusd holds now: descriptors, gntdev mappings, evtchn descriptors."""
        out = self.lab.check(
            f"ls -l /proc/{self.pid}/fd | grep -c . ; grep -c gntdev /proc/{self.pid}/maps ; "
            f"ls -l /proc/{self.pid}/fd | grep -c evtchn ; true"
        )
        fds, maps, chans = (int(v) for v in out.split()[:3])
        return {"fds": fds, "gntdev_maps": maps, "evtchn_fds": chans}

    def fds(self) -> list[str]:
        """What vbusd's descriptors are (for the failure messages)."""
        out = self.lab.run(f"for f in /proc/{self.pid}/fd/*; do readlink $f; done")
        return sorted(out.out.split())

    def servers(self, port: int) -> list[dict[str, object]]:
        lines = self.report.read_text().splitlines()
        return [r for r in map(json.loads, lines) if r["port"] == port]

    def stop(self) -> None:
        self.lab.run(
            f"kill {self.pid}; i=0; while kill -0 {self.pid} 2>/dev/null && [ $i -lt 100 ]; do "
            "i=$((i + 1)); sleep 0.1; done; pkill -f vbus.cli; pkill -f servers.py; "
            "/usr/bin/ip netns del ns0; true",
            timeout=60,
        )


@pytest.fixture(scope="module")
def served(lab: XenLab) -> Iterator[Dom0Vbusd]:
    vbusd = Dom0Vbusd(lab)
    vbusd.start()
    try:
        yield vbusd
    finally:
        vbusd.stop()


def _domu(lab: XenLab, name: str, kind: str, script: str) -> int:
    """A paused domU with no vif yet, running ``script`` once booted; its domid."""
    cfg = _domain(lab, name, kind, 160, f'extra = "{lab.domu_extra(script)}"')
    lab.check(f"xl create -p {cfg}", timeout=120)
    return int(lab.check(f"xl domid {name}").strip())


def _admit(served: Dom0Vbusd, domid: int) -> None:
    served.lab.check(f"echo domid:{domid} > /run/vbus/admin/buses/lab/members")


def _attach(lab: XenLab, name: str, device: str, mac: str) -> Result:
    return lab.run(
        f"xl network-attach {name} backend=0 bridge={device} mac={mac} script={VIF_SCRIPT}",
        timeout=120,
    )


def _until(what: str, predicate: Callable[[], bool], timeout: float = FRONTEND_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def _settles(served: Dom0Vbusd, expected: dict[str, int], what: str) -> None:
    """vbusd comes to hold ``expected`` (descriptors, gntdev maps, evtchn fds) within 30 s."""
    deadline = time.monotonic() + 30
    while (held := served.held()) != expected:
        assert time.monotonic() < deadline, (
            f"{what}: holds {held}, expected {expected}; its descriptors: {served.fds()}"
        )
        time.sleep(0.5)


def _gone(lab: XenLab, name: str, domid: int) -> None:
    lab.run(f"xl destroy {name}", timeout=60)
    lab.run(
        f"i=0; while xenstore-exists /local/domain/0/backend/vif/{domid} 2>/dev/null && "
        "[ $i -lt 100 ]; do i=$((i + 1)); sleep 0.2; done",
        timeout=60,
    )


@pytest.mark.dom0_vbusd
@pytest.mark.parametrize("kind", ["pv", "pvh"])
def test_domu_pings_and_transfers_through_vbusd(lab: XenLab, served: Dom0Vbusd, kind: str) -> None:
    name = f"vbus-{kind}"
    addr = "10.9.0.11" if kind == "pv" else "10.9.0.12"
    script = DOMU_PING_AND_TRANSFER.format(addr=addr, ns=NS_ADDR, pages=TRANSFER // 4096)
    domid = _domu(lab, name, kind, script)
    uploads = len(served.servers(5001))
    try:
        _admit(served, domid)
        attached = _attach(lab, name, "vif-a", f"00:16:3e:00:01:0{1 if kind == 'pv' else 2}")
        assert attached.rc == 0, (attached.err, served.log.read_text()[-3000:])
        lab.check(f"xl unpause {name}")
        _until("the domU's transfers", lambda: "xenlab-domu: down " in _console(lab, name), 400)
        console = _console(lab, name)
    finally:
        _gone(lab, name, domid)
    ping = re.search(
        r"(\d+) packets transmitted, (\d+) packets received, (\d+)% packet loss", console
    )
    assert ping is not None, console
    assert ping.groups() == ("50", "50", "0"), console
    up = re.search(r"xenlab-domu: up ([0-9a-f]{64})", console)
    assert up is not None, console
    received = served.servers(5001)[uploads:]
    assert received and received[0]["bytes"] == TRANSFER
    assert received[0]["sha"] == up.group(1)  # the namespace got exactly what the domU sent
    down = re.search(r"xenlab-domu: down (\d+) ([0-9a-f]{64})", console)
    assert down is not None, console
    assert int(down.group(1)) == TRANSFER
    assert down.group(2) == served.servers(5002)[-1]["sha"]  # and the domU what it was sent
    connected = [e for e in served.events("xen.vif_connected") if e.get("domid") == domid]
    assert connected and connected[0]["device"] == "vif-a"
    assert not [e for e in served.events("connection.faulted") if e.get("domid") == domid]


@pytest.mark.dom0_vbusd
def test_a_domid_no_rule_admits_gets_no_backend(lab: XenLab, served: Dom0Vbusd) -> None:
    name = "vbus-stranger"
    domid = _domu(lab, name, "pv", DOMU_PINGER.format(addr="10.9.0.13", ns=NS_ADDR, count=5))
    try:
        attached = _attach(lab, name, "vif-b", "00:16:3e:00:01:03")  # no domid rule
        assert attached.rc != 0  # libxl waited for a backend that never came
        refused = [e for e in served.events("xen.vif_refused") if e.get("domid") == domid]
        assert refused, served.log.read_text()[-3000:]
        assert refused[0]["reason"] == f"domid {domid} is not a member of any bus"
        assert not [e for e in served.events("xen.vif_admitted") if e.get("domid") == domid]
        lab.check(f"xl unpause {name}")
        time.sleep(10)
        assert "xenlab-domu: eth0 interrupts" not in _console(lab, name)
        assert "packets transmitted" not in _console(lab, name)  # it never had an eth0 to ping on
    finally:
        _gone(lab, name, domid)


@pytest.mark.dom0_vbusd
def test_destroy_mid_transfer_releases_everything_and_spares_the_other(
    lab: XenLab, served: Dom0Vbusd
) -> None:
    witness_id = _domu(
        lab, "vbus-witness", "pv", DOMU_PINGER.format(addr="10.9.0.14", ns=NS_ADDR, count=200)
    )
    victim_id = _domu(lab, "vbus-victim", "pv", DOMU_STREAM.format(addr="10.9.0.15", ns=NS_ADDR))
    for domid in (victim_id, witness_id):
        _admit(served, domid)
    baseline = served.held()  # the rules written (and saved) first: only the vifs differ
    before = served.fds()
    streamed = len(served.servers(5003))
    try:
        try:
            # the victim streams first; the witness starts pinging only then, so
            # that the destroy falls inside its 200 pings (40 s)
            for name, _domid, device, mac in (
                ("vbus-victim", victim_id, "vif-c", "00:16:3e:00:01:05"),
                ("vbus-witness", witness_id, "vif-b", "00:16:3e:00:01:04"),
            ):
                attached = _attach(lab, name, device, mac)
                assert attached.rc == 0, attached.err
                lab.check(f"xl unpause {name}")
                if name == "vbus-victim":
                    _until(
                        "the victim's stream", lambda: len(served.servers(5003)) > streamed + 4, 400
                    )
            _until("the witness's pings", lambda: "pinging" in _console(lab, "vbus-witness"))
            during = served.held()
            assert during["gntdev_maps"] == baseline["gntdev_maps"] + 4  # two rings per vif
            assert during["evtchn_fds"] == baseline["evtchn_fds"] + 2
        finally:
            _gone(lab, "vbus-victim", victim_id)
        # destroyed while the witness pings: its 200 pings take 40 s
        assert "packets transmitted" not in _console(lab, "vbus-witness")
        victim = [e for e in served.events("xen.vif_released") if e.get("domid") == victim_id]
        assert victim, served.log.read_text()[-3000:]

        # the victim's vif alone is gone: the witness's two rings and its channel
        # remain, and at least the victim's four descriptors (gntdev, evtchn, the
        # two mappings) went; the last check below wants exactly the baseline
        def victim_released() -> bool:
            held = served.held()
            return (held["gntdev_maps"], held["evtchn_fds"]) == (
                baseline["gntdev_maps"] + 2,
                baseline["evtchn_fds"] + 1,
            ) and held["fds"] <= during["fds"] - 4

        _until("vbusd to let go of the victim", victim_released, 30)
        _until(
            "the witness's pings",
            lambda: "packets transmitted" in _console(lab, "vbus-witness"),
            180,
        )
        witness = _console(lab, "vbus-witness")
        _gone(lab, "vbus-witness", witness_id)
        assert "200 packets transmitted, 200 packets received, 0% packet loss" in witness, witness
        _settles(served, baseline, f"vbusd to let go of both (its descriptors before: {before})")
        assert not [e for e in served.events("connection.faulted") if e.get("domid") == witness_id]
    finally:
        _gone(lab, "vbus-witness", witness_id)  # also when a check above failed


DOMU_IDLE = """\
ip link set eth0 up && ip addr add {addr}/24 dev eth0
echo ready
"""

# The rogue domU: once vbusd closed its vif, it binds netfront again (new
# rings, new grants, a new handshake with the same backend) and pings.
DOMU_REBINDS = """\
ip link set eth0 up && ip addr add {addr}/24 dev eth0
echo ready
vif=/sys/bus/xen/devices/vif-0
waits() {{
    i=0
    until [ "$(cat $vif/state)" = "$1" ]; do
        i=$((i + 1)); [ $i -lt 1200 ] || {{ echo "netfront never $1: $(cat $vif/state)"; exit 1; }}
        sleep 0.5
    done
}}
waits Closed
echo "netfront closed"
echo vif-0 > /sys/bus/xen/drivers/vif/unbind
echo vif-0 > /sys/bus/xen/drivers/vif/bind
waits Connected
ip link set eth0 up && ip addr add {addr}/24 dev eth0
ping -c 20 -W 2 {ns}
"""

# Run in dom0 while the domU is paused: the domU's rx ring as a hostile
# netfront would leave it.  The ring page is mapped a second time, here.
BREAK_RX = """
import struct
from vbus.xen import dom0
domid, ref, breach = {domid}, {ref}, "{breach}"
with dom0.Gntdev() as gnt, gnt.map(domid, [ref]) as ring:
    page = ring.buffer
    req_prod, _, rsp_prod, _ = struct.unpack_from("<IIII", page, 0)
    if breach == "index":  # a req_prod far more than a ring ahead of the responses
        struct.pack_into("<I", page, 0, (rsp_prod + 1000) & 0xFFFFFFFF)
    else:  # the next posted buffer names a grant the domU never made
        assert req_prod != rsp_prod, "netfront posted no rx buffers"
        struct.pack_into("<I", page, 64 + (rsp_prod % 256) * 8 + 4, 0xFFFFF0)
    print(req_prod, rsp_prod)
"""


@pytest.mark.dom0_vbusd
@pytest.mark.parametrize("breach", ["index", "grant"])
def test_a_domu_that_breaks_its_rx_ring_is_disconnected_alone_and_may_come_back(
    lab: XenLab, served: Dom0Vbusd, breach: str
) -> None:
    name = f"vbus-rogue-{breach}"
    addr = "10.9.0.16" if breach == "index" else "10.9.0.17"

    def connections(domid: int) -> list[dict[str, object]]:
        return [e for e in served.events("xen.vif_connected") if e.get("domid") == domid]

    domid = _domu(lab, name, "pv", DOMU_REBINDS.format(addr=addr, ns=NS_ADDR))
    try:
        _admit(served, domid)
        baseline = served.held()  # after the rule: libfuse's pipe comes with the first write
        assert _attach(lab, name, "vif-b", "00:16:3e:00:01:06").rc == 0
        lab.check(f"xl unpause {name}")
        _until("the domU's eth0", lambda: "xenlab-domu: ready" in _console(lab, name))
        _until("the vif's connection", lambda: len(connections(domid)) == 1)
        fe = f"/local/domain/{domid}/device/vif/0"
        ref = int(lab.check(f"xenstore-read {fe}/rx-ring-ref").strip())
        lab.check(f"xl pause {name}")
        lab.python(BREAK_RX.format(domid=domid, ref=ref, breach=breach)).check("breaking the ring")
        # a frame for the domU (an ARP request, broadcast) makes vbusd fill its rx ring
        lab.run(f"/usr/bin/ip netns exec ns0 ping -c 3 -W 1 {addr}", timeout=30)
        _until(
            "the vif's disconnection",
            lambda: any(e.get("domid") == domid for e in served.events("xen.vif_disconnected")),
            60,
        )
        (event,) = [e for e in served.events("xen.vif_disconnected") if e.get("domid") == domid]
        expected = "ahead of rsp_prod" if breach == "index" else "grant copy failed"
        assert expected in str(event["reason"]), event
        be = f"/local/domain/0/backend/vif/{domid}/0"
        assert expected in lab.check(f"xenstore-read {be}/error")
        assert lab.check(f"xenstore-read {be}/state").strip() == "5"  # Closing
        # everything is let go at once, the domU still paused
        _settles(served, baseline, "vbusd to let go")
        # the namespace and the switch go on: vbus tap's port was not touched
        assert not [e for e in served.events("venet.port_failed") if e.get("device") == "ns0"]

        # the domU may come back, on new rings: its netfront bound again
        lab.check(f"xl unpause {name}")
        _until("the domU's ping", lambda: "packets transmitted" in _console(lab, name))
        console = _console(lab, name, tail=0)
        assert "xenlab-domu: netfront closed" in console
        ping = re.search(r"(\d+) packets transmitted, (\d+) packets received", console)
        assert ping is not None and ping.groups() == ("20", "20"), console[-3000:]
        assert len(connections(domid)) == 2
        assert lab.run(f"xenstore-read {be}/error").rc != 0  # the old reason went
        assert lab.check(f"xenstore-read {be}/state").strip() == "4"
        _gone(lab, name, domid)
        _settles(served, baseline, "vbusd after the destroy")
    finally:
        _gone(lab, name, domid)
