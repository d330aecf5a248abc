"""Restart without loss: admin changes survive a restart and a SIGKILL at any moment."""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Daemon, require

pytestmark = pytest.mark.integration


def fuse_available() -> bool:
    return os.path.exists("/dev/fuse")


def write(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text + "\n")


def read(path: Path) -> str:
    return path.read_text()


def restart(previous: Daemon, name: str) -> Daemon:
    daemon = Daemon(previous.run_dir, previous.args)
    daemon.log_path = previous.run_dir.parent / f"{name}.log"
    return daemon.start()


def test_restart_restores_everything(vbusd) -> None:
    require(fuse_available(), "no /dev/fuse: the admin tree needs FUSE")
    daemon: Daemon = vbusd()
    require(daemon.admin_mounted, "the admin tree did not mount")
    admin = daemon.admin
    os.mkdir(admin / "devices" / "e1")
    write(admin / "devices" / "e1" / "type", "echo")
    write(admin / "devices" / "e1" / "mode", "sink")
    os.mkdir(admin / "devices" / "untyped")
    os.mkdir(admin / "buses" / "b0")
    os.symlink("../../devices/e1", admin / "buses" / "b0" / "e1")
    write(admin / "buses" / "b0" / "members", "uid:4321")
    child = _long_lived_child()
    try:
        write(admin / "buses" / "b0" / "members", str(child.pid))
        assert daemon.stop() == 0
        again = restart(daemon, "again")
        try:
            admin = again.admin
            assert read(admin / "devices" / "e1" / "type") == "echo\n"
            assert read(admin / "devices" / "e1" / "mode") == "sink\n"
            assert read(admin / "devices" / "untyped" / "type") == "\n"
            assert os.readlink(admin / "buses" / "b0" / "e1") == "../../devices/e1"
            members = read(admin / "buses" / "b0" / "members").split()
            assert "uid:4321" in members
            assert f"pid:{child.pid}" in members  # the same task still lives
            # The embedded default survives too: it was the first start's config.
            assert (admin / "buses" / "default" / "echo0").is_symlink()
            assert again.logged('"state.restored"')
        finally:
            assert again.stop() == 0
    finally:
        child.kill()
        child.wait()
    # Once the task is gone its pid rule is not restored (a recycled pid must not be admitted).
    third = restart(again, "third")
    try:
        assert f"pid:{child.pid}" not in read(third.admin / "buses" / "b0" / "members")
    finally:
        assert third.stop() == 0


def _long_lived_child():  # type: ignore[no-untyped-def]
    import subprocess

    return subprocess.Popen(["sleep", "600"])


def test_config_only_applies_on_first_start(vbusd, tmp_path: Path) -> None:
    require(fuse_available(), "no /dev/fuse: the admin tree needs FUSE")
    config = tmp_path / "topology.toml"
    config.write_text(
        '[devices.from_config]\nclass = "echo"\n[buses.cfg]\ndevices = ["from_config"]\n'
    )
    daemon: Daemon = vbusd("--config", str(config))
    require(daemon.admin_mounted, "the admin tree did not mount")
    os.rmdir(daemon.admin / "buses" / "cfg")
    assert daemon.stop() == 0
    again = restart(daemon, "again")
    try:
        assert not (again.admin / "buses" / "cfg").exists()
        assert (again.admin / "devices" / "from_config").is_dir()
        assert again.logged('"state.config_ignored"')
    finally:
        assert again.stop() == 0


class Driver(threading.Thread):
    """Runs admin operations one by one and records each one acknowledged."""

    def __init__(self, admin: Path, start: int) -> None:
        super().__init__(daemon=True)
        self.admin = admin
        self.index = start
        self.acked: list[tuple[str, int]] = []
        self.failed: BaseException | None = None

    def ops(self, i: int) -> list[tuple[str, Callable[[], None]]]:
        admin = self.admin
        return [
            ("mkdir_dev", lambda: os.mkdir(admin / "devices" / f"d{i}")),
            ("type", lambda: write(admin / "devices" / f"d{i}" / "type", "echo")),
            ("mode", lambda: write(admin / "devices" / f"d{i}" / "mode", "sink")),
            ("mkdir_bus", lambda: os.mkdir(admin / "buses" / f"b{i}")),
            (
                "link",
                lambda: os.symlink(f"../../devices/d{i}", admin / "buses" / f"b{i}" / f"d{i}"),
            ),
            ("member", lambda: write(admin / "buses" / f"b{i}" / "members", f"uid:{10000 + i}")),
        ]

    def run(self) -> None:
        try:
            while True:
                for name, op in self.ops(self.index):
                    op()
                    self.acked.append((name, self.index))
                self.index += 1
        except OSError as exc:
            self.failed = exc  # the daemon died under us: expected


def check_acked(admin: Path, acked: list[tuple[str, int]]) -> None:
    for name, i in acked:
        dev, bus = admin / "devices" / f"d{i}", admin / "buses" / f"b{i}"
        if name == "mkdir_dev":
            assert dev.is_dir(), f"lost: mkdir devices/d{i}"
        elif name == "type":
            assert read(dev / "type") == "echo\n", f"lost: type of d{i}"
        elif name == "mode":
            assert read(dev / "mode") == "sink\n", f"lost: mode of d{i}"
        elif name == "mkdir_bus":
            assert bus.is_dir(), f"lost: mkdir buses/b{i}"
        elif name == "link":
            assert os.readlink(bus / f"d{i}") == f"../../devices/d{i}", f"lost: link b{i}/d{i}"
        elif name == "member":
            assert f"uid:{10000 + i}" in read(bus / "members").split(), f"lost: member of b{i}"


def test_sigkill_during_admin_operations_loses_no_acknowledged_change(vbusd) -> None:
    require(fuse_available(), "no /dev/fuse: the admin tree needs FUSE")
    daemon: Daemon = vbusd()
    require(daemon.admin_mounted, "the admin tree did not mount")
    rng = random.Random(2026)
    acked: list[tuple[str, int]] = []
    next_index = 0
    for round_ in range(5):
        driver = Driver(daemon.admin, next_index)
        driver.start()
        time.sleep(rng.uniform(0.05, 0.6))
        daemon.stop(signal.SIGKILL)
        driver.join(20)
        assert not driver.is_alive(), "an admin syscall hung after the daemon died"
        acked.extend(driver.acked)
        next_index = driver.index + 1  # the op in flight may or may not have landed
        # The state file is whole after every kill.
        json.loads(daemon.state.read_text())
        daemon = restart(daemon, f"round{round_}")
        assert daemon.logged('"admin.stale_mount_cleared"')
        check_acked(daemon.admin, acked)
    assert len(acked) > 20, f"too few operations ran to mean anything: {len(acked)}"
    assert daemon.stop() == 0


def test_pid_rules_of_tasks_that_are_gone_are_dropped(vbusd) -> None:
    require(fuse_available(), "no /dev/fuse: the admin tree needs FUSE")
    daemon: Daemon = vbusd()
    require(daemon.admin_mounted, "the admin tree did not mount")
    child = _long_lived_child()
    members = daemon.admin / "buses" / "default" / "members"
    write(members, str(child.pid))
    assert f"pid:{child.pid}" in read(members).split()
    child.kill()
    child.wait()
    deadline = time.monotonic() + 15
    while f"pid:{child.pid}" in read(members).split() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert f"pid:{child.pid}" not in read(members).split()
    saved = json.loads(daemon.state.read_text())["topology"]["buses"]["default"]["pids"]
    assert child.pid not in [entry["pid"] for entry in saved]
    assert daemon.logged('"member.stale_dropped"')
