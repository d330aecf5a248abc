"""The admin tree through a real FUSE mount of a real vbusd, driven by the shell.

Every change is made with mkdir, ln -s, echo, rm, rmdir as an administrator
would, and every refusal is checked by the errno text the shell prints.
Writes go through bash (its builtin echo prints the errno; dash's says only
"I/O error").
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon, require
from vbus import protocol
from vbus.client import connect
from vbus.errors import VbusError

pytestmark = pytest.mark.integration

NOBODY = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
NO_SUCH_PID = 2**31 - 1  # above any pid_max, yet valid rule syntax


def fuse_missing() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse: FUSE is not available here"
    try:
        import pyfuse3  # noqa: F401
    except ImportError as exc:
        return f"pyfuse3 cannot be imported: {exc}"
    return None


class Tree:
    """A mounted admin tree and the shell to drive it."""

    def __init__(self, daemon: Daemon, root: Path) -> None:
        self.daemon = daemon
        self.root = root

    def sh(self, script: str, *, nobody: bool = False) -> subprocess.CompletedProcess[str]:
        cmd = [*(NOBODY if nobody else []), "bash", "-c", script]
        return subprocess.run(
            cmd, cwd=self.root, capture_output=True, text=True, timeout=30, check=False
        )

    def ok(self, script: str, *, nobody: bool = False) -> str:
        result = self.sh(script, nobody=nobody)
        assert result.returncode == 0, f"{script!r} failed: {result.stderr}"
        return result.stdout

    def fails(self, script: str, *messages: str, nobody: bool = False) -> str:
        """Run ``script``; it must fail with one of ``messages`` in its stderr."""
        result = self.sh(script, nobody=nobody)
        assert result.returncode != 0, f"{script!r} succeeded: {result.stdout}"
        assert any(m in result.stderr for m in messages), f"{script!r}: {result.stderr}"
        assert "Function not implemented" not in result.stderr
        return result.stderr

    def cat(self, relative: str) -> str:
        return self.ok(f"cat {relative}")

    def state(self) -> Any:
        """The persisted topology, as the daemon last committed it."""
        return json.loads(self.daemon.state.read_text())["topology"]


def _stale(path: Path) -> bool:
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


@pytest.fixture
def start_tree(vbusd: Callable[..., Daemon]) -> Iterator[Callable[..., Tree]]:
    """Factory: a vbusd with its admin tree mounted where uid 65534 can reach it."""
    reason = fuse_missing()
    require(reason is None, reason or "")
    bases: list[Path] = []
    daemons: list[Daemon] = []

    def start(*args: str, base: Path | None = None) -> Tree:
        if base is None:
            base = Path(tempfile.mkdtemp(prefix="vbus-admin-"))
            base.chmod(0o755)  # tmp_path's parents are 0700: nobody could not test reads
            bases.append(base)
        mountpoint = base / "admin"
        daemon = vbusd("--admin-dir", str(mountpoint), *args)
        daemon.admin = mountpoint
        daemons.append(daemon)
        assert daemon.admin_mounted, daemon.log()
        return Tree(daemon, mountpoint)

    yield start
    for daemon in daemons:
        if daemon.proc is not None and daemon.proc.poll() is None:
            assert daemon.stop() == 0, daemon.log()
            assert not os.path.ismount(daemon.admin), "the tree stayed mounted"
            assert '"admin.unmounted"' in daemon.log()
        elif _stale(daemon.admin):  # a killed daemon's mount stays until cleared
            subprocess.run(["umount", "-l", str(daemon.admin)], capture_output=True, check=False)
        log = daemon.log()
        assert '"admin.error"' not in log, log
        assert '"admin.failed"' not in log, log
    for base in bases:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def tree(start_tree: Callable[..., Tree]) -> Tree:
    return start_tree()


# --- layout ---------------------------------------------------------------------------


def test_layout_modes_and_ownership(tree: Tree) -> None:
    listing = tree.ok("ls -l")
    for name in ("deviceclasses", "devices", "buses"):
        assert any(line.startswith("drwxr-xr-x") and line.endswith(f" {name}")
                   for line in listing.splitlines()), listing  # fmt: skip
    assert any(line.startswith("-r--r--r--") and line.endswith(" status")
               for line in listing.splitlines()), listing  # fmt: skip

    modes = {
        "devices/echo0": 0o40755,
        "devices/echo0/type": 0o100644,
        "devices/echo0/mode": 0o100644,
        "devices/echo0/id": 0o100444,
        "devices/echo0/stats": 0o100444,
        "buses/default": 0o40755,
        "buses/default/members": 0o100644,
        "buses/default/force": 0o100644,
        "buses/default/connections": 0o100444,
        "buses/default/echo0": 0o120777,
        "deviceclasses/echo": 0o40755,
        "deviceclasses/echo/description": 0o100444,
        "deviceclasses/echo/attributes": 0o100444,
        "status": 0o100444,
    }
    for relative, mode in modes.items():
        st = os.lstat(tree.root / relative)
        assert st.st_mode == mode, f"{relative}: {oct(st.st_mode)}"
        assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())
        if stat.S_ISREG(mode):
            assert st.st_size == 4096
    assert "lrwxrwxrwx" in tree.ok("ls -l buses/default")
    assert tree.ok("readlink buses/default/echo0") == "../../devices/echo0\n"


def test_ls_a_lists_dot_entries_once(tree: Tree) -> None:
    assert tree.ok("ls -a").split() == [".", "..", "buses", "deviceclasses", "devices", "status"]
    assert tree.ok("ls -a devices/echo0").split() == [".", "..", "id", "mode", "stats", "type"]
    assert tree.ok("ls -a buses/default").split() == [
        ".", "..", "connections", "echo0", "force", "members",
    ]  # fmt: skip
    # Inodes are stable while a path exists.
    first = tree.ok("stat -c %i devices/echo0 devices/echo0/mode")
    assert tree.ok("stat -c %i devices/echo0 devices/echo0/mode") == first


def test_every_file_reads_back_with_a_newline(tree: Tree) -> None:
    tree.ok("mkdir devices/bare buses/b0 && echo uid:1234 > buses/b0/members")
    files = tree.ok("find . -type f").split()
    assert len(files) >= 14
    for relative in files:
        text = tree.cat(relative)
        assert text == "" or text.endswith("\n"), relative
    assert tree.cat("devices/bare/type") == "\n"
    assert tree.cat("devices/echo0/type") == "echo\n"
    assert tree.cat("devices/echo0/mode") == "echo\n"
    assert tree.cat("buses/b0/force") == "0\n"
    assert tree.cat("buses/b0/members") == "uid:1234\n"
    assert tree.cat("buses/b0/connections") == ""
    status = dict(line.split(" ", 1) for line in tree.cat("status").splitlines())
    assert status["pid"] == str(tree.daemon.pid)


def test_deviceclasses_describe_and_refuse_changes(tree: Tree) -> None:
    assert tree.ok("ls deviceclasses").split() == ["echo", "venet"]
    assert "Loops queue 0 into queue 1" in tree.cat("deviceclasses/echo/description")
    assert tree.cat("deviceclasses/echo/attributes") == (
        "mode kind=choice default=echo choices=echo,sink "
        "doc=echo: loop queue 0 into queue 1; sink: consume queue 0 and count\n"
    )
    tree.fails("mkdir deviceclasses/x", "Operation not permitted")
    tree.fails("rmdir deviceclasses/echo", "Operation not permitted")
    tree.fails("echo x > deviceclasses/echo/description", "Permission denied")
    tree.fails("touch deviceclasses/echo/new", "Permission denied")


# --- devices ----------------------------------------------------------------------------


def test_device_lifecycle(tree: Tree) -> None:
    tree.ok("mkdir devices/eth0")
    assert "eth0" in tree.state()["devices"]  # persisted before mkdir returned
    tree.fails("mkdir devices/eth0", "File exists")
    tree.fails("mkdir 'devices/bad name'", "Invalid argument")
    assert tree.ok("ls devices/eth0").split() == ["id", "stats", "type"]
    assert tree.cat("devices/eth0/stats") == "connections 0\n"
    assert int(tree.cat("devices/eth0/id")) > 0

    tree.fails("echo nosuchclass > devices/eth0/type", "Invalid argument")
    tree.ok("echo echo > devices/eth0/type")
    tree.fails("echo echo > devices/eth0/type", "Device or resource busy")
    assert tree.ok("ls devices/eth0").split() == ["id", "mode", "stats", "type"]

    tree.fails("echo bogus > devices/eth0/mode", "Invalid argument")
    assert tree.daemon.logged('"reason": "mode: \'bogus\' is not one of echo, sink"')
    tree.ok("echo sink > devices/eth0/mode")
    assert tree.cat("devices/eth0/mode") == "sink\n"
    assert tree.state()["devices"]["eth0"] == {"id": 2, "attrs": {"mode": "sink"}, "class": "echo"}
    stats = tree.cat("devices/eth0/stats")
    assert "messages 0\n" in stats and stats.endswith("connections 0\n")

    tree.ok("rmdir devices/eth0")
    assert tree.ok("ls devices").split() == ["echo0"]
    tree.fails("cat devices/eth0/mode", "No such file or directory")
    tree.fails("rmdir devices/eth0", "No such file or directory")
    # The name can be used again, from scratch.
    tree.ok("mkdir devices/eth0")
    assert tree.cat("devices/eth0/type") == "\n"


def test_read_only_files_refuse_writes_even_for_root(tree: Tree) -> None:
    for relative in ("devices/echo0/id", "devices/echo0/stats", "buses/default/connections",
                     "status"):  # fmt: skip
        tree.fails(f"echo 1 > {relative}", "Permission denied")
        tree.fails(f"truncate -s 0 {relative}", "Permission denied")


def test_truncating_opens_are_accepted(tree: Tree) -> None:
    tree.ok("truncate -s 0 devices/echo0/mode")
    assert tree.cat("devices/echo0/mode") == "echo\n"  # truncation changes nothing
    fd = os.open(tree.root / "devices/echo0/mode", os.O_WRONLY | os.O_TRUNC)
    try:
        assert os.write(fd, b"sink\n") == 5
    finally:
        os.close(fd)
    assert tree.cat("devices/echo0/mode") == "sink\n"
    tree.ok("printf echo > devices/echo0/mode")  # no trailing newline
    assert tree.cat("devices/echo0/mode") == "echo\n"


def test_new_files_cannot_be_created(tree: Tree) -> None:
    for relative in ("devices/echo0/foo", "newfile", "buses/default/foo", "devices/foo"):
        tree.fails(f"touch {relative}", "Permission denied", "Operation not permitted")
        tree.fails(f"echo x > {relative}", "Permission denied", "Operation not permitted")
    assert tree.daemon.logged('"op": "create"')


def test_mkdir_rmdir_and_rm_elsewhere_are_not_permitted(tree: Tree) -> None:
    for relative in ("x", "devices/echo0/sub", "buses/default/sub", "deviceclasses/echo/sub"):
        tree.fails(f"mkdir {relative}", "Operation not permitted", "Permission denied")
    for relative in ("devices", "buses", "deviceclasses"):
        tree.fails(f"rmdir {relative}", "Operation not permitted")
    for relative in ("devices/echo0/mode", "buses/default/members", "status"):
        tree.fails(f"rm -f {relative}", "Operation not permitted")
    tree.fails("mv devices/echo0 devices/echo1", "Operation not permitted")


# --- buses and links --------------------------------------------------------------------


def test_links(tree: Tree) -> None:
    tree.ok("mkdir buses/b0 devices/eth0 devices/bare && echo echo > devices/eth0/type")
    tree.ok("ln -s ../../devices/eth0 buses/b0/eth0")
    assert tree.ok("readlink buses/b0/eth0") == "../../devices/eth0\n"
    assert tree.cat("buses/b0/eth0/type") == "echo\n"  # the link resolves into devices/
    assert tree.state()["buses"]["b0"]["devices"] == ["eth0"]
    # -n: do not follow the existing link into the device directory
    tree.fails("ln -sn ../../devices/eth0 buses/b0/eth0", "File exists")
    tree.fails("ln -s ../../devices/eth0 buses/b0/eth0", "File exists")  # ln follows the link
    tree.fails("ln -s ../../devices/eth0 buses/b0/other", "Invalid argument")
    tree.fails("ln -s /etc/passwd buses/b0/passwd", "Invalid argument")
    tree.fails("ln -s ../../deviceclasses/echo buses/b0/echo", "Invalid argument")
    tree.fails("ln -s ../../../devices/echo0 buses/b0/echo0", "Invalid argument")
    tree.fails("ln -s ../../devices/bare buses/b0/bare", "Invalid argument")  # typeless
    tree.fails("ln -s ../../devices/nosuch buses/b0/nosuch", "No such file or directory")
    tree.fails("ln -s ../../devices/eth0 devices/eth1", "Operation not permitted")
    tree.fails("ln -s ../../devices/members buses/b0/members", "File exists")
    # Absolute targets inside the mount are fine.
    tree.ok(f"ln -s {tree.root}/devices/echo0 buses/b0/echo0")
    assert tree.ok("readlink buses/b0/echo0") == "../../devices/echo0\n"
    assert tree.ok("ls buses/b0").split() == ["connections", "echo0", "eth0", "force", "members"]

    tree.fails("rmdir devices/eth0", "Device or resource busy")
    tree.ok("rm buses/b0/eth0")
    tree.fails("rm buses/b0/eth0", "No such file or directory")
    tree.ok("rmdir devices/eth0")
    tree.ok("rmdir buses/b0")  # still has echo0 linked and rules: nobody connected
    assert tree.ok("ls buses").split() == ["default"]
    assert tree.ok("readlink buses/default/echo0") == "../../devices/echo0\n"
    tree.fails("mkdir buses/default", "File exists")
    tree.fails("mkdir buses/-x", "Invalid argument")


def test_members(tree: Tree) -> None:
    tree.ok("mkdir buses/b0 buses/b1")
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        tree.ok(f"echo {sleeper.pid} > buses/b0/members")
        assert tree.cat("buses/b0/members") == f"pid:{sleeper.pid}\n"
        tree.fails(f"echo {sleeper.pid} > buses/b1/members", "Device or resource busy")
        tree.fails(f"echo {NO_SUCH_PID} > buses/b1/members", "No such process")
        tree.fails("echo uid:0 > buses/b1/members", "Device or resource busy")  # on default
        tree.fails("echo nonsense > buses/b1/members", "Invalid argument")
        tree.fails("echo -uid:77 > buses/b1/members", "No such file or directory")
        tree.ok("printf 'uid:1000\\nuid:1001\\n' > buses/b1/members")
        assert tree.cat("buses/b1/members") == "uid:1000\nuid:1001\n"
        # A bad line refuses the whole write (one write(2): bash's builtin printf
        # would write line by line, and each write stands on its own).
        tree.fails("/usr/bin/printf 'uid:1002\\nbad\\n' > buses/b1/members", "Invalid argument")
        assert tree.cat("buses/b1/members") == "uid:1000\nuid:1001\n"
        tree.ok("echo -uid:1000 > buses/b1/members")
        tree.ok(f"echo -{sleeper.pid} > buses/b0/members")
        assert tree.cat("buses/b0/members") == ""
        assert tree.cat("buses/b1/members") == "uid:1001\n"
        assert tree.state()["buses"]["b1"]["uids"] == [1001]
    finally:
        sleeper.kill()
        sleeper.wait()


def test_domid_members(tree: Tree) -> None:
    tree.ok("mkdir buses/b0 buses/b1")
    tree.ok("echo domid:7 > buses/b0/members")
    assert tree.cat("buses/b0/members") == "domid:7\n"
    tree.fails("echo domid:7 > buses/b1/members", "Device or resource busy")
    tree.fails("echo domid:007 > buses/b0/members", "File exists")
    tree.ok("echo uid:7 > buses/b1/members")  # uid 7 is not domid 7
    for refused in ("domid:0", "domid:32752", "domid:x", "domid:self", "domid:", "-domid:0"):
        tree.fails(f"echo {refused} > buses/b1/members", "Invalid argument")
    tree.fails("echo -domid:8 > buses/b1/members", "No such file or directory")
    tree.ok("printf 'domid:8\\ndomid:32751\\n' > buses/b1/members")
    assert tree.cat("buses/b1/members") == "domid:32751\ndomid:8\nuid:7\n"
    # A bad line refuses the whole write (one write(2), as for uid rules).
    tree.fails("/usr/bin/printf 'domid:9\\ndomid:0\\n' > buses/b1/members", "Invalid argument")
    assert tree.cat("buses/b1/members") == "domid:32751\ndomid:8\nuid:7\n"
    tree.ok("echo -domid:8 > buses/b1/members")
    tree.ok("echo -domid:7 > buses/b0/members && echo domid:7 > buses/b1/members")
    assert tree.cat("buses/b0/members") == ""
    assert tree.cat("buses/b1/members") == "domid:32751\ndomid:7\nuid:7\n"
    state = tree.state()["buses"]
    assert (state["b0"]["domids"], state["b1"]["domids"]) == ([], [7, 32751])
    assert state["b1"]["uids"] == [7]
    # What the state file holds comes back after a restart.
    first = tree.daemon
    assert first.stop() == 0
    again = Daemon(first.run_dir, first.args)
    again.log_path = first.run_dir.parent / f"{first.run_dir.name}.again.log"
    again.admin = first.admin
    again.start()
    try:
        assert again.admin_mounted, again.log()
        restored = Tree(again, tree.root)
        assert restored.cat("buses/b1/members") == "domid:32751\ndomid:7\nuid:7\n"
        restored.fails("echo domid:7 > buses/b0/members", "Device or resource busy")
    finally:
        assert again.stop() == 0, again.log()
    assert '"admin.error"' not in again.log()


def test_force_flag(tree: Tree) -> None:
    tree.ok("mkdir buses/b0")
    tree.fails("echo 2 > buses/b0/force", "Invalid argument")
    tree.ok("echo 1 > buses/b0/force")
    assert tree.cat("buses/b0/force") == "1\n"
    tree.ok("echo 0 > buses/b0/force")
    assert tree.cat("buses/b0/force") == "0\n"
    tree.ok("echo 1 > buses/b0/force && rmdir buses/b0 && mkdir buses/b0")
    assert tree.cat("buses/b0/force") == "0\n"  # a new bus starts unforced


# --- who may change the tree ---------------------------------------------------------------


@pytest.mark.parametrize(
    "script",
    [
        "mkdir devices/x",
        "mkdir buses/x",
        "echo sink > devices/echo0/mode",
        "echo 1 > buses/default/force",
        "echo uid:5 > buses/default/members",
        "ln -s ../../devices/echo0 buses/other/echo0",
        "ln -s ../../devices/spare buses/default/spare",
        "rm buses/default/echo0",
        "rmdir devices/spare",
        "rmdir buses/default",
        "touch devices/echo0/new",
        "truncate -s 0 devices/echo0/mode",
    ],
)
def test_unprivileged_users_cannot_change_anything(tree: Tree, script: str) -> None:
    tree.ok("mkdir buses/other devices/spare && echo echo > devices/spare/type")
    before = tree.daemon.state.read_text()
    tree.fails(script, "Permission denied", nobody=True)
    assert tree.daemon.state.read_text() == before


def test_unprivileged_users_can_read(tree: Tree) -> None:
    assert tree.ok("cat devices/echo0/mode", nobody=True) == "echo\n"
    assert tree.ok("ls buses/default", nobody=True).split() == [
        "connections", "echo0", "force", "members",
    ]  # fmt: skip
    assert tree.ok("readlink buses/default/echo0", nobody=True) == "../../devices/echo0\n"


# --- clients -------------------------------------------------------------------------------


async def _event(bus: object) -> protocol.Event:
    events: asyncio.Queue[protocol.Event] = bus.events  # type: ignore[attr-defined]
    return await asyncio.wait_for(events.get(), 10)


async def test_clients_see_exactly_their_bus(tree: Tree) -> None:
    tree.ok(
        "mkdir devices/e1 devices/e2 buses/b0"
        " && echo echo > devices/e1/type && echo echo > devices/e2/type"
        " && ln -s ../../devices/e1 buses/b0/e1"
    )
    async with connect(tree.daemon.socket) as bus:
        assert bus.name == "default"
        assert [d.name for d in await bus.devices()] == ["echo0"]
        tree.ok("ln -s ../../devices/e2 buses/default/e2")
        assert [d.name for d in await bus.devices()] == ["echo0", "e2"]
        tree.ok("rm buses/default/e2")
        assert [d.name for d in await bus.devices()] == ["echo0"]

    # A client admitted to b0 by pid sees b0's devices only.
    client = subprocess.Popen(
        [sys.executable, "-c", CLIENT, str(tree.daemon.socket)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        tree.ok(f"echo {client.pid} > buses/b0/members")
        out, _ = client.communicate("go\n", timeout=30)
    finally:
        if client.poll() is None:
            client.kill()
    assert out.split() == ["b0", "e1"]
    async with connect(tree.daemon.socket) as bus:
        assert bus.name == "default"  # the pid rule is the client's, not ours
        with pytest.raises(VbusError):
            await bus.open("e1")


CLIENT = """
import asyncio, sys
from vbus.client import connect

async def main():
    sys.stdin.readline()
    async with connect(sys.argv[1]) as bus:
        print(bus.name, *[d.name for d in await bus.devices()])

asyncio.run(main())
"""


async def test_rm_link_revokes_open_devices(tree: Tree) -> None:
    async with connect(tree.daemon.socket) as bus:
        device = await bus.open("echo0")
        assert await device.call(1, b"x") == b"x"
        await asyncio.to_thread(tree.ok, "rm buses/default/echo0")
        event = await _event(bus)
        assert event.kind == protocol.EventKind.DEVICE_REMOVED
        assert event.handle == device.handle
        with pytest.raises(VbusError):
            await device.call(1, b"x")
        assert tree.cat("buses/default/connections") == ""
        assert [d.name for d in await bus.devices()] == []


async def test_forced_bus_removal_faults_connections(tree: Tree) -> None:
    async with connect(tree.daemon.socket) as bus:
        device = await bus.open("echo0")
        await asyncio.to_thread(tree.fails, "rmdir buses/default", "Device or resource busy")
        assert await device.call(1, b"still") == b"still"
        await asyncio.to_thread(tree.ok, "echo 1 > buses/default/force && rmdir buses/default")
        event = await _event(bus)
        assert event.kind == protocol.EventKind.BUS_GONE
        with pytest.raises(VbusError):
            await device.call(1, b"x")
    assert tree.ok("ls buses") == ""
    assert tree.cat("devices/echo0/stats").endswith("connections 0\n")


async def test_a_client_without_devices_is_a_user_of_its_bus(tree: Tree) -> None:
    async with connect(tree.daemon.socket) as bus:
        await asyncio.to_thread(tree.fails, "rmdir buses/default", "Device or resource busy")
        assert [d.name for d in await bus.devices()] == ["echo0"]
        await asyncio.to_thread(tree.ok, "echo 1 > buses/default/force && rmdir buses/default")
        event = await _event(bus)
        assert (event.kind, event.handle) == (protocol.EventKind.BUS_GONE, 0)
        with pytest.raises(VbusError):
            await bus.devices()
    assert tree.ok("ls buses") == ""


async def test_removing_its_rule_expels_a_connected_client(tree: Tree) -> None:
    async with connect(tree.daemon.socket) as idle, connect(tree.daemon.socket) as busy:
        device = await busy.open("echo0")
        rule = f"uid:{os.getuid()}"
        await asyncio.to_thread(tree.ok, f"echo -{rule} > buses/default/members")
        for bus in (idle, busy):
            event = await _event(bus)
            while event.handle:  # the open device's own notice comes first
                event = await _event(bus)
            assert event.kind == protocol.EventKind.BUS_GONE
            assert "no longer a member of bus 'default'" in event.reason
        with pytest.raises(VbusError):
            await idle.devices()
        with pytest.raises(VbusError):
            await device.call(1, b"x")
        await asyncio.to_thread(tree.ok, f"echo {rule} > buses/default/members")
    assert tree.cat("buses/default/connections") == ""


async def test_connections_show_at_once(tree: Tree) -> None:
    assert tree.cat("buses/default/connections") == ""
    async with connect(tree.daemon.socket) as bus:
        device = await bus.open("echo0")
        await device.call(1, b"x")
        lines = tree.cat("buses/default/connections").splitlines()
        assert len(lines) == 1
        fields = dict(word.split("=", 1) for word in lines[0].split())
        assert fields["pid"] == str(os.getpid())
        assert fields["uid"] == str(os.getuid())
        assert fields["device"] == "echo0"
        assert fields["connector"] == "userspace"
        assert fields["since"].endswith("+00:00") and "T" in fields["since"]
        assert fields["calls"] == "1"
        assert tree.cat("devices/echo0/stats").endswith("connections 1\n")
        await device.close()
        assert tree.cat("buses/default/connections") == ""
        assert tree.cat("devices/echo0/stats").endswith("connections 0\n")


# --- directories that change while listed ------------------------------------------------------


def test_readdir_is_consistent_while_the_directory_changes(tree: Tree) -> None:
    tree.ok("cd devices && for i in $(seq 1 300); do mkdir d$i; done")
    listing = tree.ok("ls -a devices").split()
    assert len(listing) == len(set(listing)) == 303  # . .. echo0 d1..d300
    seen: list[str] = []
    with os.scandir(tree.root / "devices") as entries:
        for count, entry in enumerate(entries):
            seen.append(entry.name)
            if count == 20:  # change the directory between readdir requests
                tree.ok("for i in $(seq 150 200); do rmdir devices/d$i; done; mkdir devices/new")
    assert len(seen) == len(set(seen)), "an entry was listed twice"
    kept = {f"d{i}" for i in range(1, 301) if not 150 <= i <= 200}
    assert kept <= set(seen), "an entry that stayed was skipped"
    assert len(tree.ok("ls -a devices").split()) == 303 - 51 + 1


# --- restart after a crash -------------------------------------------------------------------


def test_stale_mount_of_a_killed_daemon_is_cleared(start_tree: Callable[..., Tree]) -> None:
    first = start_tree()
    first.daemon.stop(signal.SIGKILL)
    dead = subprocess.run(["ls", str(first.root)], capture_output=True, text=True, check=False)
    assert "Transport endpoint is not connected" in dead.stderr
    second = start_tree(base=first.root.parent)
    assert second.daemon.logged('"admin.stale_mount_cleared"')
    assert second.ok("ls devices").split() == ["echo0"]


def test_a_mount_served_by_another_daemon_is_left_alone(
    start_tree: Callable[..., Tree], vbusd: Callable[..., Daemon]
) -> None:
    first = start_tree()
    second = vbusd("--admin-dir", str(first.root))
    log = second.log()
    assert log.count('"admin.unavailable"') == 1
    assert "already a FUSE mount served by another process" in log
    assert first.ok("ls devices").split() == ["echo0"]  # still the first one's
    assert second.stop() == 0
    assert first.ok("ls devices").split() == ["echo0"]
