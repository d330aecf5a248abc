"""The admin tree in-process: its pure rules (TreeView, inode table, link
targets, member lines, mountinfo) and the FUSE handlers called directly,
without a mount."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import structlog

from tests.conftest import require
from vbus.admin import fs
from vbus.admin.fs import AdminTree, InodeTable
from vbus.admin.mount import fuse_mount_listed, mount_admin_tree
from vbus.admin.tree import (
    Kind,
    TreeView,
    link_target_device,
    parse_member_lines,
)
from vbus.core.members import Domain, Peer, Vm
from vbus.core.model import Topology
from vbus.core.registry import Registry
from vbus.devices.echo import Echo
from vbus.errors import Busy, Denied, Exists, Invalid, NoSuchTask, NotFound, NotPermitted

pyfuse3 = fs.pyfuse3  # the real module, or the stand-in when it cannot be imported


@pytest.fixture
def _pyfuse3() -> None:
    reason = fs.fuse_import_error()
    require(reason is None, reason or "")


needs_pyfuse3 = pytest.mark.usefixtures("_pyfuse3")


class FakeTasks:
    """pid -> (ppid, starttime, uid)."""

    def __init__(self) -> None:
        self.procs: dict[int, tuple[int, int, int]] = {1: (0, 1, 0), 10: (1, 50, 2000)}

    def starttime(self, pid: int) -> int | None:
        proc = self.procs.get(pid)
        return None if proc is None else proc[1]

    def parent(self, pid: int) -> int | None:
        proc = self.procs.get(pid)
        return None if proc is None or proc[0] <= 0 else proc[0]

    def uid(self, pid: int) -> int | None:
        proc = self.procs.get(pid)
        return None if proc is None else proc[2]


def make_topology() -> Topology:
    registry = Registry()
    registry.register(Echo)
    topology = Topology(registry, FakeTasks(), 0)
    topology.create_device("echo0", "echo")
    topology.create_bus("default")
    topology.link("default", "echo0")
    topology.add_member("default", "uid:0")
    return topology


def no_revoke(conn: Any, kind: Any, reason: str) -> None:
    pass


# --- link targets, member lines, mountinfo -------------------------------------------------


@pytest.mark.parametrize(
    ("target", "device"),
    [
        ("../../devices/eth0", "eth0"),
        ("../../devices/eth0/", "eth0"),
        ("./../../devices/./eth0", "eth0"),
        ("../../buses/../devices/eth0", "eth0"),
        ("/mnt/admin/devices/eth0", "eth0"),
        ("/mnt//admin/devices/eth0/", "eth0"),
        ("/real/admin/devices/eth0", "eth0"),
    ],
)
def test_link_targets_inside_the_tree(target: str, device: str) -> None:
    assert link_target_device(target, "b0", ["/mnt/admin", "/real/admin"]) == device


@pytest.mark.parametrize(
    "target",
    [
        "",
        "eth0",
        "../eth0",
        "../../devices",
        "../../devices/eth0/mode",
        "../../deviceclasses/echo",
        "../../../devices/eth0",  # leaves the tree
        "../../../admin/devices/eth0",  # leaves and comes back: still refused
        "/etc/passwd",
        "/mnt/adminx/devices/eth0",
        "/mnt/devices/eth0",
    ],
)
def test_link_targets_outside_refused(target: str) -> None:
    with pytest.raises(Invalid):
        link_target_device(target, "b0", ["/mnt/admin"])


def test_member_lines() -> None:
    assert parse_member_lines("123\n") == [(True, "123")]
    assert parse_member_lines("uid:5\n-pid:7\n - uid:self \n\n") == [
        (True, "uid:5"),
        (False, "pid:7"),
        (False, "uid:self"),
    ]
    for bad in ("", "\n", "uid:x", "5\nnope", "--5", "pid:self"):
        with pytest.raises(Invalid):
            parse_member_lines(bad)
    assert parse_member_lines("domid:7\n-domid:8\n") == [(True, "domid:7"), (False, "domid:8")]
    for bad in ("domid:0", "-domid:0", "domid:32752", "domid:7\ndomid:x", "domid:self"):
        with pytest.raises(Invalid):
            parse_member_lines(bad)
    with pytest.raises(Invalid, match="domid:N"):
        parse_member_lines("\n")


def test_mountinfo() -> None:
    text = (
        "36 35 98:0 /mnt1 /mnt1 rw,noatime master:1 - ext3 /dev/root rw\n"
        "42 27 0:39 / /tmp/a\\040b/admin rw,nosuid - fuse.vbus vbus rw,user_id=0\n"
        "43 27 0:40 / /other rw - fuse sshfs rw\n"
        "44 27 0:41 / /tmpfs rw - tmpfs tmpfs rw\n"
        "garbage\n"
    )
    assert fuse_mount_listed(text, "/tmp/a b/admin")
    assert fuse_mount_listed(text, "/other")
    assert not fuse_mount_listed(text, "/tmpfs")
    assert not fuse_mount_listed(text, "/mnt1")
    assert not fuse_mount_listed(text, "/tmp/a\\040b/admin")


# --- inode bookkeeping ---------------------------------------------------------------------


def test_inodes_stable_per_path_and_never_reused() -> None:
    table = InodeTable()
    assert table.inode(()) == 1 and table.path(1) == ()
    eth0 = table.inode(("devices", "eth0"))
    assert table.inode(("devices", "eth0")) == eth0
    mode = table.inode(("devices", "eth0", "mode"))
    assert len({1, eth0, mode}) == 3
    table.remember(eth0)
    table.remember(eth0)
    table.forget(eth0, 1)
    assert table.path(eth0) == ("devices", "eth0")
    table.forget(eth0, 1)  # the kernel let go: the number is dropped
    with pytest.raises(NotFound):
        table.path(eth0)
    again = table.inode(("devices", "eth0"))
    assert again not in (1, eth0, mode)
    table.forget(1, 5)  # the root is never dropped
    assert table.path(1) == ()


def test_retired_paths_get_fresh_numbers() -> None:
    table = InodeTable()
    held = table.inode(("devices", "eth0"))
    table.remember(held)
    child = table.inode(("devices", "eth0", "type"))
    table.retire(("devices", "eth0"))
    with pytest.raises(NotFound):
        table.path(held)  # the kernel's old reference answers ENOENT
    with pytest.raises(NotFound):
        table.path(child)
    fresh = table.inode(("devices", "eth0"))
    assert fresh not in (held, child)
    table.forget(held, 1)  # forgetting the old number leaves the new path alone
    assert table.path(fresh) == ("devices", "eth0")
    assert table.inode(("devices", "eth0")) == fresh


# --- the view --------------------------------------------------------------------------------


def test_view_shape() -> None:
    view = TreeView(make_topology())
    assert view.children(()) == ["deviceclasses", "devices", "buses"]
    assert TreeView(make_topology(), status=dict).children(())[-1] == "status"
    assert view.children(("devices", "echo0")) == ["type", "id", "stats", "mode"]
    assert view.children(("buses", "default")) == ["members", "connections", "force", "echo0"]
    assert view.node(("devices", "echo0", "mode")).mode == 0o644
    assert view.node(("devices", "echo0", "stats")).mode == 0o444
    link = view.node(("buses", "default", "echo0"))
    assert (link.kind, link.mode, link.target) == (Kind.LINK, 0o777, "../../devices/echo0")
    for missing in [("status",), ("nope",), ("devices", "x"), ("devices", "echo0", "x"),
                    ("buses", "default", "x"), ("deviceclasses", "echo", "x"),
                    ("devices", "echo0", "mode", "deeper")]:  # fmt: skip
        with pytest.raises(NotFound):
            view.node(missing)


def test_view_writes_map_to_topology_errors() -> None:
    topology = make_topology()
    view = TreeView(topology)
    view.mkdir(("devices", "eth0"))
    with pytest.raises(Exists):
        view.mkdir(("devices", "eth0"))
    with pytest.raises(Invalid):
        view.mkdir(("devices", "bad name"))
    with pytest.raises(NotPermitted):
        view.mkdir(("deviceclasses", "x"))
    with pytest.raises(Invalid):
        view.write(("devices", "eth0", "type"), "nosuch\n")
    view.write(("devices", "eth0", "type"), "echo\n")
    with pytest.raises(Busy):
        view.write(("devices", "eth0", "type"), "echo\n")
    with pytest.raises(Invalid):
        view.write(("devices", "eth0", "mode"), "bogus\n")
    view.write(("devices", "eth0", "mode"), "sink\n")
    assert view.read(("devices", "eth0", "mode")) == "sink\n"
    with pytest.raises(Denied):
        view.write(("devices", "eth0", "stats"), "1\n")
    view.symlink(("buses", "default", "eth0"), "../../devices/eth0")
    with pytest.raises(Exists):
        view.symlink(("buses", "default", "eth0"), "../../devices/eth0")
    with pytest.raises(Invalid):
        view.symlink(("buses", "default", "x"), "../../devices/eth0")
    with pytest.raises(Exists):
        view.symlink(("buses", "default", "force"), "../../devices/force")
    with pytest.raises(NotPermitted):
        view.symlink(("devices", "x"), "../devices/eth0")
    with pytest.raises(Busy):
        view.rmdir(("devices", "eth0"))
    with pytest.raises(NotPermitted):
        view.unlink(("buses", "default", "members"))
    with pytest.raises(NotPermitted):
        view.rmdir(("devices",))
    view.unlink(("buses", "default", "eth0"))
    view.rmdir(("devices", "eth0"))
    assert view.generation == 6


def test_view_members_and_force() -> None:
    topology = make_topology()
    view = TreeView(topology)
    view.mkdir(("buses", "b0"))
    view.write(("buses", "b0", "members"), "10\n")
    assert view.read(("buses", "b0", "members")) == "pid:10\n"
    with pytest.raises(NoSuchTask):
        view.write(("buses", "b0", "members"), "99\n")
    with pytest.raises(Busy):
        view.write(("buses", "b0", "members"), "uid:0\n")
    before = view.generation
    with pytest.raises(Busy):  # the first line is undone with the failing one
        view.write(("buses", "b0", "members"), "uid:7\nuid:0\n")
    assert view.read(("buses", "b0", "members")) == "pid:10\n"
    assert view.generation > before  # so the adapter persists anyway
    view.write(("buses", "b0", "members"), "-10\n")
    assert view.read(("buses", "b0", "members")) == ""

    view.write(("buses", "b0", "members"), "domid:7\n")
    view.write(("buses", "b0", "members"), "domid:9\n-domid:7\ndomid:8\n")
    assert view.read(("buses", "b0", "members")) == "domid:8\ndomid:9\n"
    view.mkdir(("buses", "b1"))
    with pytest.raises(Busy):
        view.write(("buses", "b1", "members"), "domid:8\n")
    with pytest.raises(Invalid, match="dom0"):
        view.write(("buses", "b1", "members"), "domid:0\n")
    with pytest.raises(Invalid, match="out of range"):
        view.write(("buses", "b1", "members"), "domid:32752\n")
    with pytest.raises(Invalid):  # the syntax of every line first: nothing applied
        view.write(("buses", "b1", "members"), "domid:5\ndomid:zero\n")
    with pytest.raises(NotFound):
        view.write(("buses", "b1", "members"), "-domid:8\n")
    assert view.read(("buses", "b1", "members")) == ""
    assert topology.snapshot()["buses"]["b0"]["domids"] == [8, 9]
    view.write(("buses", "b0", "members"), "-domid:8\n-domid:9\n")
    view.rmdir(("buses", "b1"))

    # force lives with the bus object, not its name
    view.symlink(("buses", "b0", "echo0"), "../../devices/echo0")
    conn = topology.open("b0", "echo0", Peer(10, 2000, 2000, 50), "test", no_revoke)
    with pytest.raises(Busy):
        view.rmdir(("buses", "b0"))
    with pytest.raises(Invalid):
        view.write(("buses", "b0", "force"), "yes\n")
    view.write(("buses", "b0", "force"), "1\n")
    assert view.read(("buses", "b0", "force")) == "1\n"
    view.rmdir(("buses", "b0"))
    assert conn.closed
    view.mkdir(("buses", "b0"))
    assert view.read(("buses", "b0", "force")) == "0\n"


def test_view_reads() -> None:
    topology = make_topology()
    view = TreeView(topology, status=lambda: {"pid": 5, "note": "two\nlines"})
    assert view.read(("status",)) == "pid 5\nnote two lines\n"
    assert view.read(("devices", "echo0", "type")) == "echo\n"
    assert view.read(("devices", "echo0", "id")) == f"{topology.device('echo0').id}\n"
    conn = topology.open("default", "echo0", Peer(10, 2000, 2000, 50), "test", no_revoke)
    conn.calls = 3
    line = view.read(("buses", "default", "connections"))
    assert line.startswith(f"id={conn.id} pid=10 uid=2000 gid=2000 device=echo0 connector=test ")
    assert line.endswith(" calls=3 faults=0\n")
    assert view.read(("devices", "echo0", "stats")).endswith("opens 1\nconnections 1\n")
    view.mkdir(("devices", "bare"))
    assert view.read(("devices", "bare", "type")) == "\n"
    assert view.read(("devices", "bare", "stats")) == "connections 0\n"
    topology.open("default", "echo0", Domain(7), "xen", no_revoke)
    topology.open("default", "echo0", Vm(Peer(11, 0, 0, 60), "guest0"), "kvm", no_revoke)
    lines = view.read(("buses", "default", "connections")).splitlines()
    assert " domid=7 device=echo0 connector=xen " in lines[1]
    assert "pid=" not in lines[1]
    assert " vm=guest0 pid=11 uid=0 gid=0 device=echo0 connector=kvm " in lines[2]
    for conn_line in lines:  # every listing line stays key=value words
        assert all("=" in word for word in conn_line.split())


# --- the FUSE handlers, called directly -------------------------------------------------------


@dataclass
class Ctx:
    uid: int = 0
    gid: int = 0
    pid: int = 1
    umask: int = 0o22


@dataclass
class Fields:
    update_size: bool = False
    update_mode: bool = False
    update_uid: bool = False
    update_gid: bool = False
    update_atime: bool = False
    update_mtime: bool = False
    update_ctime: bool = False


class Commits:
    def __init__(self, fail: bool = False) -> None:
        self.count = 0
        self.fail = fail

    async def __call__(self) -> None:
        self.count += 1
        if self.fail:
            raise OSError(errno.ENOSPC, "disk full")


def make_tree(commit: Commits, **kw: Any) -> AdminTree:
    return AdminTree(make_topology(), commit, uid=0, gid=0, **kw)


async def lookup_path(tree: AdminTree, *names: str) -> int:
    inode = 1
    for name in names:
        inode = (await tree.lookup(inode, name.encode(), Ctx())).st_ino
    return inode


@needs_pyfuse3
async def test_changes_are_committed_before_the_reply() -> None:
    commits = Commits()
    tree = make_tree(commits)
    devices = await lookup_path(tree, "devices")
    entry = await tree.mkdir(devices, b"eth0", 0o755, Ctx())
    assert entry.st_mode == 0o40755 and entry.entry_timeout == 0 and entry.attr_timeout == 0
    assert commits.count == 1
    type_inode = await lookup_path(tree, "devices", "eth0", "type")
    info = await tree.open(type_inode, os.O_WRONLY, Ctx())
    assert info.direct_io
    assert await tree.write(info.fh, 0, b"echo\n") == 5
    assert commits.count == 2
    await tree.release(info.fh)
    force = await lookup_path(tree, "buses", "default", "force")
    info = await tree.open(force, os.O_WRONLY, Ctx())
    await tree.write(info.fh, 0, b"1\n")
    assert commits.count == 2  # the force flag is not persisted state


@needs_pyfuse3
async def test_refusals_become_errno_and_are_logged() -> None:
    tree = make_tree(Commits())
    devices = await lookup_path(tree, "devices")
    with structlog.testing.capture_logs() as logs, pytest.raises(pyfuse3.FUSEError) as err:
        await tree.mkdir(devices, b"echo0", 0o755, Ctx())
    assert err.value.errno == errno.EEXIST
    assert logs[0]["event"] == "admin.refused"
    assert logs[0]["errno"] == "EEXIST" and logs[0]["path"] == "devices/echo0"
    with pytest.raises(pyfuse3.FUSEError) as err:
        await tree.lookup(devices, b"nosuch", Ctx())
    assert err.value.errno == errno.ENOENT
    with pytest.raises(pyfuse3.FUSEError) as err:
        await tree.create(devices, b"new", 0o644, os.O_WRONLY, Ctx())
    assert err.value.errno == errno.EACCES
    stats = await lookup_path(tree, "devices", "echo0", "stats")
    with pytest.raises(pyfuse3.FUSEError) as err:
        await tree.open(stats, os.O_WRONLY | os.O_TRUNC, Ctx())  # root, too
    assert err.value.errno == errno.EACCES
    mode = await lookup_path(tree, "devices", "echo0", "mode")
    with pytest.raises(pyfuse3.FUSEError) as err:
        await tree.open(mode, os.O_WRONLY, Ctx(uid=65534))
    assert err.value.errno == errno.EACCES
    with pytest.raises(pyfuse3.FUSEError) as err:
        await tree.mkdir(devices, b"x", 0o755, Ctx(uid=65534))
    assert err.value.errno == errno.EACCES
    info = await tree.open(mode, os.O_WRONLY, Ctx())
    with pytest.raises(pyfuse3.FUSEError) as err:
        await tree.write(info.fh, 0, b"\xff\n")
    assert err.value.errno == errno.EINVAL


@needs_pyfuse3
async def test_setattr() -> None:
    tree = make_tree(Commits())
    mode = await lookup_path(tree, "devices", "echo0", "mode")
    stats = await lookup_path(tree, "devices", "echo0", "stats")
    attrs = pyfuse3.EntryAttributes()
    entry = await tree.setattr(mode, attrs, Fields(update_size=True), None, Ctx())
    assert entry.st_size == 4096
    await tree.setattr(stats, attrs, Fields(update_mtime=True), None, Ctx())  # touch
    for inode, fields, code in [
        (stats, Fields(update_size=True), errno.EACCES),
        (mode, Fields(update_mode=True), errno.EPERM),
        (1, Fields(update_size=True), errno.EISDIR),
    ]:
        with pytest.raises(pyfuse3.FUSEError) as err:
            await tree.setattr(inode, attrs, fields, None, Ctx())
        assert err.value.errno == code


@needs_pyfuse3
async def test_commit_failure_is_eio() -> None:
    commits = Commits(fail=True)
    tree = make_tree(commits)
    devices = await lookup_path(tree, "devices")
    with structlog.testing.capture_logs() as logs, pytest.raises(pyfuse3.FUSEError) as err:
        await tree.mkdir(devices, b"eth0", 0o755, Ctx())
    assert err.value.errno == errno.EIO
    admin = [entry for entry in logs if entry["event"].startswith("admin.")]
    assert [entry["event"] for entry in admin] == ["admin.commit_failed"]
    assert admin[0]["exc_info"] is True


@needs_pyfuse3
async def test_bugs_are_eio_and_logged() -> None:
    def broken_status() -> dict[str, Any]:
        raise RuntimeError("bug")

    tree = make_tree(Commits(), status=broken_status)
    status = await lookup_path(tree, "status")
    info = await tree.open(status, os.O_RDONLY, Ctx())
    with structlog.testing.capture_logs() as logs, pytest.raises(pyfuse3.FUSEError) as err:
        await tree.read(info.fh, 0, 4096)
    assert err.value.errno == errno.EIO
    assert logs[0]["event"] == "admin.error" and logs[0]["op"] == "read"
    await tree.forget([(12345, 1), (status, 99)])  # never raises


@needs_pyfuse3
async def test_reads_render_at_offset_zero() -> None:
    tree = make_tree(Commits())
    mode = await lookup_path(tree, "devices", "echo0", "mode")
    info = await tree.open(mode, os.O_RDONLY, Ctx())
    assert await tree.read(info.fh, 0, 2) == b"ec"
    tree.topology.set_attribute("echo0", "mode", "sink")
    assert await tree.read(info.fh, 2, 100) == b"ho\n"  # the same rendering
    assert await tree.read(info.fh, 0, 100) == b"sink\n"  # a new read sees the change


@needs_pyfuse3
async def test_dot_lookups_and_removed_inodes() -> None:
    tree = make_tree(Commits())
    echo0 = await lookup_path(tree, "devices", "echo0")
    devices = await lookup_path(tree, "devices")
    assert (await tree.lookup(echo0, b"..", Ctx())).st_ino == devices
    assert (await tree.lookup(echo0, b".", Ctx())).st_ino == echo0
    assert (await tree.getattr(devices, Ctx())).st_nlink == 3
    tree.topology.unlink("default", "echo0")
    await tree.rmdir(devices, b"echo0", Ctx())
    with pytest.raises(pyfuse3.FUSEError) as err:
        await tree.getattr(echo0, Ctx())
    assert err.value.errno == errno.ENOENT


# --- mounting without FUSE ---------------------------------------------------------------------


async def test_no_dev_fuse_is_one_warning(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real_exists = os.path.exists
    monkeypatch.setattr(os.path, "exists", lambda p: p != "/dev/fuse" and real_exists(p))
    tree = make_tree(Commits())
    with structlog.testing.capture_logs() as logs:
        assert await mount_admin_tree(tree, tmp_path / "admin") is None
    assert [entry["event"] for entry in logs] == ["admin.unavailable"]
    assert "/dev/fuse" in logs[0]["reason"]
    assert logs[0]["log_level"] == "warning"


def test_without_pyfuse3_the_tree_is_built_and_reported_unavailable(tmp_path: Path) -> None:
    script = f"""
import asyncio, sys
sys.modules["pyfuse3"] = None  # as if libfuse3 or the extension were missing
import structlog
from vbus.admin.fs import AdminTree
from vbus.admin.mount import mount_admin_tree
from vbus.core.model import Topology
from vbus.core.registry import Registry
from vbus.procfs import ProcTasks

async def main():
    tree = AdminTree(Topology(Registry(), ProcTasks(), 0), None, uid=0, gid=0)
    with structlog.testing.capture_logs() as logs:
        assert await mount_admin_tree(tree, {str(tmp_path / "admin")!r}) is None
    print(logs)

asyncio.run(main())
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "'event': 'admin.unavailable'" in result.stdout
    assert "pyfuse3 cannot be imported" in result.stdout
    assert not (tmp_path / "admin").exists()
