"""Xen netback: a stock domU sending TCP to a network namespace, through vbusd or Linux's netback.

Each variant boots the Xen lab (``vbus.xenlab``: Xen 4.17 and a Debian dom0
under QEMU TCG), creates one PV domU running Debian's kernel and its own
xen-netfront, and times one TCP stream of ``megabytes`` from the domU to a
receiver in a network namespace in dom0 (the receiver's clock, from its
first byte to its last):

- ``vbusd``: vbusd in dom0 serves the vif (the Xen connector's dom0 form,
  docs/design.md 4.8): netif rings -> grant copy -> venet -> the switch ->
  ``vbus tap`` into the namespace;
- ``kernel``: Linux's own ``xen-netback`` in dom0 serves it (the module,
  loaded for this run only), its ``vifD.0`` moved into the namespace: what
  a Xen user runs instead, and the same path minus vbus.

Root, QEMU and Debian's apt tools are needed; else the variant is
unavailable.  It runs only when named (``vbus bench xen_netback``): every
run boots a machine.  Under TCG the domU's one vCPU is the bottleneck, so
the ratio says more than the Mb/s.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import textwrap
import time
from pathlib import Path

from vbus.bench.subject import Figure, Figures, Params, Subject, Target, Unavailable, Variant

__all__ = ["SUBJECT", "XenNetbackSubject"]

ROOT = Path(__file__).resolve().parents[3]
NS = "xnb"
SUBNET = "10.197.0"
TOPOLOGY = """\
[devices.ns0]
class = "venet"
backend = "switch:bench"
[devices.vif0]
class = "venet"
backend = "switch:bench"
[buses.bench]
members = ["uid:0"]
devices = ["ns0", "vif0"]
"""
RECEIVER = """
import socket, sys, time
total, report = int(sys.argv[1]), sys.argv[2]
s = socket.create_server(("0.0.0.0", 5001))
c, _ = s.accept()
n, first = 0, None
while n < total:
    data = c.recv(1 << 18)
    if not data:
        break
    if first is None:
        first = time.monotonic()
    n += len(data)
with open(report, "w") as f:
    f.write(f"{n} {time.monotonic() - (first or time.monotonic())}\\n")
"""
DOMU = """\
ip link set eth0 up && ip addr add {subnet}.2/24 dev eth0
n=0; until ping -c 1 -W 1 {subnet}.1 > /dev/null 2>&1; do n=$((n+1)); [ $n -gt 120 ] && break; done
echo sending
dd if=/dev/zero bs=65536 count={chunks} 2>/dev/null | nc {subnet}.1 5001
echo sent
"""


class XenNetbackSubject(Subject):
    name = "xen_netback"
    title = "Xen: domU -> namespace TCP through vbusd's vif backend vs Linux's xen-netback"
    order = 61
    variants = (
        Variant("vbusd", "vbusd in dom0 (grant copy, venet, vbus tap)", role="vbus"),
        Variant("kernel", "Linux xen-netback, vif in the namespace", role="peer"),
    )
    figures = (Figure("mbit_per_s", "Mb/s", "Mb/s"),)
    primary = "mbit_per_s"
    baseline = "vbusd"
    on_request = True  # a Xen boot per run: ``vbus bench xen_netback``

    def params(self, quick: bool) -> Params:
        return {"megabytes": 8 if quick else 32}

    def run(self, variant: str, params: Params) -> Figures:
        from vbus.xenlab import Build, XenLab, missing_host_tools

        if variant not in ("vbusd", "kernel"):
            raise KeyError(f"xen_netback: no variant {variant!r}")
        if os.geteuid() != 0:
            raise Unavailable("needs root (QEMU's lab, network namespaces in dom0)")
        missing = missing_host_tools()
        if missing:
            raise Unavailable(f"needs {', '.join(missing)}")
        build = Build.ensure()
        workdir = Path(tempfile.mkdtemp(prefix="vbus-xnb-"))
        try:
            with XenLab(build, workdir, checkout=ROOT) as lab:
                return {"mbit_per_s": _stream(lab, variant, params["megabytes"])}
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def targets(self, medians: dict[str, Figures]) -> list[Target]:
        ours = medians.get("vbusd", {}).get("mbit_per_s")
        kernel = medians.get("kernel", {}).get("mbit_per_s")
        ratio = ours / kernel if ours is not None and kernel else None
        return [Target("xen_netback: vbusd >= 0.5x Linux's xen-netback", ratio, 0.5, ">=")]


def _stream(lab: object, variant: str, megabytes: int) -> float:
    from vbus.xenlab import XenLab

    assert isinstance(lab, XenLab)
    total = megabytes << 20
    report = lab.dir / "received"
    (lab.dir / "receiver.py").write_text(RECEIVER)
    py = f"cd {lab.checkout} && PYTHONPATH={lab.checkout} {lab.interpreter}"
    ip = "/usr/bin/ip"
    lab.check(f"{ip} netns add {NS} && {ip} -n {NS} link set lo up")
    receiver = (
        f"({ip} netns exec {NS} {lab.interpreter} {lab.lab_path(lab.dir / 'receiver.py')} "
        f"{total} {lab.lab_path(report)} > /tmp/receiver.log 2>&1 &)"
    )
    if variant == "vbusd":
        (lab.dir / "bench.toml").write_text(TOPOLOGY)
        log = lab.lab_path(lab.dir / "vbusd.log")
        lab.check(
            textwrap.dedent(
                f"""\
                mkdir -p /tmp/vbus
                {py} -m vbus.daemon --run-dir /run/vbus --state /tmp/vbus/state.json \\
                    --config {lab.lab_path(lab.dir / "bench.toml")} --log-level info > {log} 2>&1 &
                i=0
                until grep -q daemon.ready {log}; do i=$((i+1)); [ $i -lt 300 ] || exit 1; sleep 0.2; done
                ({py} -m vbus.cli --socket /run/vbus/vbus.sock tap --device ns0 --ifname ns0 \\
                    --netns {NS} > /tmp/tap.log 2>&1 &)
                i=0
                until {ip} -n {NS} link show ns0 2>/dev/null | grep -q UP; do
                    i=$((i+1)); [ $i -lt 300 ] || exit 1; sleep 0.2; done
                {ip} -n {NS} addr add {SUBNET}.1/24 dev ns0
                {receiver}
                """
            ),
            timeout=120,
        )
        bridge = " bridge=vif0"
    else:
        lab.check(f"insmod /modules/xen-netback.ko && {receiver}")
        bridge = ""
    extra = lab.domu_extra(DOMU.format(subnet=SUBNET, chunks=total // 65536))
    cfg = lab.dir / "xnb.cfg"
    cfg.write_text(
        "\n".join(
            [
                'name = "xnb"',
                'type = "pv"',
                f'kernel = "{lab.build.kernel}"',
                f'ramdisk = "{lab.build.domu_initrd}"',
                "memory = 160",
                "vcpus = 1",
                f'extra = "{extra}"',
            ]
        )
        + "\n"
    )
    try:
        lab.check(f"xl create -p {lab.lab_path(cfg)}", timeout=120)
        domid = int(lab.check("xl domid xnb").strip())
        if variant == "vbusd":
            lab.check(f"echo domid:{domid} > /run/vbus/admin/buses/bench/members")
        script = ROOT / "contrib" / "xen" / "vif-vbus"
        lab.check(f"xl network-attach xnb backend=0{bridge} script={script}", timeout=120)
        if variant == "kernel":
            vif = f"vif{domid}.0"
            lab.check(
                f"{ip} link set {vif} netns {NS} && {ip} -n {NS} addr add {SUBNET}.1/24 dev {vif}"
                f" && {ip} -n {NS} link set {vif} up"
            )
        lab.check("xl unpause xnb")
        deadline = time.monotonic() + 900
        while not report.exists() or not report.read_text().strip():
            if time.monotonic() > deadline:
                raise RuntimeError("the receiver got no stream")
            time.sleep(1)
        count, seconds = report.read_text().split()
        if int(count) != total:
            raise RuntimeError(f"the receiver got {count} of {total} bytes")
        return total * 8 / float(seconds) / 1e6
    finally:
        lab.run("xl destroy xnb; pkill -f vbus.daemon; pkill -f receiver.py; true", timeout=60)


SUBJECT = XenNetbackSubject()
