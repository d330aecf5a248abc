"""`vbus vm`: a real KVM guest (the mini VMM and its firmware) on a real vbusd.

Needs /dev/kvm and gcc (the firmware is built on first use); the venet test
also needs root (a network namespace behind `vbus tap`).  The echo guest
boots once for the module: the tests read its report.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon, require

pytestmark = pytest.mark.integration

TOPOLOGY = """
[devices.echo0]
class = "echo"
[devices.v0]
class = "venet"
[devices.v1]
class = "venet"
[buses.default]
members = ["uid:self"]
devices = ["echo0", "v0", "v1"]
"""


def need_kvm() -> None:
    require(os.path.exists("/dev/kvm"), "no /dev/kvm")
    require(os.access("/dev/kvm", os.R_OK | os.W_OK), "/dev/kvm is not ours to open")
    require(shutil.which("gcc") is not None, "no gcc (the guest firmware is built with it)")


def vm_cmd(daemon: Daemon, *args: str) -> list[str]:
    return [sys.executable, "-m", "vbus.cli", "vm", "--run-dir", str(daemon.run_dir), *args]


def run_vm(daemon: Daemon, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        vm_cmd(daemon, *args), capture_output=True, text=True, timeout=timeout, check=False
    )


def report(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no report: {done.stdout!r} {done.stderr!r}"
    data: dict[str, Any] = json.loads(lines[-1])
    return data


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    need_kvm()
    base = tmp_path_factory.mktemp("vm")
    config = base / "topology.toml"
    config.write_text(textwrap.dedent(TOPOLOGY))
    started = Daemon(base / "run", ["--config", str(config), "--no-admin"]).start()
    yield started
    assert started.stop() == 0, started.log()
    assert '"loop.exception"' not in started.log()


@pytest.fixture(scope="module")
def echo_report(daemon: Daemon) -> dict[str, Any]:
    done = run_vm(daemon, "--messages", "100000", "--json", "--timeout", "100")
    assert done.returncode == 0, done.stderr
    return report(done)


def test_a_real_guest_exchanges_100000_verified_echoes(echo_report: dict[str, Any]) -> None:
    guest = echo_report["guest"]
    assert echo_report["ok"] and echo_report["status"] == 0
    assert guest["sent"] == guest["received"] == 100000
    assert guest["bad"] == 0
    assert echo_report["messages_per_second"] > 0


def test_doorbells_and_interrupts_stay_in_the_kernel(echo_report: dict[str, Any]) -> None:
    guest = echo_report["guest"]
    # The guest rang doorbells and took interrupts in the data phase ...
    assert guest["doorbells"] > 0
    assert guest["interrupts"] > 0
    # ... interrupt 1 (the queues') arrived through irqfd and the PIC ...
    assert guest["interrupts_by_irq"][1] >= guest["interrupts"]
    # ... and not one of them was an exit to the VMM: ioeventfd and irqfd.
    assert echo_report["data_exits"] == {}, echo_report["data_exits"]
    assert "io_doorbell" not in echo_report["exits"]
    # Mitigation: far fewer doorbells and interrupts than messages.
    assert guest["doorbells"] + guest["interrupts"] < guest["received"] / 10


def test_trapped_doorbells_exit_to_the_vmm_one_each(daemon: Daemon) -> None:
    done = run_vm(daemon, "--messages", "20000", "--trap-doorbells", "--json", "--timeout", "100")
    assert done.returncode == 0, done.stderr
    rep = report(done)
    assert rep["guest"]["received"] == 20000 and rep["guest"]["bad"] == 0
    assert rep["data_exits"].get("io_doorbell") == rep["guest"]["doorbells"] > 0


def test_without_mitigation_every_message_kicks(
    daemon: Daemon, echo_report: dict[str, Any]
) -> None:
    done = run_vm(daemon, "--messages", "500", "--no-mitigation", "--json", "--timeout", "100")
    assert done.returncode == 0, done.stderr
    guest = report(done)["guest"]
    assert guest["received"] == 500 and guest["bad"] == 0
    assert guest["doorbells"] == 2 * 500  # tx and rx, forced, per message
    # Every halt ends with an interrupt of its own (edges that meet one in
    # service merge, so there may be fewer interrupts than kicks) ...
    assert 0 < guest["waits"] <= guest["interrupts"]
    # ... and far more of them per message than with mitigation on.
    mitigated = echo_report["guest"]
    assert guest["interrupts"] / 500 > 5 * mitigated["interrupts"] / mitigated["received"]


def test_sigkill_of_the_vmm_releases_everything(daemon: Daemon) -> None:
    time.sleep(0.2)
    baseline = daemon.fd_count()
    maps = daemon.memfd_mappings()
    proc = subprocess.Popen(
        vm_cmd(daemon, "--messages", str(10**12)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        seen = ""
        while "messages of" not in seen and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if ready:
                seen = proc.stdout.readline()
                assert seen, proc.stderr.read()  # type: ignore[union-attr]
        assert "messages of" in seen
        assert daemon.fd_count() > baseline  # guest RAM, doorbells, interrupts, socket
        assert daemon.memfd_mappings() > maps
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and (
        daemon.fd_count() != baseline or daemon.memfd_mappings() != maps
    ):
        time.sleep(0.05)
    assert daemon.fd_count() == baseline
    assert daemon.memfd_mappings() == maps


def test_a_device_not_on_the_bus_is_one_line(daemon: Daemon) -> None:
    done = run_vm(daemon, "--device", "nosuch0", "--messages", "10")
    assert done.returncode == 1
    assert done.stderr.strip() == "vbus vm: device nosuch0 is not on the bus", done.stderr


def test_gcc_missing_is_one_line(daemon: Daemon, tmp_path: Path) -> None:
    env = {**os.environ, "CC": "no-such-gcc", "XDG_CACHE_HOME": str(tmp_path)}
    done = subprocess.run(
        vm_cmd(daemon, "--messages", "10"), capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "gcc is missing" in lines[0], done.stderr


def test_a_vmm_no_member_rule_admits_is_refused(
    vbusd: Callable[..., Daemon], tmp_path: Path
) -> None:
    need_kvm()
    config = tmp_path / "closed.toml"
    config.write_text(
        textwrap.dedent(
            """
            [devices.echo0]
            class = "echo"
            [buses.closed]
            members = ["uid:54321"]
            devices = ["echo0"]
            """
        )
    )
    closed = vbusd("--config", str(config), "--no-admin")
    done = run_vm(closed, "--messages", "10")
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("vbus vm: vbusd refused the guest: "), lines
    assert "member" in lines[0]
    assert closed.fd_count() > 0 and '"guest.registered"' not in closed.log()


# --- venet: ping from a network namespace behind `vbus tap` ---------------------------------
@pytest.fixture
def netns() -> Iterator[str]:
    require(os.geteuid() == 0, "network namespaces and taps need root")
    require(os.path.exists("/dev/net/tun"), "no /dev/net/tun")
    require(shutil.which("ip") is not None and shutil.which("ping") is not None, "no ip/ping")
    name = f"vbvm{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    yield name
    subprocess.run(["ip", "netns", "del", name], check=False)


def test_ping_reaches_a_venet_guest(daemon: Daemon, netns: str) -> None:
    tap_args = ["tap", "--device", "v0", "--ifname", "vbvm0", "--netns", netns]
    tap = subprocess.Popen(
        [sys.executable, "-m", "vbus.cli", "--socket", str(daemon.socket), *tap_args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    guest = subprocess.Popen(
        vm_cmd(daemon, "--mode", "venet", "--device", "v1", "--ip", "10.78.0.2/24", "--json"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert tap.stdout is not None
        ready, _, _ = select.select([tap.stdout], [], [], 30)
        assert ready and " up, features " in tap.stdout.readline()
        subprocess.run(
            ["ip", "-n", netns, "addr", "add", "10.78.0.1/24", "dev", "vbvm0"], check=True
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # ARP and the guest's boot out of the way
            warm = subprocess.run(
                ["ip", "netns", "exec", netns, "ping", "-c", "1", "-W", "1", "10.78.0.2"],
                capture_output=True,
                check=False,
            )
            if warm.returncode == 0:
                break
        ping = ["ping", "-c", "100", "-i", "0.01", "-W", "2", "-q", "10.78.0.2"]
        out = subprocess.run(
            ["ip", "netns", "exec", netns, *ping],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        ).stdout
        assert "100 received, 0% packet loss" in out, out
    finally:
        guest.send_signal(signal.SIGTERM)
        stdout, stderr = guest.communicate(timeout=30)
        tap.send_signal(signal.SIGTERM)
        tap.wait(15)
    assert guest.returncode == 0, stderr
    rep = json.loads(stdout.strip().splitlines()[-1])
    assert rep["guest"]["icmp_replies"] >= 100
    assert rep["guest"]["arp_replies"] >= 1
    # Serving: frames in and out through the queues, nothing through the VMM.
    assert rep["data_exits"] == {}, rep["data_exits"]
    assert rep["guest"]["interrupts"] > 0 and rep["guest"]["doorbells"] > 0
    assert tap.returncode == 0


def test_a_vmm_whose_vbusd_dies_stops_with_one_line(
    vbusd: Callable[..., Daemon], tmp_path: Path
) -> None:
    need_kvm()
    doomed = vbusd("--no-admin")
    proc = subprocess.Popen(
        vm_cmd(doomed, "--messages", str(10**12)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert "messages of" in "".join(proc.stdout.readline() for _ in range(2))
        doomed.proc.kill()  # type: ignore[union-attr]
        doomed.proc.wait()  # type: ignore[union-attr]
        _out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "vbusd hung up on the guest" in lines[0], err


def test_no_dev_kvm_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from vbus.errors import NotFound
    from vbus.vm import machine

    real_open = os.open

    def fake_open(path: str, *args: Any, **kwargs: Any) -> int:
        if path == "/dev/kvm":
            raise FileNotFoundError(2, "No such file or directory", path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(machine.os, "open", fake_open)
    with pytest.raises(NotFound, match=r"^no /dev/kvm"):
        machine.Machine(machine.MachineConfig(), b"")


def test_a_firmware_that_crashes_is_reported_with_the_kvm_exit(
    daemon: Daemon, tmp_path: Path
) -> None:
    image = tmp_path / "ud2.bin"
    image.write_bytes(b"\x0f\x0b")  # ud2 before any IDT: a triple fault
    done = run_vm(daemon, "--firmware", str(image), "--json", "--timeout", "30")
    assert done.returncode == 1
    rep = report(done)
    assert rep["status"] is None and not rep["ok"]
    assert sum(rep["exits"].values()) == 1, rep["exits"]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "the guest stopped: KVM exit" in lines[0], done.stderr


def test_the_firmware_is_built_once_per_source_and_checked(tmp_path: Path) -> None:
    require(shutil.which("gcc") is not None, "no gcc")
    from vbus.vm import firmware

    first = firmware.build(tmp_path)
    mtime = first.stat().st_mtime_ns
    assert firmware.build(tmp_path) == first and first.stat().st_mtime_ns == mtime
    assert first.read_bytes()[:1] and first.stat().st_size < 1 << 20
    # The object-code check refuses what the CPL0 emulator cannot run.
    src = tmp_path / "sse.c"
    src.write_text("double f(double a, double b) { return a * b; }\n")
    obj = tmp_path / "sse.o"
    subprocess.run(["gcc", "-O2", "-c", str(src), "-o", str(obj)], check=True)
    with pytest.raises(firmware.FirmwareError, match="cannot run"):
        firmware._check_code(obj)
