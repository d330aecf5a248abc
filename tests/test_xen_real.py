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

import json
import os
import re
import shutil
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require
from vbus.errors import VbusError
from vbus.xenlab import Build, XenLab, missing_host_tools

ROOT = Path(__file__).resolve().parent.parent
LAB_TIMEOUT = 900  # first run: download and build, then a TCG boot on a shared machine
FRONTEND_TIMEOUT = 180  # domU boot to netfront Connected, under TCG

pytestmark = pytest.mark.timeout(LAB_TIMEOUT)

VIF_SCRIPT = """\
#!/bin/sh
# libxl's hotplug script for the lab's vif: no bridge, no kernel netback; the
# backend is in userspace, so the device is "connected" as soon as it exists.
case "$1" in
    online|add) xenstore-write "$XENBUS_PATH/hotplug-status" connected ;;
esac
exit 0
"""


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
        script = machine.dir / "vif-userspace"
        script.write_text(VIF_SCRIPT)
        script.chmod(0o755)
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


def _config(lab: XenLab, name: str, kind: str) -> str:
    lines = [
        f'name = "{name}"',
        f'type = "{kind}"',
        f'kernel = "{lab.build.kernel}"',
        f'ramdisk = "{lab.build.domu_initrd}"',
        "memory = 192",
        "vcpus = 1",
        'extra = "console=hvc0"',
        f'vif = ["mac=00:16:3e:00:00:02,backend=0,script={lab.lab_path(lab.dir / "vif-userspace")}"]',
    ]
    if kind == "pvh":
        # QEMU's emulated SVM has no next-RIP: Xen cannot emulate the guest's RDTSCP
        lines.append('tsc_mode = "native"')
    path = lab.dir / f"{name}.cfg"
    path.write_text("\n".join(lines) + "\n")
    return lab.lab_path(path)


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


def _console(lab: XenLab, name: str) -> str:
    path = lab.logs / f"guest-{name}.log"
    return path.read_text(errors="replace")[-3000:] if path.exists() else "(no console log)"


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
