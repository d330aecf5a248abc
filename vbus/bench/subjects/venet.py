"""venet: real Linux TCP between two network namespaces, through vbus and through a veth pair.

The vbus path is ``vbus tap`` in namespace A -> venet -> the daemon's
learning switch -> venet -> ``vbus tap`` in namespace B (two venets of one
bus on ``switch:bench``), with the offloads negotiated (``gso``) or with
``--no-gso`` (``nogso``); the ceiling is a veth pair between two namespaces
(the kernel's own figure).  Each run makes its namespaces, addresses them on
a private /24, warms ARP with a few pings, then measures:

- iperf3 TCP (Debian's ``iperf3``), A -> B for ``duration`` seconds, then
  the same reversed (``-R``): Gb/s received, retransmits;
- ping RTT at ``interval`` both ways (A -> B, B -> A): p50 and p99;
- CPU seconds per GB moved (A -> B run) of each process on the path: the
  daemon and each ``vbus tap`` (the veth pair has none: the kernel's time is
  charged to the iperf3 processes).

Needs root, ``ip``, ``ping``, ``iperf3`` and ``/dev/net/tun``; otherwise the
variant is unavailable and says which is missing.  With ``profile`` (a directory)
in the parameters the daemon and both taps run under cProfile
(``vbus.bench.cprof``), one ``.pstats`` per process there.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vbus.bench.daemon import BenchDaemon, cpu_seconds
from vbus.bench.procs import percentile
from vbus.bench.subject import Figure, Figures, Params, Subject, Target, Unavailable, Variant

__all__ = ["SUBJECT", "VenetSubject", "venet_topology"]

SUBNET = "10.79.0"
DEVICES = ("benchva", "benchvb")
IFNAMES = ("vbench0", "vbench1")
_RTT = re.compile(r"time=([0-9.]+) ms")


def venet_topology() -> str:
    devices = "".join(
        f'[devices.{name}]\nclass = "venet"\nbackend = "switch:bench"\n' for name in DEVICES
    )
    listed = ", ".join(f'"{name}"' for name in DEVICES)
    return f'{devices}[buses.bench]\nmembers = ["uid:self"]\ndevices = [{listed}]\n'


def _run(*cmd: str, timeout: float = 60.0, check: bool = True) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, taps)"
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun"
    for tool, package in (("ip", "iproute2"), ("ping", "iputils-ping"), ("iperf3", "iperf3")):
        if shutil.which(tool) is None:
            return f"no {tool} (Debian: apt-get install {package})"
    return None


@contextlib.contextmanager
def _namespaces() -> Iterator[tuple[str, str]]:
    names = (f"vbb{os.getpid()}a", f"vbb{os.getpid()}b")
    try:
        for name in names:
            _run("ip", "netns", "add", name)
            _run("ip", "-n", name, "link", "set", "lo", "up")
        yield names
    finally:
        for name in names:
            _run("ip", "netns", "del", name, check=False)


class _Tap:
    """One ``vbus tap`` process (optionally under cProfile)."""

    def __init__(
        self, socket: Path, device: str, ifname: str, netns: str, gso: bool, profile: str | None
    ) -> None:
        cmd = [sys.executable, "-m", "vbus.cli", "--socket", str(socket), "tap"]
        if profile is not None:
            cmd = [sys.executable, "-m", "vbus.bench.cprof", profile, *cmd]
        cmd += ["--device", device, "--ifname", ifname, "--netns", netns]
        if not gso:
            cmd.append("--no-gso")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 30)
        line = self.proc.stdout.readline() if ready else ""
        if " up, features " not in line:
            self.stop()
            raise RuntimeError(f"vbus tap {device} did not come up: {line!r}")

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # cProfile writes its file on the way out
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _address(ns: str, ifname: str, host: int) -> str:
    _run("ip", "-n", ns, "addr", "add", f"{SUBNET}.{host}/24", "dev", ifname)
    _run("ip", "-n", ns, "link", "set", ifname, "up")
    return f"{SUBNET}.{host}"


def _ping(ns: str, dst: str, count: int, interval: float) -> list[float]:
    out = _run(
        "ip", "netns", "exec", ns, "ping", "-n", "-c", str(count), "-i", str(interval),
        "-W", "2", dst, timeout=count * interval + 30, check=False,
    )  # fmt: skip
    return [float(ms) for ms in _RTT.findall(out)]


def _warm(ns: str, dst: str) -> None:
    for _ in range(20):
        if len(_ping(ns, dst, 3, 0.2)) == 3:
            return
    raise RuntimeError(f"no ping from {ns} to {dst}")


def _iperf(client_ns: str, server_ns: str, server: str, seconds: float, reverse: bool) -> Any:
    """One iperf3 TCP run; its JSON report."""
    srv = subprocess.Popen(
        ["ip", "netns", "exec", server_ns, "iperf3", "-s", "-1", "-B", server],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        cmd = ["ip", "netns", "exec", client_ns, "iperf3", "-c", server, "-J"]
        cmd += ["-t", f"{seconds:g}", "--connect-timeout", "5000"]
        if reverse:
            cmd.append("-R")
        report: Any = None
        for _ in range(50):  # the server may not listen yet
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=seconds + 60, check=False
            )
            with contextlib.suppress(ValueError):
                report = json.loads(proc.stdout)
            if proc.returncode == 0 and report is not None and "error" not in report:
                return report
            if report is not None and "connect" not in str(report.get("error", "")):
                break
            _sleep(0.1)
        raise RuntimeError(f"iperf3 failed: {proc.stdout[-500:]} {proc.stderr[-500:]}")
    finally:
        if srv.poll() is None:
            srv.terminate()
        srv.wait(10)


def _sleep(seconds: float) -> None:
    select.select([], [], [], seconds)


class VenetSubject(Subject):
    name = "venet"
    title = (
        "iperf3 TCP and ping between two namespaces, vbus tap -> venet -> switch -> "
        "venet -> vbus tap, against a veth pair"
    )
    order = 60
    variants = (
        Variant("gso", "venet, GSO", role="vbus"),
        Variant("nogso", "venet, --no-gso", role="reference"),
        Variant("veth", "veth pair", role="ceiling"),
    )
    figures = (
        Figure("gbit_per_s", "Gb/s A>B", "Gb/s"),
        Figure("gbit_per_s_reverse", "Gb/s B>A", "Gb/s"),
        Figure("retransmits", "retr", ""),
        Figure("rtt_ab_p50_us", "ping A>B p50", "us", higher_is_better=False),
        Figure("rtt_ab_p99_us", "p99", "us", higher_is_better=False),
        Figure("rtt_ba_p50_us", "ping B>A p50", "us", higher_is_better=False),
        Figure("rtt_ba_p99_us", "p99", "us", higher_is_better=False),
        Figure("daemon_cpu_s_per_gb", "vbusd CPU s/GB", "s/GB", higher_is_better=False),
        Figure("tap_a_cpu_s_per_gb", "tap A s/GB", "s/GB", higher_is_better=False),
        Figure("tap_b_cpu_s_per_gb", "tap B s/GB", "s/GB", higher_is_better=False),
    )
    primary = "gbit_per_s"
    baseline = "veth"

    def params(self, quick: bool) -> Params:
        return {
            "duration": 1.0 if quick else 10.0,
            "pings": 30 if quick else 500,
            "interval": 0.01,
        }

    def run(self, variant: str, params: Params) -> Figures:
        if variant not in ("gso", "nogso", "veth"):
            raise KeyError(f"venet: no variant {variant!r}")
        missing = _missing()
        if missing is not None:
            raise Unavailable(missing)
        with _namespaces() as (ns_a, ns_b):
            if variant == "veth":
                _run("ip", "link", "add", "vbveth0", "netns", ns_a, "type", "veth",
                     "peer", "name", "vbveth1", "netns", ns_b)  # fmt: skip
                a = _address(ns_a, "vbveth0", 1)
                b = _address(ns_b, "vbveth1", 2)
                return _measure(ns_a, ns_b, a, b, params, [])
            return _through_venet(ns_a, ns_b, variant == "gso", params)

    def targets(self, medians: dict[str, Figures]) -> list[Target]:
        gso = medians.get("gso", {})
        veth = medians.get("veth", {})
        ratio = (
            gso["gbit_per_s"] / veth["gbit_per_s"]
            if gso.get("gbit_per_s") and veth.get("gbit_per_s")
            else None
        )
        return [
            Target(
                "venet: GSO >= 0.5x the veth pair's TCP throughput",
                ratio,
                0.5,
                ">=",
                "" if ratio is not None else "needs both the gso and the veth variants",
            )
        ]


def _through_venet(ns_a: str, ns_b: str, gso: bool, params: Params) -> Figures:
    profile_dir = params.get("profile")
    if profile_dir is not None:
        Path(profile_dir).mkdir(parents=True, exist_ok=True)

    def profile(name: str) -> str | None:
        return None if profile_dir is None else str(Path(profile_dir) / f"{name}.pstats")

    wrap: list[str] = []
    if profile_dir is not None:
        wrap = [sys.executable, "-m", "vbus.bench.cprof", str(Path(profile_dir) / "vbusd.pstats")]
    daemon = BenchDaemon(params.get("loop", "uvloop"), topology=venet_topology(), wrap=wrap)
    taps: list[_Tap] = []
    with daemon:
        try:
            for device, ifname, ns, who in zip(DEVICES, IFNAMES, (ns_a, ns_b), "ab", strict=True):
                taps.append(_Tap(daemon.socket, device, ifname, ns, gso, profile(f"tap_{who}")))
            a = _address(ns_a, IFNAMES[0], 1)
            b = _address(ns_b, IFNAMES[1], 2)
            cpu = [("daemon", daemon.cpu_seconds), ("tap_a", taps[0].cpu), ("tap_b", taps[1].cpu)]
            return _measure(ns_a, ns_b, a, b, params, cpu)
        finally:
            for tap in taps:
                tap.stop()


def _measure(
    ns_a: str, ns_b: str, a: str, b: str, params: Params, cpu: list[tuple[str, Any]]
) -> Figures:
    _warm(ns_a, b)
    _warm(ns_b, a)
    seconds = float(params["duration"])
    before = {name: read() for name, read in cpu}
    forward = _iperf(ns_a, ns_b, b, seconds, reverse=False)
    spent = {name: read() - before[name] for name, read in cpu}
    reverse = _iperf(ns_a, ns_b, b, seconds, reverse=True)
    received = forward["end"]["sum_received"]
    figures: Figures = {
        "gbit_per_s": received["bits_per_second"] / 1e9,
        "gbit_per_s_reverse": reverse["end"]["sum_received"]["bits_per_second"] / 1e9,
        "retransmits": float(forward["end"]["sum_sent"].get("retransmits", 0)),
    }
    gigabytes = received["bytes"] / 1e9
    for name, seconds_used in spent.items():
        figures[f"{name}_cpu_s_per_gb"] = seconds_used / gigabytes if gigabytes else 0.0
    pings, interval = int(params["pings"]), float(params["interval"])
    for key, ns, dst in (("ab", ns_a, b), ("ba", ns_b, a)):
        rtts = [ms * 1e3 for ms in _ping(ns, dst, pings, interval)]
        if len(rtts) < pings * 0.9:
            raise RuntimeError(f"ping {key}: {pings - len(rtts)} of {pings} lost")
        figures[f"rtt_{key}_p50_us"] = percentile(rtts, 0.5)
        figures[f"rtt_{key}_p99_us"] = percentile(rtts, 0.99)
    return figures


SUBJECT = VenetSubject()
